// How the CUDA kernels are launched, for their Python hosts: the cupy backend (bridge_ops/cupy_backend.py) and the
// tests' warp emulator (python_tests/emulator_launcher.py). Built into every _C, CPU-only builds included, so that
// those hosts follow the launchers of csrc/cuda/*.cu instead of re-deriving them:
//   * bridge_ops._C.kernels: csrc/cuda/kernels/launch.h as Python sees it: its constants, plan_launch and
//     plan_cascade, and the kernels' parameter structs (filled by field name, passed to a launch as to_bytes());
//   * the op bridge_ops::_validated_max_group (schema in bridge_ops.cpp): csrc/group_validation.h's once-per-tensor
//     check of cu_group_lens, the same cache the CUDA launchers use.
#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "checks.h"
#include "group_validation.h"

// pybind11's own types have hidden visibility, and GCC warns when a bound type is more visible than they are; the
// launch.h structs never cross a shared-library boundary, so here they are hidden too.
#pragma GCC visibility push(hidden)
#include "cuda/kernels/launch.h"
#pragma GCC visibility pop

namespace bridge_ops {
namespace {

namespace py = pybind11;
namespace kn = bridge_ops::kernels;

// A pointer field as a Python int (an address, e.g. tensor.data_ptr(); 0 for null).
template <typename Class, typename Pointer>
void pointer_field(py::class_<Class>& c, const char* name, Pointer Class::* field) {
  c.def_property(
      name, [field](const Class& s) { return reinterpret_cast<std::uintptr_t>(s.*field); },
      [field](Class& s, std::uintptr_t address) { s.*field = reinterpret_cast<Pointer>(address); });
}

// The struct's bytes, as a kernel receives it by value (cuLaunchKernel's kernelParams entry points at them).
template <typename Struct>
py::bytes to_bytes(const Struct& s) {
  return py::bytes(reinterpret_cast<const char*>(&s), sizeof(Struct));
}

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

void bind_bridge_attention(py::module_& m) {
  py::class_<kn::LaunchPlan>(m, "LaunchPlan", "How one bridge_attention kernel is launched (launch.h).")
      .def(py::init([](bool fast, int td, int threads, long long blocks, int smem_bytes, bool workspace) {
             return kn::LaunchPlan{fast, td, threads, blocks, smem_bytes, workspace};
           }),
           py::arg("fast"), py::arg("td"), py::arg("threads"), py::arg("blocks"), py::arg("smem_bytes"),
           py::arg("workspace"))
      .def_readwrite("fast", &kn::LaunchPlan::fast)
      .def_readwrite("td", &kn::LaunchPlan::td)
      .def_readwrite("threads", &kn::LaunchPlan::threads)
      .def_readwrite("blocks", &kn::LaunchPlan::blocks)
      .def_readwrite("smem_bytes", &kn::LaunchPlan::smem_bytes)
      .def_readwrite("workspace", &kn::LaunchPlan::workspace)
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
  m.def("td_for_head_dim", &kn::td_for_head_dim, py::arg("dim"));
  m.def("forward_smem_bytes_per_warp", &kn::forward_smem_bytes_per_warp, py::arg("td"));
  m.def("backward_smem_bytes_per_warp", &kn::backward_smem_bytes_per_warp, py::arg("td"));

  py::class_<kn::RowsArg> rows(m, "RowsArg", "Rows of a [B, S, H, Dh] tensor: data pointer, strides of B, S, H.");
  rows.def(py::init([](std::uintptr_t ptr, long long sb, long long ss, long long sh) {
             return kn::RowsArg{reinterpret_cast<void*>(ptr), sb, ss, sh};
           }),
           py::arg("ptr"), py::arg("sb"), py::arg("ss"), py::arg("sh"))
      .def_readwrite("sb", &kn::RowsArg::sb)
      .def_readwrite("ss", &kn::RowsArg::ss)
      .def_readwrite("sh", &kn::RowsArg::sh);
  pointer_field(rows, "ptr", &kn::RowsArg::ptr);

  py::class_<kn::Problem> problem(m, "Problem", "Sizes, groups, key mask and scale of a bridge_attention call.");
  problem.def(py::init<>())
      .def_readwrite("mask_sb", &kn::Problem::mask_sb)
      .def_readwrite("mask_ss", &kn::Problem::mask_ss)
      .def_readwrite("scale", &kn::Problem::scale)
      .def_readwrite("batch", &kn::Problem::batch)
      .def_readwrite("seqlen", &kn::Problem::seqlen)
      .def_readwrite("heads", &kn::Problem::heads)
      .def_readwrite("dim", &kn::Problem::dim)
      .def_readwrite("groups", &kn::Problem::groups)
      .def_readwrite("aligned", &kn::Problem::aligned);
  pointer_field(problem, "cu", &kn::Problem::cu);
  pointer_field(problem, "mask", &kn::Problem::mask);

  py::class_<kn::ForwardParams> fwd(m, "ForwardParams", "The parameters of bridge_attention_fwd(_simple).");
  fwd.def(py::init<>())
      .def_readwrite("problem", &kn::ForwardParams::problem)
      .def_readwrite("q", &kn::ForwardParams::q)
      .def_readwrite("k", &kn::ForwardParams::k)
      .def_readwrite("v", &kn::ForwardParams::v)
      .def_readwrite("out", &kn::ForwardParams::out)
      .def("rows_aligned", py::overload_cast<const kn::ForwardParams&, int>(&kn::rows_aligned), py::arg("element_size"),
           "Problem.aligned of a fast-path call: every row 4-element aligned and head_dim % 4 == 0.")
      .def("to_bytes", &to_bytes<kn::ForwardParams>);
  pointer_field(fwd, "lse", &kn::ForwardParams::lse);

  py::class_<kn::BackwardParams> bwd(m, "BackwardParams", "The parameters of bridge_attention_bwd(_simple).");
  bwd.def(py::init<>())
      .def_readwrite("problem", &kn::BackwardParams::problem)
      .def_readwrite("dout", &kn::BackwardParams::dout)
      .def_readwrite("q", &kn::BackwardParams::q)
      .def_readwrite("k", &kn::BackwardParams::k)
      .def_readwrite("v", &kn::BackwardParams::v)
      .def_readwrite("dq", &kn::BackwardParams::dq)
      .def_readwrite("dk", &kn::BackwardParams::dk)
      .def_readwrite("dv", &kn::BackwardParams::dv)
      .def("rows_aligned", py::overload_cast<const kn::BackwardParams&, int>(&kn::rows_aligned),
           py::arg("element_size"))
      .def("to_bytes", &to_bytes<kn::BackwardParams>);
  pointer_field(bwd, "lse", &kn::BackwardParams::lse);
  pointer_field(bwd, "dlse", &kn::BackwardParams::dlse);
  pointer_field(bwd, "ws", &kn::BackwardParams::ws);
}

void bind_cascade(py::module_& m) {
  py::class_<kn::CascadeShape>(m, "CascadeShape", "The shape argument of the cascade kernels.")
      .def_readonly("batch", &kn::CascadeShape::batch)
      .def_readonly("q_heads", &kn::CascadeShape::q_heads)
      .def_readonly("kv_heads", &kn::CascadeShape::kv_heads)
      .def_readonly("dim", &kn::CascadeShape::dim)
      .def_readonly("groups", &kn::CascadeShape::groups)
      .def_readonly("prefix_len", &kn::CascadeShape::prefix_len)
      .def_readonly("suffix_len", &kn::CascadeShape::suffix_len)
      .def_readonly("chunks", &kn::CascadeShape::chunks)
      .def_readonly("chunk_len", &kn::CascadeShape::chunk_len)
      .def("to_bytes", &to_bytes<kn::CascadeShape>);
  py::class_<kn::CascadePlan>(m, "CascadePlan", "How the cascade kernels of one prefix_suffix_attention call run.")
      .def_readonly("shape", &kn::CascadePlan::shape)
      .def_readonly("prefix_blocks", &kn::CascadePlan::prefix_blocks)
      .def_readonly("prefix_smem_bytes", &kn::CascadePlan::prefix_smem_bytes)
      .def_readonly("merge_blocks", &kn::CascadePlan::merge_blocks)
      .def_readonly("workspace_chunks", &kn::CascadePlan::workspace_chunks);
  m.def("plan_cascade", &kn::plan_cascade, py::arg("batch"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("dim"),
        py::arg("groups"), py::arg("prefix_len"), py::arg("suffix_len"), py::arg("acc_bytes"));
}

// Largest group of cu_group_lens (int32 [G + 1], any device), validated like the CPU op and cached per tensor and
// version counter (csrc/group_validation.h). The caller does not call it during CUDA graph capture.
int64_t validated_max_group_op(const at::Tensor& cu_group_lens, int64_t batch) {
  BRIDGE_CHECK(cu_group_lens.scalar_type() == at::kInt && cu_group_lens.dim() == 1 && cu_group_lens.numel() >= 2,
               "cu_group_lens must be int32 [G+1] with G >= 1, got ", cu_group_lens.scalar_type(), " of shape ",
               cu_group_lens.sizes());
  return validated_max_group(cu_group_lens, batch, true, [](const at::Tensor& t) { return t.cpu().contiguous(); });
}

}  // namespace

void bind_kernel_launch(py::module_& m) {
  py::module_ k = m.def_submodule("kernels", "How the CUDA kernels are launched (csrc/cuda/kernels/launch.h).");
  k.def("constants", &constants, "The kernels' constants (launch.h), by name.");
  bind_bridge_attention(k);
  bind_cascade(k);
}

TORCH_LIBRARY_IMPL(bridge_ops, CompositeExplicitAutograd, m) {
  m.impl("_validated_max_group", &validated_max_group_op);
}

}  // namespace bridge_ops
