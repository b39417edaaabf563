// CUDA kernels of bridge_attention (forward and backward): ONE source, three builds.
//
//   * nvcc, through csrc/cuda/cuda_launcher.cu (the launcher of the ops' C++ hosts, csrc/host/, bound as their
//     TORCH_LIBRARY_IMPL(bridge_ops, CUDA) kernels);
//   * NVRTC at run time, through bridge_ops/cupy_backend.py (cupy.RawModule, name_expressions);
//   * g++ on the CPU with BRIDGE_OPS_EMULATE defined, through python_tests/emulator/ (a warp emulator that runs
//     these very kernels lane by lane, so CI checks their indexing, tiling and softmax logic without a GPU).
//
// Hence: no standard or CUDA #include (NVRTC has no standard headers here), no ATen or torch, only plain C++ and CUDA
// intrinsics; fixed-width types are spelled out; half/bfloat16 are 16-bit storage structs converted by hand. The one
// #include, launch.h, is the plain header that defines the constants, the launch plan and the parameter structs for
// the kernels and every host (the cupy backend inlines it into the source it hands NVRTC).
//
// What is computed (exactly the contract of the CPU op, csrc/cpu/bridge_attention_cpu.cpp):
//   out[b,s,h] = sum_j softmax_j(scale * q[b,s,h] . k[j,s,h]) v[j,s,h],  j over the rows of b's group whose
//   key_mask[j,s] is set, and always j = b;  lse[b,s,h] = log-sum-exp of those scaled scores (float32).
// Backward (the CPU formulas, P renormalized to cancel the rounding of the saved lse):
//   P_ij = exp(scale s_ij - lse_i) / sum_j(...),  dP_ij = dO_i . V_j,  delta_i = sum_j P_ij dP_ij,
//   dS_ij = P_ij ((dP_ij - delta_i) + dlse_i) scale,  dQ_i = sum_j dS_ij K_j,  dK_j = sum_i dS_ij Q_i,
//   dV_j = sum_i P_ij dO_i.
//
// Every kernel takes one parameter struct (launch.h: ForwardParams, BackwardParams), launched as launch.h's
// plan_launch says (grid, block, dynamic shared memory, register layout TD, workspace).
//
// Work mapping (fast path: float16 / bfloat16 / float32, head_dim <= kChunkDims * kMaxTd = 256). A *task* is one
// (position s, group g, head h); one warp owns a task, so every output element has one writer and nothing needs
// atomics or block-wide barriers (warps never wait for each other; a block is just up to kMaxWarps warps side by
// side, each with its own slice of shared memory). Tasks are numbered with h fastest, so the warps of a block read
// neighbouring heads of the same rows (contiguous memory in the [B, S, H, Dh] layout).
//   Inside a warp: kRowsPerPass = 4 row groups of kLanesPerRow = 8 lanes. A row group holds one query (or key) row in
//   registers, each lane owning the head dims {32 t + 4 c + e : t < TD, e < 4} (c = lane % 8), i.e. 16-byte float4
//   slices that 8 lanes read from shared memory as one contiguous 128-byte line (conflict-free; the 4 row groups read
//   the same line, a broadcast). A dot product is 4*TD FMAs per lane plus a 3-step xor-shuffle reduction inside the
//   row group, which leaves the bitwise-identical sum in all 8 lanes (so all lanes agree on every softmax decision).
//   The group's K/V rows are staged in shared memory as float32 tiles of kKeyTile rows x kChunkDims * TD dims (dims
//   past head_dim and rows past the group are zero-filled). A group of up to kKeyTile rows is staged once and stays;
//   a larger group is tiled: the forward runs an online softmax over the key tiles; the backward makes one
//   query-major pass (statistics, dQ) and one key-major pass (dK, dV), see bridge_attention_bwd below.
// Simple path (float64, or head_dim > 256): one thread per task, plain loops, accumulators in float64 / float32
// output buffers that the host casts to the input dtype.
//
// An S = 1 decode op can reuse this header as it is: the per-task device functions (attend_rows_forward, the
// staging and dot helpers) take row views with explicit strides, so a decode kernel over [B, H, Dh] rows of one
// position is the forward kernel with seqlen = 1 (or a kernel that calls attend_rows_forward directly).
#pragma once

#include "launch.h"

// Minimum resident blocks per multiprocessor asked of the compiler (__launch_bounds__): 1 lets it use up to 255
// registers (no spills); raising it caps registers for more warps in flight. Override with -D (nvcc flags through
// BRIDGE_OPS_NVCC_FLAGS at build time, NVRTC options through BRIDGE_OPS_NVRTC_FLAGS for the cupy backend).
#ifndef BRIDGE_FWD_MIN_BLOCKS
#define BRIDGE_FWD_MIN_BLOCKS 1
#endif
#ifndef BRIDGE_BWD_MIN_BLOCKS
#define BRIDGE_BWD_MIN_BLOCKS 1
#endif

#ifdef BRIDGE_OPS_EMULATE
#include "bridge_emulator_shim.h"  // host definitions of the CUDA intrinsics used below (tests only)
#endif

namespace bridge_ops {
namespace kernels {

struct bf16_t {
  unsigned short bits;
};
struct half_t {
  unsigned short bits;
};

extern __shared__ float4 bridge_smem[];

// ---------------------------------------------------------------------------------------------------------
// Scalars: conversions, infinities, math
// ---------------------------------------------------------------------------------------------------------

__device__ __forceinline__ float neg_inf_f() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float nan_f() { return __uint_as_float(0x7fc00000u); }
__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double((long long)0xfff0000000000000ULL); }

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(bf16_t x) { return __uint_as_float(((unsigned int)x.bits) << 16); }
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
#ifdef BRIDGE_OPS_EMULATE
  return bridge_emu::half_to_float(h);
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}
__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
#ifdef BRIDGE_OPS_EMULATE
  return bridge_emu::float_to_half(f);
#else
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
}
__device__ __forceinline__ float to_acc(half_t x) { return half_bits_to_float(x.bits); }

// float -> bfloat16, round to nearest even (as c10::BFloat16); NaN stays a quiet NaN.
__device__ __forceinline__ unsigned short float_to_bf16_bits(float f) {
  const unsigned int u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ float acc_exp(float x) { return expf(x); }
__device__ __forceinline__ double acc_exp(double x) { return exp(x); }
__device__ __forceinline__ float acc_log(float x) { return logf(x); }
__device__ __forceinline__ double acc_log(double x) { return log(x); }

// max that propagates NaN (a NaN score must poison its row, as on the CPU).
template <typename A>
__device__ __forceinline__ A nan_max(A a, A b) {
  return (a != a || a > b) ? a : b;
}

__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }

// ---------------------------------------------------------------------------------------------------------
// Four-element chunks: 16-byte (float) or 8-byte (16-bit types) vector loads when the host found every pointer and
// stride aligned (and head_dim % 4 == 0); element loads with bounds otherwise.
// ---------------------------------------------------------------------------------------------------------

template <typename T>
struct Chunk;

template <>
struct Chunk<float> {
  typedef float4 raw;
  __device__ static raw zero() { return make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ static raw load_aligned(const float* p) { return *reinterpret_cast<const float4*>(p); }
  __device__ static raw load_partial(const float* p, int n) {  // n valid elements (n may be <= 0 or > 4)
    raw r = zero();
    if (n > 0) r.x = p[0];
    if (n > 1) r.y = p[1];
    if (n > 2) r.z = p[2];
    if (n > 3) r.w = p[3];
    return r;
  }
  __device__ static void unpack(const raw& r, float out[4]) {
    out[0] = r.x;
    out[1] = r.y;
    out[2] = r.z;
    out[3] = r.w;
  }
  __device__ static void store(float* p, int n, bool aligned, const float in[4]) {
    if (aligned && n >= 4) {
      *reinterpret_cast<float4*>(p) = make_float4(in[0], in[1], in[2], in[3]);
    } else {
      for (int e = 0; e < 4 && e < n; ++e) p[e] = in[e];
    }
  }
};

template <typename T>
struct Chunk16 {  // bf16_t and half_t: four 16-bit values in a uint2 (element 0 in the low half of .x)
  typedef uint2 raw;
  __device__ static raw zero() { return make_uint2(0u, 0u); }
  __device__ static raw load_aligned(const T* p) { return *reinterpret_cast<const uint2*>(p); }
  __device__ static raw load_partial(const T* p, int n) {
    unsigned int e0 = n > 0 ? p[0].bits : 0u, e1 = n > 1 ? p[1].bits : 0u;
    unsigned int e2 = n > 2 ? p[2].bits : 0u, e3 = n > 3 ? p[3].bits : 0u;
    return make_uint2(e0 | (e1 << 16), e2 | (e3 << 16));
  }
  __device__ static float lo(unsigned int w);
  __device__ static float hi(unsigned int w);
  __device__ static unsigned short bits(float f);
  __device__ static void unpack(const raw& r, float out[4]) {
    out[0] = lo(r.x);
    out[1] = hi(r.x);
    out[2] = lo(r.y);
    out[3] = hi(r.y);
  }
  __device__ static void store(T* p, int n, bool aligned, const float in[4]) {
    const unsigned short b0 = bits(in[0]), b1 = bits(in[1]), b2 = bits(in[2]), b3 = bits(in[3]);
    if (aligned && n >= 4) {
      *reinterpret_cast<uint2*>(p) = make_uint2(b0 | ((unsigned int)b1 << 16), b2 | ((unsigned int)b3 << 16));
    } else {
      if (n > 0) p[0].bits = b0;
      if (n > 1) p[1].bits = b1;
      if (n > 2) p[2].bits = b2;
      if (n > 3) p[3].bits = b3;
    }
  }
};
template <>
__device__ __forceinline__ float Chunk16<bf16_t>::lo(unsigned int w) {
  return __uint_as_float(w << 16);
}
template <>
__device__ __forceinline__ float Chunk16<bf16_t>::hi(unsigned int w) {
  return __uint_as_float(w & 0xffff0000u);
}
template <>
__device__ __forceinline__ unsigned short Chunk16<bf16_t>::bits(float f) {
  return float_to_bf16_bits(f);
}
template <>
__device__ __forceinline__ float Chunk16<half_t>::lo(unsigned int w) {
  return half_bits_to_float((unsigned short)(w & 0xffffu));
}
template <>
__device__ __forceinline__ float Chunk16<half_t>::hi(unsigned int w) {
  return half_bits_to_float((unsigned short)(w >> 16));
}
template <>
__device__ __forceinline__ unsigned short Chunk16<half_t>::bits(float f) {
  return float_to_half_bits(f);
}

template <>
struct Chunk<bf16_t> : Chunk16<bf16_t> {};
template <>
struct Chunk<half_t> : Chunk16<half_t> {};

// Rows of a [B, S, H, Dh] tensor with a unit last stride, addressed by (b, s, h).
template <typename T>
struct Rows {
  T* ptr;
  i64 sb, ss, sh;
  __device__ __forceinline__ T* row(i64 b, i64 s, i64 h) const { return ptr + b * sb + s * ss + h * sh; }
};

// A kernel argument's rows (launch.h's RowsArg) as rows of T.
template <typename T>
__device__ __forceinline__ Rows<T> rows_of(const RowsArg& a) {
  return Rows<T>{static_cast<T*>(a.ptr), a.sb, a.ss, a.sh};
}

// ---------------------------------------------------------------------------------------------------------
// The task of a warp (in the Problem of launch.h)
// ---------------------------------------------------------------------------------------------------------

struct Task {
  int s, h, n;  // position, head, group size
  i64 first;    // first row of the group
};

// Decodes task t (h fastest, then group, then position). The offsets are clamped into [0, B] and a non-increasing
// pair gives an empty group, so malformed offsets (which the hosts reject before launching whenever they can read
// them, see csrc/host/launcher.h) never make a kernel read or write out of bounds.
__device__ __forceinline__ bool decode_task(const Problem& p, i64 t, Task& task) {
  const i64 per_position = (i64)p.groups * p.heads;
  if (t >= per_position * p.seqlen) return false;
  task.s = (int)(t / per_position);
  const i64 rem = t - (i64)task.s * per_position;
  const int g = (int)(rem / p.heads);
  task.h = (int)(rem - (i64)g * p.heads);
  const int lo = imin(imax(p.cu[g], 0), p.batch);
  const int hi = imin(imax(p.cu[g + 1], lo), p.batch);
  task.first = lo;
  task.n = hi - lo;
  return task.n > 0;
}

__device__ __forceinline__ bool key_visible(const Problem& p, i64 row, int s) {
  return p.mask == nullptr || p.mask[row * p.mask_sb + (i64)s * p.mask_ss] != 0;
}

// Bit jj set: key row first + j0 + jj (jj < count) is visible. Warp-collective.
__device__ __forceinline__ unsigned int tile_visibility(const Problem& p, const Task& t, int j0, int count, int lane) {
  const bool vis = lane < count && key_visible(p, t.first + j0 + lane, t.s);
  return __ballot_sync(0xffffffffu, vis);
}

__device__ __forceinline__ i64 stat_index(const Problem& p, const Task& t, int i) {
  return ((t.first + i) * p.seqlen + t.s) * p.heads + t.h;
}

__device__ __forceinline__ unsigned int dynamic_smem_bytes() {
#ifdef BRIDGE_OPS_EMULATE
  return bridge_emu::dynamic_smem_bytes();
#else
  unsigned int r;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));
  return r;
#endif
}

// ---------------------------------------------------------------------------------------------------------
// Row registers, tiles, dot products
// ---------------------------------------------------------------------------------------------------------

// A row in registers: lane c of a row group owns dims kChunkDims t + 4 c + e.
template <int TD>
struct RowRegs {
  float x[TD][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int t = 0; t < TD; ++t) x[t][0] = x[t][1] = x[t][2] = x[t][3] = 0.f;
  }
};

// A row's raw chunks, loaded now and converted later (so several loads can be in flight at once).
template <typename T, int TD>
struct RowLoad {
  typename Chunk<T>::raw raw[TD];
  __device__ __forceinline__ void load(const T* row, int dim, bool aligned, int c) {
#pragma unroll
    for (int t = 0; t < TD; ++t) {
      const int d = kChunkDims * t + 4 * c;
      if (aligned) {
        raw[t] = d < dim ? Chunk<T>::load_aligned(row + d) : Chunk<T>::zero();
      } else {
        raw[t] = Chunk<T>::load_partial(row + d, dim - d);
      }
    }
  }
  __device__ __forceinline__ void unpack(RowRegs<TD>& r) const {
#pragma unroll
    for (int t = 0; t < TD; ++t) Chunk<T>::unpack(raw[t], r.x[t]);
  }
};

template <typename T, int TD>
__device__ __forceinline__ void load_row(const T* row, int dim, bool aligned, int c, RowRegs<TD>& r) {
  RowLoad<T, TD> l;
  l.load(row, dim, aligned, c);
  l.unpack(r);
}

template <typename T, int TD>
__device__ __forceinline__ void store_row(T* row, int dim, bool aligned, int c, const RowRegs<TD>& r, float mul) {
#pragma unroll
  for (int t = 0; t < TD; ++t) {
    const int d = kChunkDims * t + 4 * c;
    if (d < dim) {
      const float v[4] = {r.x[t][0] * mul, r.x[t][1] * mul, r.x[t][2] * mul, r.x[t][3] * mul};
      Chunk<T>::store(row + d, dim - d, aligned, v);
    }
  }
}

template <int TD>
__device__ __forceinline__ void tile_row_to_regs(const float* tile_row, int c, RowRegs<TD>& r) {
#pragma unroll
  for (int t = 0; t < TD; ++t) {
    const float4 y = *reinterpret_cast<const float4*>(tile_row + kChunkDims * t + 4 * c);
    r.x[t][0] = y.x;
    r.x[t][1] = y.y;
    r.x[t][2] = y.z;
    r.x[t][3] = y.w;
  }
}

// Sum over the row group's lanes of this lane's products; every lane of the row group gets the same value.
template <int TD>
__device__ __forceinline__ float dot_tile(const RowRegs<TD>& a, const float* tile_row, int c) {
  float acc = 0.f;
#pragma unroll
  for (int t = 0; t < TD; ++t) {
    const float4 y = *reinterpret_cast<const float4*>(tile_row + kChunkDims * t + 4 * c);
    acc = fmaf(a.x[t][0], y.x, acc);
    acc = fmaf(a.x[t][1], y.y, acc);
    acc = fmaf(a.x[t][2], y.z, acc);
    acc = fmaf(a.x[t][3], y.w, acc);
  }
  acc += __shfl_xor_sync(0xffffffffu, acc, 1);
  acc += __shfl_xor_sync(0xffffffffu, acc, 2);
  acc += __shfl_xor_sync(0xffffffffu, acc, 4);
  return acc;
}

// acc += w * tile_row (this lane's dims).
template <int TD>
__device__ __forceinline__ void axpy_tile(RowRegs<TD>& acc, float w, const float* tile_row, int c) {
#pragma unroll
  for (int t = 0; t < TD; ++t) {
    const float4 y = *reinterpret_cast<const float4*>(tile_row + kChunkDims * t + 4 * c);
    acc.x[t][0] = fmaf(w, y.x, acc.x[t][0]);
    acc.x[t][1] = fmaf(w, y.y, acc.x[t][1]);
    acc.x[t][2] = fmaf(w, y.z, acc.x[t][2]);
    acc.x[t][3] = fmaf(w, y.w, acc.x[t][3]);
  }
}

// Reductions over the 8 lanes of a row group; every lane gets the bitwise-same result.
__device__ __forceinline__ float group_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  x += __shfl_xor_sync(0xffffffffu, x, 4);
  return x;
}
__device__ __forceinline__ float group_max(float x) {
  x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, 2));
  x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, 4));
  return x;
}
// Per-key values live one per lane: lane c of a row group holds the value of key c of the current tile
// (kKeyTile == kLanesPerRow), so no register array is indexed by a run-time key index and the key loops need not be
// unrolled. slot(x, lane, jj) reads key jj's value from the row group's lane jj.
static_assert(kKeyTile == kLanesPerRow, "one key of a tile per lane of a row group");
__device__ __forceinline__ float slot(float x, int lane, int jj) {
  return __shfl_sync(0xffffffffu, x, (lane & ~(kLanesPerRow - 1)) + jj);
}

// Staging of rows row0 .. row0 + count - 1 (count <= kKeyTile) of a [B, S, H, Dh] tensor at (s, h) into a float
// tile [kKeyTile][kChunkDims TD] (every other element of the tile becomes 0), in two steps so that callers can put
// the loads of several tensors in flight before the first shared-memory store waits for any of them.
template <typename T, int TD>
struct TileLoad {
  static constexpr int CHUNKS_PER_ROW = kChunkDims * TD / 4;  // 4-element chunks
  static constexpr int ITERS = kKeyTile * CHUNKS_PER_ROW / kWarpSize;
  typename Chunk<T>::raw raw[ITERS];

  __device__ __forceinline__ void load(const Rows<const T>& a, const Problem& p, i64 row0, int count, int s, int h,
                                       int lane) {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      const int chunk = it * kWarpSize + lane;
      const int r = chunk / CHUNKS_PER_ROW;
      const int d = (chunk % CHUNKS_PER_ROW) * 4;
      raw[it] = Chunk<T>::zero();
      if (r < count) {
        const T* src = a.row(row0 + r, s, h) + d;
        if (p.aligned) {
          if (d < p.dim) raw[it] = Chunk<T>::load_aligned(src);
        } else {
          raw[it] = Chunk<T>::load_partial(src, p.dim - d);
        }
      }
    }
  }
  __device__ __forceinline__ void store(float* tile, int lane) const {
#pragma unroll
    for (int it = 0; it < ITERS; ++it) {
      float v[4];
      Chunk<T>::unpack(raw[it], v);
      reinterpret_cast<float4*>(tile)[it * kWarpSize + lane] = make_float4(v[0], v[1], v[2], v[3]);
    }
  }
};

// Stages the same rows of a and b into ta and tb. Warp-wide; the caller syncs the warp before and after. Both
// tensors' loads are in flight together when their raw chunks fit in 32 registers each (else one after the other).
template <typename T, int TD>
__device__ __forceinline__ void stage_pair(const Rows<const T>& a, const Rows<const T>& b, const Problem& p, i64 row0,
                                           int count, int s, int h, float* ta, float* tb, int lane) {
  constexpr bool kTogether = sizeof(typename Chunk<T>::raw) * TileLoad<T, TD>::ITERS <= 128;
  TileLoad<T, TD> la;
  la.load(a, p, row0, count, s, h, lane);
  if (kTogether) {
    TileLoad<T, TD> lb;
    lb.load(b, p, row0, count, s, h, lane);
    la.store(ta, lane);
    lb.store(tb, lane);
  } else {
    la.store(ta, lane);
    la.load(b, p, row0, count, s, h, lane);
    la.store(tb, lane);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Per-key helpers of the fast kernels
// ---------------------------------------------------------------------------------------------------------

// Row i sees key j0 + jj of a tile whose visibility bits are vis (tile_visibility): a visible key, or its own row.
__device__ __forceinline__ bool sees(unsigned int vis, int j0, int jj, int i) {
  return ((vis >> jj) & 1u) || j0 + jj == i;
}

// One query row against the count keys of a staged tile: lane c of each row group gets key c's score s = q . k_c and
// dP = dO . v_c (both 0 past count). Warp-uniform trip count.
template <int TD>
__device__ __forceinline__ void tile_scores_and_dp(const RowRegs<TD>& qi, const RowRegs<TD>& doi, const float* Ks,
                                                   const float* Vs, int count, int c, float& my_s, float& my_dp) {
  constexpr int DP = kChunkDims * TD;
  my_s = 0.f;
  my_dp = 0.f;
#pragma unroll 2
  for (int jj = 0; jj < count; ++jj) {
    const float sv = dot_tile<TD>(qi, Ks + jj * DP, c);
    const float dpv = dot_tile<TD>(doi, Vs + jj * DP, c);
    if (jj == c) {
      my_s = sv;
      my_dp = dpv;
    }
  }
}

// The backward's formulas, in the CPU kernel's order of operations: the probability of a score before normalization,
// exp(scale s - lse) (0 for a key the row does not see), and dS = P ((dP - delta) + dlse) scale.
__device__ __forceinline__ float unnormalized_p(bool seen, float s, float scale, float lse) {
  return seen ? expf(s * scale - lse) : 0.f;
}
template <typename A>
__device__ __forceinline__ A score_grad(A p, A dp, A delta, A dlse, A scale) {
  return p * ((dp - delta) + dlse) * scale;
}

// dQ_i += sum_jj dS_i,jj K_jj over the keys of a staged tile that row i sees; lane c of the row group holds the dS of
// key j0 + c.
template <int TD>
__device__ __forceinline__ void accumulate_dq(RowRegs<TD>& dqi, float my_ds, unsigned int vis, int j0, int count, int i,
                                              const float* Ks, int lane, int c) {
  constexpr int DP = kChunkDims * TD;
#pragma unroll 2
  for (int jj = 0; jj < count; ++jj) {
    const float ds = slot(my_ds, lane, jj);
    if (sees(vis, j0, jj, i)) axpy_tile<TD>(dqi, ds, Ks + jj * DP, c);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward (fast path)
// ---------------------------------------------------------------------------------------------------------

// out/lse of the task's rows: query rows in registers (kRowsPerPass per pass), K/V tiles in shared memory, online
// softmax over the tiles (one tile, staged once, for groups of up to kKeyTile rows).
template <typename T, int TD>
__device__ __forceinline__ void attend_rows_forward(const Problem& p, const Task& task, const Rows<const T>& Q,
                                                    const Rows<const T>& K, const Rows<const T>& V, Rows<T> O,
                                                    float* lse, float scale, float* Ks, float* Vs, int lane) {
  constexpr int DP = kChunkDims * TD;
  constexpr int KB = kKeyTile;
  const int rg = lane / kLanesPerRow, c = lane % kLanesPerRow;
  const int n = task.n, n_tiles = (n + KB - 1) / KB;
  const float NEG_INF = neg_inf_f();
  unsigned int vis = 0;
  RowRegs<TD> q, o;
  {
    // The first pass's query row is loaded together with the K/V tile: one global round trip, not two.
    RowLoad<T, TD> first_q;
    first_q.load(Q.row(task.first + imin(rg, n - 1), task.s, task.h), p.dim, p.aligned, c);
    if (n_tiles == 1) {
      stage_pair<T, TD>(K, V, p, task.first, n, task.s, task.h, Ks, Vs, lane);
      vis = tile_visibility(p, task, 0, n, lane);
      __syncwarp();
    }
    first_q.unpack(q);
  }
  for (int i0 = 0; i0 < n; i0 += kRowsPerPass) {
    const bool active = i0 + rg < n;
    const int i = imin(i0 + rg, n - 1);
    if (i0 > 0) load_row<T, TD>(Q.row(task.first + i, task.s, task.h), p.dim, p.aligned, c, q);
    o.zero();
    float m = NEG_INF, l = 0.f;
    for (int kt = 0; kt < n_tiles; ++kt) {
      const int j0 = kt * KB, count = imin(KB, n - j0);
      if (n_tiles > 1) {
        __syncwarp();
        stage_pair<T, TD>(K, V, p, task.first + j0, count, task.s, task.h, Ks, Vs, lane);
        vis = tile_visibility(p, task, j0, count, lane);
        __syncwarp();
      }
      // Lane c keeps the scaled score of key j0 + c, or -inf when this row may not see it.
      float my_s = NEG_INF;
#pragma unroll 2
      for (int jj = 0; jj < count; ++jj) {  // warp-uniform trip count
        const float d = dot_tile<TD>(q, Ks + jj * DP, c) * scale;
        if (jj == c && sees(vis, j0, jj, i)) my_s = d;
      }
      // Online softmax update, branch-free across row groups (the loops below hold warp collectives).
      const float tile_max = group_max(my_s);
      const float m_new = tile_max == NEG_INF ? m : nan_max(m, tile_max);
      const float corr = m == NEG_INF ? 0.f : expf(m - m_new);
      const float my_p = my_s == NEG_INF ? 0.f : expf(my_s - m_new);
      l = l * corr + group_sum(my_p);
#pragma unroll
      for (int t = 0; t < TD; ++t) {
        o.x[t][0] *= corr;
        o.x[t][1] *= corr;
        o.x[t][2] *= corr;
        o.x[t][3] *= corr;
      }
#pragma unroll 2
      for (int jj = 0; jj < count; ++jj) {
        const float pr = slot(my_p, lane, jj);
        if (sees(vis, j0, jj, i)) axpy_tile<TD>(o, pr, Vs + jj * DP, c);
      }
      m = m_new;
    }
    if (active) {
      store_row<T, TD>(O.row(task.first + i, task.s, task.h), p.dim, p.aligned, c, o, 1.f / l);
      if (c == 0) lse[stat_index(p, task, i)] = m + logf(l);
    }
  }
}

template <typename T, int TD>
__global__ void __launch_bounds__(kMaxThreads, BRIDGE_FWD_MIN_BLOCKS) bridge_attention_fwd(const ForwardParams params) {
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  const Problem& p = params.problem;
  Task task;
  if (!decode_task(p, (i64)blockIdx.x * warps + warp, task)) return;  // warp-uniform
  float* lse = static_cast<float*>(params.lse);
  const int per_warp = forward_smem_bytes_per_warp(TD);
  if (dynamic_smem_bytes() < (unsigned int)(warps * per_warp)) {  // a launcher bug: poison instead of overrunning
    for (int i = lane; i < task.n; i += kWarpSize) lse[stat_index(p, task, i)] = nan_f();
    return;
  }
  float* Ks = reinterpret_cast<float*>(bridge_smem) + warp * (per_warp / (int)sizeof(float));
  float* Vs = Ks + kKeyTile * kChunkDims * TD;
  attend_rows_forward<T, TD>(p, task, rows_of<const T>(params.q), rows_of<const T>(params.k),
                             rows_of<const T>(params.v), rows_of<T>(params.out), lse, (float)p.scale, Ks, Vs, lane);
}

// ---------------------------------------------------------------------------------------------------------
// Backward (fast path)
// ---------------------------------------------------------------------------------------------------------
// Groups of up to kKeyTile rows: Q, dO, K, V staged once; a query-major pass computes each row's P, dP, delta, dS and
// dQ and leaves P and dS in shared memory; a key-major pass sums dK_j = sum_i dS_ij Q_i and dV_j = sum_i P_ij dO_i
// from them. Larger groups: the query-major pass runs over the key tiles twice (statistics, then dS and dQ) and saves
// each row's (1 / sum, delta) in the workspace ws [B, S, H, 2]; the key-major pass holds kRowsPerPass keys in
// registers, streams the query tiles and recomputes P and dS from the saved statistics. The recomputed scores are
// bitwise those of the first pass (same lanes, same FMA order).

template <typename T, int TD>
__device__ __forceinline__ void poison_rows(const Task& task, const Problem& p, Rows<T> a, Rows<T> b, Rows<T> c,
                                            int lane) {
  const RowRegs<TD> none{};
  const int rg = lane / kLanesPerRow, cl = lane % kLanesPerRow;
  for (int i = rg; i < task.n; i += kRowsPerPass) {
    store_row<T, TD>(a.row(task.first + i, task.s, task.h), p.dim, p.aligned, cl, none, nan_f());
    store_row<T, TD>(b.row(task.first + i, task.s, task.h), p.dim, p.aligned, cl, none, nan_f());
    store_row<T, TD>(c.row(task.first + i, task.s, task.h), p.dim, p.aligned, cl, none, nan_f());
  }
}

template <typename T, int TD>
__global__ void __launch_bounds__(kMaxThreads, BRIDGE_BWD_MIN_BLOCKS)
    bridge_attention_bwd(const BackwardParams params) {
  constexpr int DP = kChunkDims * TD;
  constexpr int KB = kKeyTile;
  constexpr int R = kRowsPerPass;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize, warps = blockDim.x / kWarpSize;
  const int rg = lane / kLanesPerRow, c = lane % kLanesPerRow;
  const Problem& p = params.problem;
  Task task;
  if (!decode_task(p, (i64)blockIdx.x * warps + warp, task)) return;  // warp-uniform
  const Rows<const T> dO = rows_of<const T>(params.dout), Q = rows_of<const T>(params.q),
                      K = rows_of<const T>(params.k), V = rows_of<const T>(params.v);
  const Rows<T> dQ = rows_of<T>(params.dq), dK = rows_of<T>(params.dk), dV = rows_of<T>(params.dv);
  const float* lse = static_cast<const float*>(params.lse);
  const float* dlse = static_cast<const float*>(params.dlse);
  float* ws = params.ws;
  const int n = task.n;
  const int per_warp = backward_smem_bytes_per_warp(TD);
  if (dynamic_smem_bytes() < (unsigned int)(warps * per_warp) || (n > KB && ws == nullptr)) {
    poison_rows<T, TD>(task, p, dQ, dK, dV, lane);  // a launcher bug (or offsets changed after validation)
    return;
  }
  const float scale = (float)p.scale;
  float* Qs = reinterpret_cast<float*>(bridge_smem) + warp * (per_warp / (int)sizeof(float));
  float* Os = Qs + KB * DP;
  float* Ks = Os + KB * DP;
  float* Vs = Ks + KB * DP;
  float* Pm = Vs + KB * DP;   // [KB][KB]: P of (query i, key j)
  float* dSm = Pm + KB * KB;  // [KB][KB]: dS

  if (n <= KB) {
    constexpr bool kFourTogether = sizeof(typename Chunk<T>::raw) * TileLoad<T, TD>::ITERS <= 64;
    if (kFourTogether) {  // all four tensors' loads in flight at once (16-bit types, head_dim <= 128)
      TileLoad<T, TD> lq, lo, lk, lv;
      lq.load(Q, p, task.first, n, task.s, task.h, lane);
      lo.load(dO, p, task.first, n, task.s, task.h, lane);
      lk.load(K, p, task.first, n, task.s, task.h, lane);
      lv.load(V, p, task.first, n, task.s, task.h, lane);
      lq.store(Qs, lane);
      lo.store(Os, lane);
      lk.store(Ks, lane);
      lv.store(Vs, lane);
    } else {
      stage_pair<T, TD>(Q, dO, p, task.first, n, task.s, task.h, Qs, Os, lane);
      stage_pair<T, TD>(K, V, p, task.first, n, task.s, task.h, Ks, Vs, lane);
    }
    const unsigned int vis = tile_visibility(p, task, 0, n, lane);
    __syncwarp();
    // Query-major: row i = i0 + rg.
    for (int i0 = 0; i0 < n; i0 += R) {
      const bool active = i0 + rg < n;
      const int i = imin(i0 + rg, n - 1);
      RowRegs<TD> qi, doi;
      tile_row_to_regs<TD>(Qs + i * DP, c, qi);
      tile_row_to_regs<TD>(Os + i * DP, c, doi);
      const i64 st = stat_index(p, task, i);
      const float lse_i = lse[st];
      const float dlse_i = dlse == nullptr ? 0.f : dlse[st];
      float my_s, my_dp;  // lane c: key c's score and dP
      tile_scores_and_dp<TD>(qi, doi, Ks, Vs, n, c, my_s, my_dp);
      const bool my_ok = c < n && sees(vis, 0, c, i);
      const float my_pt = unnormalized_p(my_ok, my_s, scale, lse_i);
      const float inv = 1.f / group_sum(my_pt);
      const float my_pr = my_pt * inv;
      const float delta = group_sum(my_ok ? my_pr * my_dp : 0.f);
      const float my_ds = my_ok ? score_grad(my_pr, my_dp, delta, dlse_i, scale) : 0.f;
      RowRegs<TD> dqi;
      dqi.zero();
      accumulate_dq<TD>(dqi, my_ds, vis, 0, n, i, Ks, lane, c);
      if (active) {
        store_row<T, TD>(dQ.row(task.first + i, task.s, task.h), p.dim, p.aligned, c, dqi, 1.f);
        Pm[i * KB + c] = my_pr;
        dSm[i * KB + c] = my_ds;
      }
    }
    __syncwarp();
    // Key-major: key j = j0 + rg.
    for (int j0 = 0; j0 < n; j0 += R) {
      const bool active = j0 + rg < n;
      const int j = imin(j0 + rg, n - 1);
      const bool j_visible = (vis >> j) & 1u;
      RowRegs<TD> dkj, dvj;
      dkj.zero();
      dvj.zero();
#pragma unroll 2
      for (int ii = 0; ii < n; ++ii) {
        if (j_visible || ii == j) {
          axpy_tile<TD>(dkj, dSm[ii * KB + j], Qs + ii * DP, c);
          axpy_tile<TD>(dvj, Pm[ii * KB + j], Os + ii * DP, c);
        }
      }
      if (active) {
        store_row<T, TD>(dK.row(task.first + j, task.s, task.h), p.dim, p.aligned, c, dkj, 1.f);
        store_row<T, TD>(dV.row(task.first + j, task.s, task.h), p.dim, p.aligned, c, dvj, 1.f);
      }
    }
    return;
  }

  // Groups larger than a tile. Query-major pass: statistics, then dS and dQ.
  const int n_tiles = (n + KB - 1) / KB;
  for (int i0 = 0; i0 < n; i0 += R) {
    const bool active = i0 + rg < n;
    const int i = imin(i0 + rg, n - 1);
    RowRegs<TD> qi, doi, dqi;
    load_row<T, TD>(Q.row(task.first + i, task.s, task.h), p.dim, p.aligned, c, qi);
    load_row<T, TD>(dO.row(task.first + i, task.s, task.h), p.dim, p.aligned, c, doi);
    dqi.zero();
    const i64 st = stat_index(p, task, i);
    const float lse_i = lse[st];
    const float dlse_i = dlse == nullptr ? 0.f : dlse[st];
    float sum = 0.f, dsum = 0.f, inv = 0.f, delta = 0.f;
    for (int pass = 0; pass < 2; ++pass) {
      for (int kt = 0; kt < n_tiles; ++kt) {
        const int j0 = kt * KB, count = imin(KB, n - j0);
        __syncwarp();
        stage_pair<T, TD>(K, V, p, task.first + j0, count, task.s, task.h, Ks, Vs, lane);
        const unsigned int vis = tile_visibility(p, task, j0, count, lane);
        __syncwarp();
        float my_s, my_dp;
        tile_scores_and_dp<TD>(qi, doi, Ks, Vs, count, c, my_s, my_dp);
        const bool my_ok = c < count && sees(vis, j0, c, i);
        const float my_pt = unnormalized_p(my_ok, my_s, scale, lse_i);
        if (pass == 0) {  // warp-uniform
          sum += group_sum(my_pt);
          dsum += group_sum(my_ok ? my_pt * my_dp : 0.f);
        } else {
          const float my_pr = my_pt * inv;
          const float my_ds = my_ok ? score_grad(my_pr, my_dp, delta, dlse_i, scale) : 0.f;
          accumulate_dq<TD>(dqi, my_ds, vis, j0, count, i, Ks, lane, c);
        }
      }
      if (pass == 0) {
        inv = 1.f / sum;
        delta = dsum * inv;
      }
    }
    if (active) {
      store_row<T, TD>(dQ.row(task.first + i, task.s, task.h), p.dim, p.aligned, c, dqi, 1.f);
      if (c == 0) {
        ws[2 * st] = inv;
        ws[2 * st + 1] = delta;
      }
    }
  }
  __syncwarp();  // the statistics written above are read below by other lanes
  // Key-major pass: key j = j0 + rg in registers; query tiles staged in Qs / Os.
  for (int j0 = 0; j0 < n; j0 += R) {
    const bool active = j0 + rg < n;
    const int j = imin(j0 + rg, n - 1);
    const bool j_visible = key_visible(p, task.first + j, task.s);
    RowRegs<TD> kj, vj, dkj, dvj;
    load_row<T, TD>(K.row(task.first + j, task.s, task.h), p.dim, p.aligned, c, kj);
    load_row<T, TD>(V.row(task.first + j, task.s, task.h), p.dim, p.aligned, c, vj);
    dkj.zero();
    dvj.zero();
    for (int qt = 0; qt < n_tiles; ++qt) {
      const int r0 = qt * KB, count = imin(KB, n - r0);
      __syncwarp();
      stage_pair<T, TD>(Q, dO, p, task.first + r0, count, task.s, task.h, Qs, Os, lane);
      // Lane jj < count holds the statistics of query row r0 + jj.
      float my_lse = 0.f, my_dlse = 0.f, my_inv = 0.f, my_delta = 0.f;
      if (lane < count) {
        const i64 st = stat_index(p, task, r0 + lane);
        my_lse = lse[st];
        my_dlse = dlse == nullptr ? 0.f : dlse[st];
        my_inv = ws[2 * st];
        my_delta = ws[2 * st + 1];
      }
      __syncwarp();
#pragma unroll 2
      for (int jj = 0; jj < count; ++jj) {  // warp-uniform trip count
        const float sv = dot_tile<TD>(kj, Qs + jj * DP, c);
        const float dpv = dot_tile<TD>(vj, Os + jj * DP, c);
        const float lse_i = __shfl_sync(0xffffffffu, my_lse, jj);
        const float dlse_i = __shfl_sync(0xffffffffu, my_dlse, jj);
        const float inv_i = __shfl_sync(0xffffffffu, my_inv, jj);
        const float delta_i = __shfl_sync(0xffffffffu, my_delta, jj);
        if (j_visible || r0 + jj == j) {
          const float pij = unnormalized_p(true, sv, scale, lse_i) * inv_i;
          const float dsij = score_grad(pij, dpv, delta_i, dlse_i, scale);
          axpy_tile<TD>(dkj, dsij, Qs + jj * DP, c);
          axpy_tile<TD>(dvj, pij, Os + jj * DP, c);
        }
      }
    }
    if (active) {
      store_row<T, TD>(dK.row(task.first + j, task.s, task.h), p.dim, p.aligned, c, dkj, 1.f);
      store_row<T, TD>(dV.row(task.first + j, task.s, task.h), p.dim, p.aligned, c, dvj, 1.f);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Simple path: float64, or head_dim > kChunkDims * kMaxTd. One thread per task; outputs are contiguous
// [B, S, H, Dh] buffers of the accumulation type A (the host casts them), lse is [B, S, H] of A.
// ---------------------------------------------------------------------------------------------------------

template <typename T, typename A>
__device__ __forceinline__ A dot_rows(const T* a, const T* b, int dim) {
  A acc = 0;
  for (int d = 0; d < dim; ++d) acc += (A)to_acc(a[d]) * (A)to_acc(b[d]);
  return acc;
}

// Row i of the task sees key row j: a visible key, or its own row.
__device__ __forceinline__ bool row_sees(const Problem& p, const Task& t, int i, int j) {
  return j == i || key_visible(p, t.first + j, t.s);
}

template <typename T, typename A>
__global__ void bridge_attention_fwd_simple(const ForwardParams params) {
  const Problem& p = params.problem;
  Task t;
  if (!decode_task(p, (i64)blockIdx.x * blockDim.x + threadIdx.x, t)) return;
  const Rows<const T> Q = rows_of<const T>(params.q), K = rows_of<const T>(params.k), V = rows_of<const T>(params.v);
  A* out = static_cast<A*>(params.out.ptr);
  A* lse = static_cast<A*>(params.lse);
  const A scale = (A)p.scale;
  const int dim = p.dim;
  for (int i = 0; i < t.n; ++i) {
    const T* qi = Q.row(t.first + i, t.s, t.h);
    A m = neg_inf_d();
    for (int j = 0; j < t.n; ++j) {
      if (row_sees(p, t, i, j)) m = nan_max(m, dot_rows<T, A>(qi, K.row(t.first + j, t.s, t.h), dim) * scale);
    }
    A l = 0;
    for (int j = 0; j < t.n; ++j) {
      if (row_sees(p, t, i, j)) l += acc_exp(dot_rows<T, A>(qi, K.row(t.first + j, t.s, t.h), dim) * scale - m);
    }
    const A inv = A(1) / l;
    const i64 st = stat_index(p, t, i);
    A* o = out + st * dim;
    for (int d = 0; d < dim; ++d) o[d] = 0;
    for (int j = 0; j < t.n; ++j) {
      if (row_sees(p, t, i, j)) {
        const A w = acc_exp(dot_rows<T, A>(qi, K.row(t.first + j, t.s, t.h), dim) * scale - m) * inv;
        const T* vj = V.row(t.first + j, t.s, t.h);
        for (int d = 0; d < dim; ++d) o[d] += w * (A)to_acc(vj[d]);
      }
    }
    lse[st] = m + acc_log(l);
  }
}

template <typename T, typename A>
__global__ void bridge_attention_bwd_simple(const BackwardParams params) {
  const Problem& p = params.problem;
  Task t;
  if (!decode_task(p, (i64)blockIdx.x * blockDim.x + threadIdx.x, t)) return;
  const Rows<const T> dO = rows_of<const T>(params.dout), Q = rows_of<const T>(params.q),
                      K = rows_of<const T>(params.k), V = rows_of<const T>(params.v);
  A* dq = static_cast<A*>(params.dq.ptr);
  A* dk = static_cast<A*>(params.dk.ptr);
  A* dv = static_cast<A*>(params.dv.ptr);
  const A* lse = static_cast<const A*>(params.lse);
  const A* dlse = static_cast<const A*>(params.dlse);
  const A scale = (A)p.scale;
  const int dim = p.dim;
  for (int i = 0; i < t.n; ++i) {
    const i64 st = stat_index(p, t, i);
    for (int d = 0; d < dim; ++d) dq[st * dim + d] = dk[st * dim + d] = dv[st * dim + d] = 0;
  }
  for (int i = 0; i < t.n; ++i) {
    const i64 st_i = stat_index(p, t, i);
    const T* qi = Q.row(t.first + i, t.s, t.h);
    const T* doi = dO.row(t.first + i, t.s, t.h);
    const A lse_i = lse[st_i], dlse_i = dlse == nullptr ? A(0) : dlse[st_i];
    A sum = 0;
    for (int j = 0; j < t.n; ++j) {
      if (row_sees(p, t, i, j)) sum += acc_exp(dot_rows<T, A>(qi, K.row(t.first + j, t.s, t.h), dim) * scale - lse_i);
    }
    const A inv = A(1) / sum;
    A delta = 0;
    for (int j = 0; j < t.n; ++j) {
      if (row_sees(p, t, i, j)) {
        const A pij = acc_exp(dot_rows<T, A>(qi, K.row(t.first + j, t.s, t.h), dim) * scale - lse_i) * inv;
        delta += pij * dot_rows<T, A>(doi, V.row(t.first + j, t.s, t.h), dim);
      }
    }
    for (int j = 0; j < t.n; ++j) {
      if (row_sees(p, t, i, j)) {
        const T* kj = K.row(t.first + j, t.s, t.h);
        const A pij = acc_exp(dot_rows<T, A>(qi, kj, dim) * scale - lse_i) * inv;
        const A dpij = dot_rows<T, A>(doi, V.row(t.first + j, t.s, t.h), dim);
        const A dsij = score_grad(pij, dpij, delta, dlse_i, scale);
        const i64 st_j = stat_index(p, t, j);
        for (int d = 0; d < dim; ++d) {
          dq[st_i * dim + d] += dsij * (A)to_acc(kj[d]);
          dk[st_j * dim + d] += dsij * (A)to_acc(qi[d]);
          dv[st_j * dim + d] += pij * (A)to_acc(doi[d]);
        }
      }
    }
  }
}

}  // namespace kernels
}  // namespace bridge_ops
