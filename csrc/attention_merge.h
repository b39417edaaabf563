// Exact merge of two partial attention results over disjoint key sets (the cascade's log-sum-exp merge), shared by
// the CPU kernels (csrc/cpu/cascade_attention_cpu.cpp) and the CUDA kernels (csrc/cuda/kernels/cascade_attention.cuh).
//
// A partial result over key set A is (o_A, lse_A): o_A = sum_{j in A} softmax_A(s)_j v_j, lse_A = logsumexp_{j in A}
// s_j. Over A u B:  lse = logaddexp(lse_A, lse_B),  o = exp(lse_A - lse) o_A + exp(lse_B - lse) o_B.
// An empty key set has lse = -inf or +inf (its o is ignored); two empty sets merge to o = 0, lse = -inf.
//
// Non-finite scores (the policy of cascade_attention, bridge_ops/ops.py, and of its reference), applied by both
// kernels through the helpers below, per block of keys (a CPU key block, a CUDA tile or chunk):
//   - a score of -inf is an ABSENT key, as a masked position: weight 0 and its value is never read (an inf or NaN
//     there does not reach the output); a block whose scores are all -inf is empty (o = 0, lse = -inf), never
//     exp(-inf - (-inf)) = NaN; a row whose keys are all absent gets o = 0, lse = -inf;
//   - a NaN or +inf score makes exp(s - max) NaN: the block's o and lse are NaN, and the merges carry the NaN on (a
//     block never has lse +inf, which the merge would read as an empty side);
//   - a value of +-inf or NaN behind a present key reaches o as IEEE arithmetic has it (+-inf or NaN), as in SDPA;
//     where the key's weight underflows to 0 (its score ~87 below the row's max in float32, ~708 in float64), whether
//     it shows depends on how the keys are blocked (the merges skip a side of weight 0).
// No includes beyond <cmath> on the host, so nvcc and the warp emulator compile it as it is.
#pragma once

#if defined(__CUDACC__)
#define BRIDGE_OPS_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define BRIDGE_OPS_HD inline
#endif

namespace bridge_ops {

// The non-finite policy above, for one block of keys whose largest score (a NaN-propagating max) is `top`.
template <typename A>
BRIDGE_OPS_HD bool key_is_absent(A score, A neg_inf) {
  return score == neg_inf;
}
template <typename A>
BRIDGE_OPS_HD bool block_is_empty(A top, A neg_inf) {
  return top == neg_inf;  // every key absent (or none): skip the block, o = 0 and lse = -inf
}
// The lse of a block from `top` and sum = sum_j exp(s_j - top) over its present keys: -inf for an empty block (sum 0),
// NaN when a score is NaN or +inf (sum NaN), top + log(sum) otherwise.
template <typename A>
BRIDGE_OPS_HD A block_lse(A top, A sum, A neg_inf) {
#if !defined(__CUDA_ARCH__)
  using std::log;
#endif
  return sum == A(0) ? neg_inf : top + log(sum);
}

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
