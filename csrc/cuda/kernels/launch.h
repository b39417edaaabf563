// How the CUDA kernels are launched, defined once: constants, shared-memory sizes, launch plans and the parameter
// structs the kernels take (flash-attention's Flash_fwd_params): every kernel takes one params struct by value. A
// plain C++ header (no #include, no CUDA, no torch), so that every build and every host reads these very definitions:
//   * the kernels (bridge_attention.cuh, cascade_attention.cuh), through nvcc, NVRTC and the tests' warp emulator;
//   * the C++ hosts of the ops (csrc/host/), which plan a call, fill these structs and hand them to a launcher;
//   * Python, through the pybind11 module bridge_ops._C.kernels (csrc/kernel_launch.cpp): its constants, plan_launch
//     and Grid (the Python launchers receive the filled params struct as bytes).
// A new kernel argument is a field of a params struct here, filled by name where the host fills the others.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define BRIDGE_HOST_DEVICE __host__ __device__
#else
#define BRIDGE_HOST_DEVICE
#endif

namespace bridge_ops {
namespace kernels {

typedef long long i64;

// ---------------------------------------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------------------------------------

constexpr int kWarpSize = 32;
constexpr int kSmemLimit = 48 * 1024;  // dynamic shared memory per block without an opt-in (every arch)

// Bridge attention, fast path (bridge_attention.cuh explains the mapping).
constexpr int kKeyTile = 8;      // rows per shared-memory tile
constexpr int kRowsPerPass = 4;  // row groups per warp: query (or key) rows a warp holds in registers at once
constexpr int kLanesPerRow = 8;  // lanes per row group (kRowsPerPass * kLanesPerRow == kWarpSize)
constexpr int kChunkDims = 4 * kLanesPerRow;  // head dims per register chunk: 4 per lane of a row group
constexpr int kNumTd = 4;                     // register layouts: TD chunks of kChunkDims dims per row
constexpr int kTdValues[kNumTd] = {1, 2, 4, 8};
constexpr int kMaxTd = kTdValues[kNumTd - 1];       // fast path: head_dim <= kChunkDims * kMaxTd
constexpr int kMaxWarps = 4;                        // warps per block at most
constexpr int kMaxThreads = kWarpSize * kMaxWarps;  // threads per block at most (__launch_bounds__)
constexpr int kSimpleThreads = 128;                 // threads per block of the simple kernels (one task each)

// Cascade decode attention (cascade_attention.cuh): every block is one warp.
constexpr int kCascadeThreads = kWarpSize;
constexpr int kCascadeChunkKeys = kWarpSize;  // prefix keys per chunk at most: one per lane
constexpr int kCascadeMaxTd = 8;              // head_dim <= kWarpSize * kCascadeMaxTd: dims {lane + 32 t}

static_assert(kRowsPerPass * kLanesPerRow == kWarpSize, "a warp is kRowsPerPass row groups of kLanesPerRow lanes");

// ---------------------------------------------------------------------------------------------------------
// Bridge attention: shared memory, launch plan
// ---------------------------------------------------------------------------------------------------------

// Per-warp shared memory (bytes) of the fast kernels: float32 tiles of kKeyTile rows x kChunkDims * td dims; the
// forward stages K and V, the backward Q, dO, K, V plus P and dS of one tile ([kKeyTile][kKeyTile] each).
BRIDGE_HOST_DEVICE inline int forward_smem_bytes_per_warp(int td) {
  return 2 * kKeyTile * kChunkDims * td * static_cast<int>(sizeof(float));
}
BRIDGE_HOST_DEVICE inline int backward_smem_bytes_per_warp(int td) {
  return (4 * kKeyTile * kChunkDims * td + 2 * kKeyTile * kKeyTile) * static_cast<int>(sizeof(float));
}

// What a launcher needs to run one kernel: a 1-D grid of `blocks` blocks of `threads` threads, each with
// `smem_bytes` of dynamic shared memory (at most kSmemLimit: no launcher opts in to more).
struct Grid {
  i64 blocks;
  int threads;
  int smem_bytes;
};

struct LaunchPlan {
  bool fast;    // bridge_attention_fwd/bwd<T, td>; else the simple kernels (float64, head_dim > 256)
  int td;       // register layout of the fast kernels
  int threads;  // per block
  i64 blocks;
  int smem_bytes;  // dynamic shared memory per block
  bool workspace;  // the backward needs ws [B, S, H, 2] floats (groups larger than a tile may occur)
};

// ---------------------------------------------------------------------------------------------------------
// Bridge attention: kernel parameters
// ---------------------------------------------------------------------------------------------------------

// Rows of a [B, S, H, Dh] tensor with a unit last stride: the data pointer and the element strides of B, S, H.
struct RowsArg {
  void* ptr;
  i64 sb, ss, sh;
};

// What every Bridge kernel reads besides its tensors: sizes, groups, key mask, scale.
struct Problem {
  const int* cu;              // int32 [groups + 1] row offsets (clamped into [0, batch] by the kernels)
  const unsigned char* mask;  // bool [B, S] with strides (mask_sb, mask_ss), or nullptr: every key visible
  i64 mask_sb, mask_ss;
  double scale;
  int batch, seqlen, heads, dim, groups;
  int aligned;  // fast path: every row 4-element aligned and head_dim % 4 == 0 (vector accesses); see rows_aligned
};

// bridge_attention_fwd<T, TD> (out: T rows, lse: float32 [B, S, H]) and bridge_attention_fwd_simple<T, A> (out and
// lse: contiguous buffers of the accumulation type A, which the host casts).
struct ForwardParams {
  Problem problem;
  RowsArg q, k, v, out;
  void* lse;
};

// bridge_attention_bwd<T, TD> (dq, dk, dv: T rows; lse, dlse: float32) and bridge_attention_bwd_simple<T, A> (dq, dk,
// dv: contiguous buffers of A; lse, dlse: A). dlse may be null (no gradient of lse); ws: float32 [B, S, H, 2] when
// LaunchPlan::workspace, else null.
struct BackwardParams {
  Problem problem;
  RowsArg dout, q, k, v, dq, dk, dv;
  const void* lse;
  const void* dlse;
  float* ws;
};

// ---------------------------------------------------------------------------------------------------------
// Cascade decode attention: shape, launch plan
// ---------------------------------------------------------------------------------------------------------

struct CascadeShape {
  int batch, q_heads, kv_heads, dim, groups, prefix_len, suffix_len, chunks, chunk_len;
};

struct CascadePlan {
  CascadeShape shape;
  i64 prefix_blocks;      // cascade_prefix_chunks: one warp per (chunk, group, kv head); 0: no prefix, no launch
  int prefix_smem_bytes;  // its dynamic shared memory: chunk_len rows of dim + 1 accumulation-type values
  i64 merge_blocks;       // cascade_suffix_merge: one warp per (row, query head)
  int workspace_chunks;   // leading size of the partial states ws_o [chunks, B, Hq, Dh] / ws_lse [chunks, B, Hq]
};

// ---------------------------------------------------------------------------------------------------------
// Cascade decode attention: kernel parameters
// ---------------------------------------------------------------------------------------------------------

// Keys of a [N, H, L, Dh] tensor with a unit last stride: the data pointer and the element strides of N, H, L.
struct KeysArg {
  const void* ptr;
  i64 sn, sh, sl;
};

// cascade_prefix_chunks<T, A> and cascade_suffix_merge<T, A> (T the storage type, A the accumulation type: float64
// for float64 inputs, else float32). Shapes as in CascadeShape: B rows, Hq query heads, Hkv key/value heads, G groups,
// P prefix positions, T suffix positions, Dh dims. The prefix kernel reads q, prefix_k/v, prefix_lens, cu and writes
// the workspace; the merge kernel reads the workspace, q, suffix_k/v, suffix_lens, prefix_lens, cu and writes out, lse.
struct CascadeParams {
  CascadeShape shape;
  const void* q;  // T [B, Hq, Dh] with strides (q_sb, q_sh, 1)
  i64 q_sb, q_sh;
  KeysArg prefix_k, prefix_v;  // T [G, Hkv, P, Dh]
  KeysArg suffix_k, suffix_v;  // T [B, Hkv, T, Dh]
  const int* prefix_lens;      // int32 [G]: valid prefix positions [P - prefix_lens[g], P) (clamped into [0, P])
  const int* suffix_lens;      // int32 [B]: valid suffix positions [0, suffix_lens[b]) (clamped), or null: all T
  const int* cu;               // int32 [G + 1] row offsets (clamped into [0, B])
  void* ws_o;                  // A [workspace_chunks, B, Hq, Dh]: the prefix chunks' normalized partial outputs
  void* ws_lse;                // A [workspace_chunks, B, Hq]: their lse
  void* out;                   // T [B, Hq, Dh], contiguous
  void* lse;                   // A [B, Hq], contiguous
  double scale;                // cast to A by the kernels
};

// merge_states<T, A>: rows of contiguous o_a, o_b, out (T [rows, dim]) and lse_a, lse_b, lse (A [rows]); one warp
// per row (grid: rows blocks).
struct MergeParams {
  const void* o_a;
  const void* lse_a;
  const void* o_b;
  const void* lse_b;
  void* out;
  void* lse;
  int dim;
};

#ifndef __CUDACC_RTC__  // host side (the launchers, _C, the emulator); NVRTC compiles device code only

// ---------------------------------------------------------------------------------------------------------
// Host side: launch plans, alignment
// ---------------------------------------------------------------------------------------------------------

// The register layout for a head dim: the fewest chunks of kChunkDims dims that hold it (kMaxTd past the fast path).
inline int td_for_head_dim(int dim) {
  for (int i = 0; i < kNumTd; ++i) {
    if (dim <= kChunkDims * kTdValues[i]) return kTdValues[i];
  }
  return kMaxTd;
}

// tasks = S * G * H (one per (position, group, head)); max_group: the largest group, or -1 when unknown (offsets not
// read, e.g. during CUDA graph capture).
inline LaunchPlan plan_launch(bool is_double, int dim, i64 tasks, int num_sms, bool backward, i64 max_group) {
  LaunchPlan plan{false, 0, kSimpleThreads, (tasks + kSimpleThreads - 1) / kSimpleThreads, 0, false};
  if (is_double || dim > kChunkDims * kMaxTd) return plan;
  plan.fast = true;
  plan.td = td_for_head_dim(dim);
  const int per_warp = backward ? backward_smem_bytes_per_warp(plan.td) : forward_smem_bytes_per_warp(plan.td);
  // Fit the default shared-memory limit, and keep at least two blocks per multiprocessor when tasks are few (decode
  // shapes) rather than packing them into fewer, fuller blocks.
  int warps = kMaxWarps;
  while (warps > 1 && (warps * per_warp > kSmemLimit || (tasks + warps - 1) / warps < 2LL * num_sms)) warps /= 2;
  plan.threads = kWarpSize * warps;
  plan.blocks = (tasks + warps - 1) / warps;
  plan.smem_bytes = warps * per_warp;
  plan.workspace = backward && (max_group < 0 || max_group > kKeyTile);
  return plan;
}

// A row start and the strides of B, S, H all multiples of 4 elements, so that 4-element chunks are 8/16-byte aligned.
inline bool rows_aligned(const RowsArg& r, int element_size) {
  const unsigned long long address = (unsigned long long)r.ptr;
  return address % (4ull * element_size) == 0 && r.sb % 4 == 0 && r.ss % 4 == 0 && r.sh % 4 == 0;
}
// Problem::aligned of a fast-path call: every tensor's rows aligned and head_dim a multiple of 4.
inline int rows_aligned(const ForwardParams& p, int element_size) {
  return p.problem.dim % 4 == 0 && rows_aligned(p.q, element_size) && rows_aligned(p.k, element_size) &&
         rows_aligned(p.v, element_size) && rows_aligned(p.out, element_size);
}
inline int rows_aligned(const BackwardParams& p, int element_size) {
  return p.problem.dim % 4 == 0 && rows_aligned(p.dout, element_size) && rows_aligned(p.q, element_size) &&
         rows_aligned(p.k, element_size) && rows_aligned(p.v, element_size) && rows_aligned(p.dq, element_size) &&
         rows_aligned(p.dk, element_size) && rows_aligned(p.dv, element_size);
}

// Keys per prefix chunk: one per lane, fewer when kCascadeChunkKeys rows of dim + 1 accumulation-type values (padded
// against bank conflicts) would not fit in the default shared memory.
inline int cascade_chunk_len(int dim, int acc_bytes) {
  const int fit = kSmemLimit / ((dim + 1) * acc_bytes);
  return fit < kCascadeChunkKeys ? fit : kCascadeChunkKeys;
}

// acc_bytes: size of the accumulation type (8 for float64 inputs, else 4).
inline CascadePlan plan_cascade(int batch, int q_heads, int kv_heads, int dim, int groups, int prefix_len,
                                int suffix_len, int acc_bytes) {
  const int chunk_len = cascade_chunk_len(dim, acc_bytes);
  const int chunks = (prefix_len + chunk_len - 1) / chunk_len;
  CascadePlan plan;
  plan.shape = CascadeShape{batch, q_heads, kv_heads, dim, groups, prefix_len, suffix_len, chunks, chunk_len};
  plan.prefix_blocks = static_cast<i64>(chunks) * groups * kv_heads;
  plan.prefix_smem_bytes = chunk_len * (dim + 1) * acc_bytes;
  plan.merge_blocks = static_cast<i64>(batch) * q_heads;
  plan.workspace_chunks = chunks > 1 ? chunks : 1;
  return plan;
}

// The grids of a plan's kernels.
inline Grid grid_of(const LaunchPlan& plan) { return Grid{plan.blocks, plan.threads, plan.smem_bytes}; }
inline Grid prefix_grid_of(const CascadePlan& plan) {  // cascade_prefix_chunks
  return Grid{plan.prefix_blocks, kCascadeThreads, plan.prefix_smem_bytes};
}
inline Grid merge_grid_of(const CascadePlan& plan) {  // cascade_suffix_merge
  return Grid{plan.merge_blocks, kCascadeThreads, 0};
}

#endif  // __CUDACC_RTC__

}  // namespace kernels
}  // namespace bridge_ops
