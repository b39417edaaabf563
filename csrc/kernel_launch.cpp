// bridge_ops._C.kernels: how the CUDA kernels are launched, for Python. Built into every _C, CPU-only builds included:
//   * csrc/cuda/kernels/launch.h as Python sees it: its constants, the Bridge kernels' plan_launch and Grid;
//   * kernel_table(): every kernel instantiation by name (kernels/kernel_table.h), which the cupy backend compiles;
//   * the C++ hosts of the ops (csrc/host/) with a launcher written in Python: the cupy backend's (NVRTC) and the
//     tests' warp emulator's, so that the host a CUDA build ships is the one they run. A Python launcher is an object
//     with
//         name: str                 named in errors ("cupy", "emulator")
//         device_type: str          the device type of its tensors ("cuda", "cpu")
//         num_sms(device: int) -> int
//         capturing(device: int) -> bool    the current stream captures a CUDA graph (offsets are then not read)
//         launch(kernel: str, grid: Grid, params: bytes) -> None
//     where launch runs kernel `kernel` (a kernel_table() name) over `grid` on the current stream, with `params`, the
//     bytes of a launch.h params struct, as its one argument, passed by value.
#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include <cstddef>
#include <string>
#include <utility>

// pybind11's own types have hidden visibility, and GCC warns when a bound type is more visible than they are; the
// launch.h structs never cross a shared-library boundary, so here they are hidden too.
#pragma GCC visibility push(hidden)
#include "cuda/kernels/kernel_table.h"
#include "cuda/kernels/launch.h"
#pragma GCC visibility pop

#include "host/hosts.h"

namespace bridge_ops {
namespace {

namespace py = pybind11;
namespace kn = bridge_ops::kernels;

py::dict constants() {
  py::dict c;
  c["warp_size"] = kn::kWarpSize;
  c["smem_limit"] = kn::kSmemLimit;
  c["key_tile"] = kn::kKeyTile;
  c["rows_per_pass"] = kn::kRowsPerPass;
  c["lanes_per_row"] = kn::kLanesPerRow;
  c["chunk_dims"] = kn::kChunkDims;
  py::tuple tds(kn::kNumTd);
  for (int i = 0; i < kn::kNumTd; ++i) tds[i] = kn::kTdValues[i];
  c["td_values"] = tds;
  c["max_td"] = kn::kMaxTd;
  c["max_warps"] = kn::kMaxWarps;
  c["simple_threads"] = kn::kSimpleThreads;
  c["cascade_threads"] = kn::kCascadeThreads;
  c["cascade_chunk_keys"] = kn::kCascadeChunkKeys;
  c["cascade_max_td"] = kn::kCascadeMaxTd;
  return c;
}

std::string plan_repr(const kn::LaunchPlan& p) {
  return "LaunchPlan(fast=" + std::string(p.fast ? "True" : "False") + ", td=" + std::to_string(p.td) +
         ", threads=" + std::to_string(p.threads) + ", blocks=" + std::to_string(p.blocks) +
         ", smem_bytes=" + std::to_string(p.smem_bytes) + ", workspace=" + (p.workspace ? "True" : "False") + ")";
}

void bind_launch_plans(py::module_& m) {
  py::class_<kn::Grid>(m, "Grid", "A kernel's 1-D launch: blocks, threads per block, dynamic shared memory (bytes).")
      .def(
          py::init([](long long blocks, int threads, int smem_bytes) { return kn::Grid{blocks, threads, smem_bytes}; }),
          py::arg("blocks"), py::arg("threads"), py::arg("smem_bytes"))
      .def_readonly("blocks", &kn::Grid::blocks)
      .def_readonly("threads", &kn::Grid::threads)
      .def_readonly("smem_bytes", &kn::Grid::smem_bytes)
      .def("__repr__", [](const kn::Grid& g) {
        return "Grid(blocks=" + std::to_string(g.blocks) + ", threads=" + std::to_string(g.threads) +
               ", smem_bytes=" + std::to_string(g.smem_bytes) + ")";
      });
  py::class_<kn::LaunchPlan>(m, "LaunchPlan", "How one bridge_attention kernel is launched (launch.h).")
      .def(py::init([](bool fast, int td, int threads, long long blocks, int smem_bytes, bool workspace) {
             return kn::LaunchPlan{fast, td, threads, blocks, smem_bytes, workspace};
           }),
           py::arg("fast"), py::arg("td"), py::arg("threads"), py::arg("blocks"), py::arg("smem_bytes"),
           py::arg("workspace"))
      .def_readonly("fast", &kn::LaunchPlan::fast)
      .def_readonly("td", &kn::LaunchPlan::td)
      .def_readonly("threads", &kn::LaunchPlan::threads)
      .def_readonly("blocks", &kn::LaunchPlan::blocks)
      .def_readonly("smem_bytes", &kn::LaunchPlan::smem_bytes)
      .def_readonly("workspace", &kn::LaunchPlan::workspace)
      .def(
          "__eq__",
          [](const kn::LaunchPlan& a, const kn::LaunchPlan& b) {
            return a.fast == b.fast && a.td == b.td && a.threads == b.threads && a.blocks == b.blocks &&
                   a.smem_bytes == b.smem_bytes && a.workspace == b.workspace;
          },
          py::is_operator())
      .def("__repr__", &plan_repr);
  m.def("plan_launch", &kn::plan_launch, py::arg("is_double"), py::arg("dim"), py::arg("tasks"), py::arg("num_sms"),
        py::arg("backward"), py::arg("max_group"),
        "The launch plan of a bridge_attention call: tasks = S * G * H; max_group -1 when unknown.");
  m.def("forward_smem_bytes_per_warp", &kn::forward_smem_bytes_per_warp, py::arg("td"));
  m.def("backward_smem_bytes_per_warp", &kn::backward_smem_bytes_per_warp, py::arg("td"));
}

py::list kernel_table() {
  py::list table;
  kn::for_each_kernel([&](auto instance) {
    using Instance = decltype(instance);
    table.append(py::make_tuple(Instance::name(), kn::dtype_name(Instance::dtype), kn::source_file(Instance::kernel)));
  });
  return table;
}

// A launcher written in Python (the protocol above); calls into it hold the GIL, as the host functions bound below
// do throughout.
class PythonLauncher final : public Launcher {
 public:
  explicit PythonLauncher(py::object launcher)
      : launcher_(std::move(launcher)),
        name_(py::str(launcher_.attr("name"))),
        device_type_(c10::Device(py::str(launcher_.attr("device_type")).cast<std::string>()).type()) {}

  const std::string& name() const override { return name_; }
  c10::DeviceType device_type() const override { return device_type_; }
  int num_sms(c10::DeviceIndex device) override { return launcher_.attr("num_sms")(device).cast<int>(); }
  bool capturing(c10::DeviceIndex device) override { return launcher_.attr("capturing")(device).cast<bool>(); }
  void launch(const std::string& kernel, const kn::Grid& grid, const void* params, size_t params_bytes) override {
    launcher_.attr("launch")(kernel, grid, py::bytes(static_cast<const char*>(params), params_bytes));
  }

 private:
  py::object launcher_;
  std::string name_;
  c10::DeviceType device_type_;
};

void bind_hosts(py::module_& m) {
  m.def(
      "bridge_attention",
      [](py::object launcher, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
        PythonLauncher l(std::move(launcher));
        return host::bridge_attention(l, q, k, v, cu_group_lens, key_mask, scale);
      },
      py::arg("launcher"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("cu_group_lens"),
      py::arg("key_mask") = py::none(), py::arg("scale") = py::none(),
      "The C++ host of the op bridge_attention (same arguments and results), launching through `launcher`.");
  m.def(
      "bridge_attention_backward",
      [](py::object launcher, const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lse,
         const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
        PythonLauncher l(std::move(launcher));
        return host::bridge_attention_backward(l, grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask, scale);
      },
      py::arg("launcher"), py::arg("grad_out"), py::arg("grad_lse"), py::arg("q"), py::arg("k"), py::arg("v"),
      py::arg("lse"), py::arg("cu_group_lens"), py::arg("key_mask") = py::none(), py::arg("scale") = py::none(),
      "The C++ host of the op bridge_attention_backward, launching through `launcher`.");
  m.def(
      "cascade_attention",
      [](py::object launcher, const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
         const at::Tensor& prefix_lens, const at::Tensor& suffix_k, const at::Tensor& suffix_v,
         const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& suffix_lens, std::optional<double> scale) {
        PythonLauncher l(std::move(launcher));
        return host::cascade_attention(l, q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu_group_lens,
                                       suffix_lens, scale);
      },
      py::arg("launcher"), py::arg("q"), py::arg("prefix_k"), py::arg("prefix_v"), py::arg("prefix_lens"),
      py::arg("suffix_k"), py::arg("suffix_v"), py::arg("cu_group_lens"), py::arg("suffix_lens") = py::none(),
      py::arg("scale") = py::none(), "The C++ host of the op cascade_attention, launching through `launcher`.");
  m.def(
      "merge_attention_states",
      [](py::object launcher, const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
         const at::Tensor& lse_b) {
        PythonLauncher l(std::move(launcher));
        return host::merge_attention_states(l, o_a, lse_a, o_b, lse_b);
      },
      py::arg("launcher"), py::arg("o_a"), py::arg("lse_a"), py::arg("o_b"), py::arg("lse_b"),
      "The C++ host of the op merge_attention_states, launching through `launcher`.");
}

}  // namespace

void bind_kernel_launch(py::module_& m) {
  py::module_ k = m.def_submodule("kernels", "How the CUDA kernels are launched (csrc/kernel_launch.cpp).");
  k.def("constants", &constants, "The kernels' constants (launch.h), by name.");
  k.def("kernel_table", &kernel_table,
        "Every kernel instantiation a host may launch (kernel_table.h): (name, dtype, source header) tuples; the name "
        "is the C++ name and NVRTC name expression, the dtype as torch spells it (\"bfloat16\").");
  bind_launch_plans(k);
  bind_hosts(k);
}

}  // namespace bridge_ops
