// Every kernel instantiation a host may launch, named once. The C++ hosts (csrc/host/) name the kernel of a call with
// kernel_name(); the launchers resolve that name: the nvcc launcher (csrc/cuda/cuda_launcher.cu) and the tests' warp
// emulator (python_tests/emulator) instantiate every entry of for_each_kernel() through kernel_table.cuh, and the cupy
// backend compiles the same names with NVRTC (read through bridge_ops._C.kernels.kernel_table()). Host code only (no
// CUDA, no torch): the kernels' storage types are only named here.
#pragma once

#include <string>

#include "launch.h"

namespace bridge_ops {
namespace kernels {

struct bf16_t;  // bridge_attention.cuh: the 16-bit storage types, as bits
struct half_t;

// The dtype of a call's tensors; per dtype the kernels' storage type T and accumulation type A (float64 for float64,
// float32 otherwise).
enum class Dtype { kFloat32, kFloat64, kFloat16, kBFloat16 };

enum class Kernel {
  kBridgeFwd,        // bridge_attention_fwd<T, TD>(ForwardParams): the fast path (no float64), TD in kTdValues
  kBridgeBwd,        // bridge_attention_bwd<T, TD>(BackwardParams)
  kBridgeFwdSimple,  // bridge_attention_fwd_simple<T, A>(ForwardParams): float64, head_dim > 256
  kBridgeBwdSimple,  // bridge_attention_bwd_simple<T, A>(BackwardParams)
  kCascadePrefix,    // cascade_prefix_chunks<T, A>(CascadeParams)
  kCascadeMerge,     // cascade_suffix_merge<T, A>(CascadeParams)
  kMergeStates,      // merge_states<T, A>(MergeParams)
};

inline const char* dtype_name(Dtype d) {  // as torch spells it (torch.float32 -> "float32")
  switch (d) {
    case Dtype::kFloat32: return "float32";
    case Dtype::kFloat64: return "float64";
    case Dtype::kFloat16: return "float16";
    case Dtype::kBFloat16: return "bfloat16";
  }
  return "";
}
inline const char* storage_type_name(Dtype d) {
  switch (d) {
    case Dtype::kFloat32: return "float";
    case Dtype::kFloat64: return "double";
    case Dtype::kFloat16: return "bridge_ops::kernels::half_t";
    case Dtype::kBFloat16: return "bridge_ops::kernels::bf16_t";
  }
  return "";
}
inline const char* acc_type_name(Dtype d) { return d == Dtype::kFloat64 ? "double" : "float"; }

inline const char* template_name(Kernel k) {
  switch (k) {
    case Kernel::kBridgeFwd: return "bridge_attention_fwd";
    case Kernel::kBridgeBwd: return "bridge_attention_bwd";
    case Kernel::kBridgeFwdSimple: return "bridge_attention_fwd_simple";
    case Kernel::kBridgeBwdSimple: return "bridge_attention_bwd_simple";
    case Kernel::kCascadePrefix: return "cascade_prefix_chunks";
    case Kernel::kCascadeMerge: return "cascade_suffix_merge";
    case Kernel::kMergeStates: return "merge_states";
  }
  return "";
}
// The kernel header that defines it (the cupy backend compiles bridge_attention.cuh only).
inline const char* source_file(Kernel k) {
  return k == Kernel::kCascadePrefix || k == Kernel::kCascadeMerge || k == Kernel::kMergeStates
             ? "cascade_attention.cuh"
             : "bridge_attention.cuh";
}
inline bool takes_td(Kernel k) { return k == Kernel::kBridgeFwd || k == Kernel::kBridgeBwd; }

// The C++ name of an instantiation, which is also its NVRTC name expression: the fast kernels <T, td>, the others
// <T, A> (td unused), e.g. "bridge_ops::kernels::bridge_attention_fwd<bridge_ops::kernels::bf16_t, 4>".
inline std::string kernel_name(Kernel k, Dtype d, int td) {
  const std::string second = takes_td(k) ? std::to_string(td) : std::string(acc_type_name(d));
  return std::string("bridge_ops::kernels::") + template_name(k) + "<" + storage_type_name(d) + ", " + second + ">";
}

// One entry of the table, as types: kernel K over dtype D with storage type T, accumulation type A, register layout TD
// (0 for the kernels without one).
template <Kernel K, Dtype D, typename T, typename A, int TD>
struct Instance {
  static constexpr Kernel kernel = K;
  static constexpr Dtype dtype = D;
  using storage = T;
  using acc = A;
  static constexpr int td = TD;
  static std::string name() { return kernel_name(K, D, TD); }
};

namespace detail {

template <Dtype D, typename T, typename A, int I, typename Visitor>
void visit_fast(Visitor& visit) {
  constexpr int TD = kTdValues[I];
  visit(Instance<Kernel::kBridgeFwd, D, T, A, TD>{});
  visit(Instance<Kernel::kBridgeBwd, D, T, A, TD>{});
  if constexpr (I + 1 < kNumTd) visit_fast<D, T, A, I + 1>(visit);
}

template <Dtype D, typename T, typename A, typename Visitor>
void visit_dtype(Visitor& visit) {
  if constexpr (D != Dtype::kFloat64) visit_fast<D, T, A, 0>(visit);
  visit(Instance<Kernel::kBridgeFwdSimple, D, T, A, 0>{});
  visit(Instance<Kernel::kBridgeBwdSimple, D, T, A, 0>{});
  visit(Instance<Kernel::kCascadePrefix, D, T, A, 0>{});
  visit(Instance<Kernel::kCascadeMerge, D, T, A, 0>{});
  visit(Instance<Kernel::kMergeStates, D, T, A, 0>{});
}

}  // namespace detail

// Calls visit(Instance<...>{}) for every kernel instantiation a host may launch: per dtype, the fast Bridge kernels of
// every register layout (not for float64), the simple ones, the cascade kernels.
template <typename Visitor>
void for_each_kernel(Visitor&& visit) {
  detail::visit_dtype<Dtype::kFloat32, float, float>(visit);
  detail::visit_dtype<Dtype::kFloat64, double, double>(visit);
  detail::visit_dtype<Dtype::kFloat16, half_t, float>(visit);
  detail::visit_dtype<Dtype::kBFloat16, bf16_t, float>(visit);
}

}  // namespace kernels
}  // namespace bridge_ops
