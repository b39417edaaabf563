// The one seam between the C++ hosts of the CUDA kernels (csrc/host/*.cpp) and the machinery that runs a kernel.
//
// A host is device-agnostic ATen code: it checks the arguments (csrc/checks.h), makes the inputs' last stride 1, plans
// the launch (launch.h), allocates outputs and workspaces, fills the kernel's params struct and casts the results. It
// runs a kernel only through a Launcher, by name (kernel_table.h), so that one host serves every launcher:
//   * CudaLauncher (csrc/cuda/cuda_launcher.cu): the kernels nvcc compiled into _C, launched with <<<>>> on the
//     current CUDA stream; bound as the ops' CUDA kernels (TORCH_LIBRARY_IMPL(bridge_ops, CUDA, ...));
//   * PythonLauncher (csrc/kernel_launch.cpp): a Python object, for the cupy backend (the kernels compiled by NVRTC,
//     bridge_ops/cupy_backend.py) and the tests' warp emulator (python_tests/emulator_launcher.py), which runs the
//     kernels on the CPU, so that CPU CI runs the very hosts a CUDA build ships.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../checks.h"
#include "../cuda/kernels/kernel_table.h"
#include "../cuda/kernels/launch.h"
#include "../group_validation.h"

namespace bridge_ops {

class Launcher {
 public:
  virtual ~Launcher() = default;

  // Named in error messages ("cuda", "cupy", "emulator").
  virtual const std::string& name() const = 0;
  // The device type of the tensors its kernels read and write.
  virtual c10::DeviceType device_type() const = 0;
  // Multiprocessors of the device (the launch plan spreads decode-sized calls over them).
  virtual int num_sms(c10::DeviceIndex device) = 0;
  // True while the current stream of the device captures a CUDA graph: the host must not read device memory
  // (cu_group_lens is then not validated; the kernels clamp it).
  virtual bool capturing(c10::DeviceIndex device) = 0;
  // Runs kernel `kernel` (a kernel_table.h name) over `grid` on the current stream of the current device, with the
  // `params_bytes` bytes at `params` (one of launch.h's params structs) as its one argument, passed by value.
  virtual void launch(const std::string& kernel, const kernels::Grid& grid, const void* params,
                      size_t params_bytes) = 0;

  template <typename Params>
  void launch(const std::string& kernel, const kernels::Grid& grid, const Params& params) {
    launch(kernel, grid, &params, sizeof(Params));
  }
};

// Argument `name` must be on the launcher's device type. Checked before the device guard, so that a tensor on the
// wrong device is named in a ValueError rather than failing in the guard.
inline void check_launcher_device(const Launcher& launcher, const at::Tensor& t, const char* name) {
  BRIDGE_CHECK(t.device().type() == launcher.device_type(), "the ", launcher.name(), " kernels take ",
               c10::DeviceTypeName(launcher.device_type(), true), " tensors, got ", name, " on ", t.device());
}

// The largest group of cu_group_lens (shape, dtype and device checked), validated once per tensor and version
// counter (group_validation.h: one device-to-host copy per tensor a decode loop reuses); -1, not read, while the
// launcher's stream captures a CUDA graph. Under the device guard.
inline int64_t validated_max_group(Launcher& launcher, const at::Tensor& cu_group_lens, int64_t batch) {
  const bool may_read = !launcher.capturing(cu_group_lens.device().index());
  return validated_max_group(cu_group_lens, batch, may_read, [](const at::Tensor& t) { return t.cpu().contiguous(); });
}

// The kernels' dtype of a tensor dtype: float32, float64, float16 or bfloat16 (checks.h refuses the others first).
inline kernels::Dtype kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return kernels::Dtype::kFloat32;
    case c10::kDouble: return kernels::Dtype::kFloat64;
    case c10::kHalf: return kernels::Dtype::kFloat16;
    case c10::kBFloat16: return kernels::Dtype::kBFloat16;
    default: TORCH_CHECK(false, "bridge_ops: the CUDA kernels have no dtype ", t);
  }
}

}  // namespace bridge_ops
