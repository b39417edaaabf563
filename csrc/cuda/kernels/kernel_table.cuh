// The kernel function of each entry of kernel_table.h, for the launchers that compile the kernels themselves (the
// nvcc launcher, csrc/cuda/cuda_launcher.cu, and the tests' warp emulator, python_tests/emulator):
//   for_each_kernel([&](auto entry) { table[entry.name()] = kernel_function<decltype(entry)>(); });
// ParamsOf<decltype(kernel_function<I>())>::type is the params struct (launch.h) the kernel takes by value.
#pragma once

#include "cascade_attention.cuh"
#include "kernel_table.h"

namespace bridge_ops {
namespace kernels {

// A pointer to the __global__ function of entry I, typed by the params struct it takes (void (*)(Params)).
template <typename I>
constexpr auto kernel_function() {
  using T = typename I::storage;
  using A = typename I::acc;
  if constexpr (I::kernel == Kernel::kBridgeFwd) {
    return &bridge_attention_fwd<T, I::td>;
  } else if constexpr (I::kernel == Kernel::kBridgeBwd) {
    return &bridge_attention_bwd<T, I::td>;
  } else if constexpr (I::kernel == Kernel::kBridgeFwdSimple) {
    return &bridge_attention_fwd_simple<T, A>;
  } else if constexpr (I::kernel == Kernel::kBridgeBwdSimple) {
    return &bridge_attention_bwd_simple<T, A>;
  } else if constexpr (I::kernel == Kernel::kCascadePrefix) {
    return &cascade_prefix_chunks<T, A>;
  } else if constexpr (I::kernel == Kernel::kCascadeMerge) {
    return &cascade_suffix_merge<T, A>;
  } else {
    static_assert(I::kernel == Kernel::kMergeStates, "every Kernel has a function");
    return &merge_states<T, A>;
  }
}

template <typename Function>
struct ParamsOf;
template <typename Params>
struct ParamsOf<void (*)(Params)> {
  using type = Params;
};

}  // namespace kernels
}  // namespace bridge_ops
