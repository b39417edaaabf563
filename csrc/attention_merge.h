// Exact merge of two partial attention results over disjoint key sets (the cascade's log-sum-exp merge), shared by
// the CPU kernels (csrc/cpu/prefix_attention_cpu.cpp) and the CUDA kernels (csrc/cuda/kernels/prefix_attention.cuh).
//
// A partial result over key set A is (o_A, lse_A): o_A = sum_{j in A} softmax_A(s)_j v_j, lse_A = logsumexp_{j in A}
// s_j. Over A u B:  lse = logaddexp(lse_A, lse_B),  o = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B.
// An empty key set has lse = -inf or +inf (its o is ignored); two empty sets merge to o = 0, lse = -inf.
// No includes beyond <cmath> on the host, so nvcc and the warp emulator compile it as it is.
#pragma once

#if defined(__CUDACC__)
#define BRIDGE_OPS_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define BRIDGE_OPS_HD inline
#endif

namespace bridge_ops {

template <typename A>
struct MergeWeights {
  A weight_a, weight_b, lse;
};

// Weights of o_A and o_B in the merged output, and the merged lse. -inf is spelled `neg_inf` so that device code
// needs no <limits>. A lse of +inf also marks an empty side (how FlashAttention-2 and vLLM mark an empty split: vLLM's
// merge_attn_states treats it so too); a NaN lse makes the weights and the merged lse NaN.
template <typename A>
BRIDGE_OPS_HD MergeWeights<A> merge_weights(A lse_a, A lse_b, A neg_inf) {
#if !defined(__CUDA_ARCH__)
  using std::exp;  // host code; device code calls the float/double overloads of exp and log of CUDA's math API
  using std::log;
#endif
  if (lse_a == -neg_inf) lse_a = neg_inf;
  if (lse_b == -neg_inf) lse_b = neg_inf;
  const A top = (lse_a != lse_a || lse_a > lse_b) ? lse_a : lse_b;  // NaN-propagating max
  if (top == neg_inf) return {A(0), A(0), neg_inf};
  const A ea = exp(lse_a - top), eb = exp(lse_b - top), sum = ea + eb;
  return {ea / sum, eb / sum, top + log(sum)};
}

}  // namespace bridge_ops
