// CUDA kernels of the cascade decode attention (cascade_attention) and of merge_attention_states.
// Built by nvcc through csrc/cuda/cuda_launcher.cu, and by g++ with BRIDGE_OPS_EMULATE for the warp emulator of the
// tests (python_tests/emulator/bridge_emulator.cpp); launched by the C++ host csrc/host/cascade_attention_host.cpp. The
// cupy backend does not compile it (it includes attention_merge.h and bridge_attention.cuh; the cascade ops fall back
// to the reference under cupy).
//
// What is computed: the contract of the CPU kernel (csrc/cpu/cascade_attention_cpu.cpp) and of the reference
// (bridge_ops/reference.py): row b of group g, query head h, over its group's prefix positions [P - prefix_lens[g], P)
// of key/value head h / (Hq / Hkv) and its own suffix positions [0, suffix_lens[b]), merged exactly by log-sum-exp.
//
// Work mapping: every block is ONE warp (no block-wide barrier anywhere), grids are 1-D.
//   1. cascade_prefix_chunks: one warp per (prefix chunk c, group g, kv head). It stages the chunk's keys (at most 32
//      positions, one per lane) in shared memory as accumulation-type rows padded to Dh + 1 (conflict-free), then, for
//      each of the group's n_g * Hq/Hkv queries in turn: lane j scores key j, a warp max/sum gives the chunk's
//      softmax, and lanes own head dims {lane + 32 t} of the output, summing p_j v_j with p_j broadcast by shuffles
//      (the values are read from global memory, coalesced along Dh, and stay in L1/L2 across the group's queries).
//      The chunk is read from DRAM once per group and head. Writes the chunk's partial (normalized out, lse) to a
//      float32 (float64) workspace [chunks, B, Hq, Dh] / [chunks, B, Hq]; chunks past a group's prompt write lse -inf.
//   2. cascade_suffix_merge: one warp per (row b, query head h). It merges the group's chunk partials, then attends
//      over the row's suffix in tiles of 32 keys (one per lane) and merges each tile, and writes out / lse.
//   3. merge_states: one warp per row of [R, Dh].
// Head dims up to kWarpSize * kCascadeMaxTd (256). Constants, the parameter structs (CascadeParams, MergeParams) and
// the launch plan (chunk length, grids, shared memory, workspace): launch.h's plan_cascade.
#pragma once

#include "../../attention_merge.h"
#include "bridge_attention.cuh"

namespace bridge_ops {
namespace kernels {

__device__ __forceinline__ float neg_inf_of(float) { return neg_inf_f(); }
__device__ __forceinline__ double neg_inf_of(double) { return neg_inf_d(); }

__device__ __forceinline__ void store_acc(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_acc(double* p, double x) { *p = x; }
__device__ __forceinline__ void store_acc(bf16_t* p, float x) { p->bits = float_to_bf16_bits(x); }
__device__ __forceinline__ void store_acc(half_t* p, float x) { p->bits = float_to_half_bits(x); }

template <typename A>
__device__ __forceinline__ A warp_max(A x) {
  for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
template <typename A>
__device__ __forceinline__ A warp_sum(A x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Positions of the keys of one (batch entry, head) of a [N, H, L, Dh] tensor (unit last stride).
template <typename T>
struct KeyView {
  const T* ptr;
  i64 sn, sh, sl;
  __device__ __forceinline__ const T* row(i64 n, i64 h, i64 l) const { return ptr + n * sn + h * sh + l * sl; }
};

// A kernel argument's keys (launch.h's KeysArg) as keys of T.
template <typename T>
__device__ __forceinline__ KeyView<T> keys_of(const KeysArg& a) {
  return KeyView<T>{static_cast<const T*>(a.ptr), a.sn, a.sh, a.sl};
}

// The running attention state of one query in a warp: lane owns dims {lane + 32 t : t < TD}.
template <typename A>
struct State {
  A o[kCascadeMaxTd];
  A lse;
};

// state <- merge(state, (o_part, lse_part)) (attention_merge.h); o_part is read only where its weight is nonzero.
template <typename A>
__device__ __forceinline__ void merge_into(State<A>& s, const A* o_part, A lse_part, int dim) {
  const MergeWeights<A> m = merge_weights(s.lse, lse_part, neg_inf_of(A(0)));
  const int lane = threadIdx.x % kWarpSize;
  for (int t = 0; t < kCascadeMaxTd; ++t) {
    const int d = lane + kWarpSize * t;
    const A part = (d < dim && m.weight_b != A(0)) ? m.weight_b * o_part[t] : A(0);
    s.o[t] = (m.weight_a != A(0) ? m.weight_a * s.o[t] : A(0)) + part;
  }
  s.lse = m.lse;
}

// Softmax attention of one query over `count` (<= 32) keys whose scores lane j holds (`score`, lanes >= count: -inf):
// o[t] = sum_j p_j v_j(dim lane + 32 t) / sum_j p_j with `value(j)` the row of key j; returns the lse. The non-finite
// policy of attention_merge.h: a key of score -inf is absent (its value is never read), a tile with no present key
// (count == 0 included) gives o = 0 and lse -inf, a NaN or +inf score gives NaN o and lse.
template <typename T, typename A, typename ValueRow>
__device__ __forceinline__ A attend_tile(A score, int count, int dim, ValueRow value, A* o) {
  const int lane = threadIdx.x % kWarpSize;
  const A neg_inf = neg_inf_of(A(0));
  for (int t = 0; t < kCascadeMaxTd; ++t) o[t] = A(0);
  const A top = warp_max(score);  // the same on every lane: the branches below are warp-uniform
  if (block_is_empty(top, neg_inf)) return neg_inf;
  const A p = lane < count ? acc_exp(score - top) : A(0);
  const A sum = warp_sum(p);
  for (int j = 0; j < count; ++j) {
    const A pj = __shfl_sync(0xffffffffu, p, j);
    if (key_is_absent(__shfl_sync(0xffffffffu, score, j), neg_inf)) continue;
    const T* v = value(j);
    for (int t = 0; t < kCascadeMaxTd; ++t) {
      const int d = lane + kWarpSize * t;
      if (d < dim) o[t] += pj * to_acc(v[d]);
    }
  }
  for (int t = 0; t < kCascadeMaxTd; ++t) o[t] /= sum;
  return block_lse(top, sum, neg_inf);
}

__device__ __forceinline__ int clamp_len(int n, int limit) { return n < 0 ? 0 : (n > limit ? limit : n); }

template <typename T, typename A>
__global__ void __launch_bounds__(kCascadeThreads) cascade_prefix_chunks(const CascadeParams params) {
  const CascadeShape& s = params.shape;
  const T* q = static_cast<const T*>(params.q);
  const KeyView<T> pk = keys_of<T>(params.prefix_k), pv = keys_of<T>(params.prefix_v);
  const int* prefix_lens = params.prefix_lens;
  const int* cu = params.cu;
  A* ws_o = static_cast<A*>(params.ws_o);
  A* ws_lse = static_cast<A*>(params.ws_lse);
  const A scale = static_cast<A>(params.scale);
  A* keys = reinterpret_cast<A*>(bridge_smem);  // [chunk_len][dim + 1]
  const int lane = threadIdx.x % kWarpSize;
  const long long block = blockIdx.x;
  const int chunk = (int)(block % s.chunks);
  const int hk = (int)((block / s.chunks) % s.kv_heads);
  const int g = (int)(block / ((long long)s.chunks * s.kv_heads));
  const int len = clamp_len(prefix_lens[g], s.prefix_len);
  const int start = s.prefix_len - len + chunk * s.chunk_len;
  const int count = imax(0, imin(s.chunk_len, s.prefix_len - start));
  for (int i = lane; i < count * s.dim; i += kWarpSize) {
    const int j = i / s.dim, d = i % s.dim;
    keys[j * (s.dim + 1) + d] = to_acc(pk.row(g, hk, start + j)[d]);
  }
  __syncwarp();
  const int first = clamp_len(cu[g], s.batch), end = imax(first, clamp_len(cu[g + 1], s.batch));
  const int ratio = s.q_heads / s.kv_heads, queries = (end - first) * ratio;
  for (int i = 0; i < queries; ++i) {
    const int b = first + i / ratio, h = hk * ratio + i % ratio;
    const T* qrow = q + b * params.q_sb + h * params.q_sh;
    A score = neg_inf_of(A(0));
    if (lane < count) {
      A dot = A(0);
      for (int d = 0; d < s.dim; ++d) dot += to_acc(qrow[d]) * keys[lane * (s.dim + 1) + d];
      score = dot * scale;
    }
    A o[kCascadeMaxTd];
    const A lse = attend_tile<T>(score, count, s.dim, [&](int j) { return pv.row(g, hk, start + j); }, o);
    const long long stat = ((long long)chunk * s.batch + b) * s.q_heads + h;
    for (int t = 0; t < kCascadeMaxTd; ++t) {
      const int d = lane + kWarpSize * t;
      if (d < s.dim) ws_o[stat * s.dim + d] = o[t];
    }
    if (lane == 0) ws_lse[stat] = lse;
  }
}

template <typename T, typename A>
__global__ void __launch_bounds__(kCascadeThreads) cascade_suffix_merge(const CascadeParams params) {
  const CascadeShape& s = params.shape;
  const KeyView<T> sk = keys_of<T>(params.suffix_k), sv = keys_of<T>(params.suffix_v);
  const int* suffix_lens = params.suffix_lens;
  const int* prefix_lens = params.prefix_lens;
  const int* cu = params.cu;
  const A* ws_o = static_cast<const A*>(params.ws_o);
  const A* ws_lse = static_cast<const A*>(params.ws_lse);
  T* out = static_cast<T*>(params.out);
  A* lse_out = static_cast<A*>(params.lse);
  const A scale = static_cast<A>(params.scale);
  const int lane = threadIdx.x % kWarpSize;
  const int b = (int)(blockIdx.x / s.q_heads), h = (int)(blockIdx.x % s.q_heads);
  const int hk = h / (s.q_heads / s.kv_heads);
  int lo = 0, hi = s.groups;  // the group of row b: cu[g] <= b < cu[g + 1]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (cu[mid] <= b)
      lo = mid;
    else
      hi = mid;
  }
  State<A> st;
  for (int t = 0; t < kCascadeMaxTd; ++t) st.o[t] = A(0);
  st.lse = neg_inf_of(A(0));
  const int len = clamp_len(prefix_lens[lo], s.prefix_len);
  A part[kCascadeMaxTd];
  for (int c = 0; c * s.chunk_len < len; ++c) {
    const long long stat = ((long long)c * s.batch + b) * s.q_heads + h;
    for (int t = 0; t < kCascadeMaxTd; ++t) {
      const int d = lane + kWarpSize * t;
      part[t] = d < s.dim ? ws_o[stat * s.dim + d] : A(0);
    }
    merge_into(st, part, ws_lse[stat], s.dim);
  }
  const int suffix = suffix_lens == nullptr ? s.suffix_len : clamp_len(suffix_lens[b], s.suffix_len);
  const T* qrow = static_cast<const T*>(params.q) + b * params.q_sb + h * params.q_sh;
  for (int start = 0; start < suffix; start += kWarpSize) {
    const int count = imin(kWarpSize, suffix - start);
    A score = neg_inf_of(A(0));
    if (lane < count) {
      const T* k = sk.row(b, hk, start + lane);
      A dot = A(0);
      for (int d = 0; d < s.dim; ++d) dot += to_acc(qrow[d]) * to_acc(k[d]);
      score = dot * scale;
    }
    const A tile_lse = attend_tile<T>(score, count, s.dim, [&](int j) { return sv.row(b, hk, start + j); }, part);
    merge_into(st, part, tile_lse, s.dim);
  }
  const long long row = (long long)b * s.q_heads + h;
  for (int t = 0; t < kCascadeMaxTd; ++t) {
    const int d = lane + kWarpSize * t;
    if (d < s.dim) store_acc(out + row * s.dim + d, st.o[t]);
  }
  if (lane == 0) lse_out[row] = st.lse;
}

// merge_attention_states over rows of contiguous [R, Dh] tensors, one warp per row.
template <typename T, typename A>
__global__ void __launch_bounds__(kCascadeThreads) merge_states(const MergeParams params) {
  const T* o_a = static_cast<const T*>(params.o_a);
  const T* o_b = static_cast<const T*>(params.o_b);
  const A* lse_a = static_cast<const A*>(params.lse_a);
  const A* lse_b = static_cast<const A*>(params.lse_b);
  T* out = static_cast<T*>(params.out);
  A* lse_out = static_cast<A*>(params.lse);
  const int dim = params.dim;
  const int lane = threadIdx.x % kWarpSize;
  const long long row = blockIdx.x;
  State<A> st;
  A part[kCascadeMaxTd];
  for (int t = 0; t < kCascadeMaxTd; ++t) {
    const int d = lane + kWarpSize * t;
    st.o[t] = d < dim ? to_acc(o_a[row * dim + d]) : A(0);
    part[t] = d < dim ? to_acc(o_b[row * dim + d]) : A(0);
  }
  st.lse = lse_a[row];
  merge_into(st, part, lse_b[row], dim);  // a side of weight 0 (an empty one) is never read
  for (int t = 0; t < kCascadeMaxTd; ++t) {
    const int d = lane + kWarpSize * t;
    if (d < dim) store_acc(out + row * dim + d, st.o[t]);
  }
  if (lane == 0) lse_out[row] = st.lse;
}

}  // namespace kernels
}  // namespace bridge_ops
