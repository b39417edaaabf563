// Fused CPU kernels of bridge_attention (forward and backward).
//
// Work is split into independent tasks, one per (position s, group g): a task reads the group's rows of the
// inputs at s (all heads) and writes the same rows of the outputs, so tasks never share an output element and
// need no atomics. A task first packs its rows into contiguous [H, n, Dh] tiles of the accumulation type
// (float32; float64 for float64 inputs): in the [B, S, H, Dh] layout the rows of one group are S*H*Dh
// elements apart, and reading them in place makes every row of every input collide in the same cache sets.
// Then, per head and query row, it computes the row's scores against the visible keys of its group (itself
// always included) four keys at a time, a softmax over that row (at most n values, held in a row buffer, so
// the softmax is exact), and the probability-weighted sum of the values.
// No [S, B, B] score or mask tensor exists at any point.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../checks.h"
#include "vector_ops.h"

namespace bridge_ops::cpu {
namespace {

// Rows of a [B, S, H, Dh] tensor with a contiguous last dimension, addressed by (b, s, h).
template <typename T>
struct Rows {
  T* data;
  int64_t stride_b, stride_s, stride_h;

  BRIDGE_OPS_INLINE T* at(int64_t b, int64_t s, int64_t h) const {
    return data + b * stride_b + s * stride_s + h * stride_h;
  }
};

template <typename T>
Rows<const T> rows_of(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
Rows<T> mutable_rows_of(at::Tensor& t) {
  return {t.mutable_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The group layout every task reads: offsets, key mask, sizes.
struct Groups {
  const int32_t* cu;
  const bool* key_mask;  // nullptr: every key visible
  int64_t mask_stride_b, mask_stride_s;
  int64_t seqlen, heads, head_dim, groups, max_group;

  struct Task {
    int64_t s, first_row, size;
  };
  BRIDGE_OPS_INLINE Task task(int64_t t) const {
    const int64_t g = t % groups, s = t / groups;
    return {s, cu[g], static_cast<int64_t>(cu[g + 1]) - cu[g]};
  }
  BRIDGE_OPS_INLINE bool visible(const Task& task, int64_t j) const {
    return key_mask == nullptr || key_mask[(task.first_row + j) * mask_stride_b + task.s * mask_stride_s];
  }
  int64_t tasks() const { return seqlen * groups; }
};

Groups make_groups(const at::Tensor& cu_host, const std::optional<at::Tensor>& key_mask, const AttentionDims& d,
                   int64_t max_group) {
  Groups g{cu_host.const_data_ptr<int32_t>(), nullptr, 0, 0, d.seqlen, d.heads, d.head_dim, d.groups, max_group};
  if (key_mask.has_value()) {
    g.key_mask = key_mask->const_data_ptr<bool>();
    g.mask_stride_b = key_mask->stride(0);
    g.mask_stride_s = key_mask->stride(1);
  }
  return g;
}

// Per-thread workspace, sized once per parallel chunk for the largest group.
template <typename acc_t>
struct Workspace {
  int64_t tile_size;
  std::vector<acc_t> tiles;      // `count` tiles of [H, max_group, Dh]
  std::vector<acc_t> row;        // one query row's Dh accumulator, then per-key values (4 x max_group)
  std::vector<int64_t> visible;  // indices of the group's visible keys
  std::vector<int64_t> keys;     // one query row's keys: the visible ones and itself
  std::vector<const acc_t*> key_ptrs, value_ptrs;

  Workspace(int64_t count, const Groups& g)
      : tile_size(g.heads * g.max_group * g.head_dim),
        tiles(count * tile_size),
        row(g.head_dim + 4 * g.max_group),
        visible(g.max_group),
        keys(g.max_group),
        key_ptrs(g.max_group),
        value_ptrs(g.max_group) {}
  acc_t* tile(int64_t i) { return tiles.data() + i * tile_size; }
};

// Copies rows [first_row, first_row + n) of `src` at position s into the [H, n, Dh] tile `dst`.
template <typename scalar_t, typename acc_t>
BRIDGE_OPS_INLINE void pack(const Rows<const scalar_t>& src, const Groups::Task& task, const Groups& g, acc_t* dst) {
  for (int64_t j = 0; j < task.size; ++j) {
    for (int64_t h = 0; h < g.heads; ++h) {
      convert(dst + (h * task.size + j) * g.head_dim, src.at(task.first_row + j, task.s, h), g.head_dim);
    }
  }
}

// Writes the [H, n, Dh] tile `src` back to rows [first_row, first_row + n) of `dst` at position s.
template <typename scalar_t, typename acc_t>
BRIDGE_OPS_INLINE void unpack(const acc_t* src, const Groups::Task& task, const Groups& g, const Rows<scalar_t>& dst) {
  for (int64_t j = 0; j < task.size; ++j) {
    for (int64_t h = 0; h < g.heads; ++h) {
      convert(dst.at(task.first_row + j, task.s, h), src + (h * task.size + j) * g.head_dim, g.head_dim);
    }
  }
}

// Calls fn(i, h, head, n_keys) for every query row i and head h of the task, where `head` is the offset of head h's
// [n, Dh] tile and w.keys / w.key_ptrs / w.value_ptrs hold the row's keys: the visible rows of the group, and i itself
// (a row always sees itself).
template <typename acc_t, typename Fn>
BRIDGE_OPS_INLINE void for_each_query(const Groups& g, const Groups::Task& task, Workspace<acc_t>& w,
                                      const acc_t* k_tile, const acc_t* v_tile, Fn&& fn) {
  const int64_t n = task.size, D = g.head_dim;
  int64_t n_visible = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (g.visible(task, j)) w.visible[n_visible++] = j;
  }
  for (int64_t i = 0; i < n; ++i) {
    std::copy(w.visible.begin(), w.visible.begin() + n_visible, w.keys.begin());
    int64_t n_keys = n_visible;
    if (!g.visible(task, i)) w.keys[n_keys++] = i;
    for (int64_t h = 0; h < g.heads; ++h) {
      const int64_t head = h * n * D;
      for (int64_t m = 0; m < n_keys; ++m) {
        w.key_ptrs[m] = k_tile + head + w.keys[m] * D;
        w.value_ptrs[m] = v_tile + head + w.keys[m] * D;
      }
      fn(i, h, head, n_keys);
    }
  }
}

// out[m] = q . rows[m] for m < count, four rows at a time.
template <typename acc_t, typename Ops>
BRIDGE_OPS_INLINE void dot_rows(const acc_t* q, const acc_t* const* rows, int64_t count, int64_t d, acc_t* out) {
  int64_t m = 0;
  for (; m + 4 <= count; m += 4) Ops::dot4(q, rows + m, d, out + m);
  for (; m < count; ++m) out[m] = Ops::dot(q, rows[m], d);
}

// y += sum_m alpha[m] * rows[m], four rows at a time.
template <typename acc_t, typename Ops>
BRIDGE_OPS_INLINE void combine_rows(acc_t* y, const acc_t* alpha, const acc_t* const* rows, int64_t count, int64_t d) {
  int64_t m = 0;
  for (; m + 4 <= count; m += 4) Ops::axpy4(y, alpha + m, rows + m, d);
  for (; m < count; ++m) Ops::axpy(y, alpha[m], rows[m], d);
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> q, k, v;
  Rows<scalar_t> out;
  acc_t* lse;  // contiguous [B, S, H]
  Groups groups;
  acc_t scale;
};

template <typename scalar_t, template <typename> class OpsFor>
BRIDGE_OPS_INLINE void forward_chunk(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using Ops = OpsFor<acc_t>;
  const Groups& g = a.groups;
  const int64_t D = g.head_dim;
  Workspace<acc_t> w(3, g);
  acc_t *q_tile = w.tile(0), *k_tile = w.tile(1), *v_tile = w.tile(2);
  acc_t* acc = w.row.data();
  acc_t* probs = acc + D;

  for (int64_t t = begin; t < end; ++t) {
    const Groups::Task task = g.task(t);
    pack(a.q, task, g, q_tile);
    pack(a.k, task, g, k_tile);
    pack(a.v, task, g, v_tile);
    for_each_query(g, task, w, k_tile, v_tile, [&](int64_t i, int64_t h, int64_t head, int64_t n_keys) {
      const int64_t row = task.first_row + i;
      dot_rows<acc_t, Ops>(q_tile + head + i * D, w.key_ptrs.data(), n_keys, D, probs);
      acc_t max_score = -std::numeric_limits<acc_t>::infinity();
      for (int64_t m = 0; m < n_keys; ++m) {
        probs[m] *= a.scale;
        max_score = std::max(max_score, probs[m]);
      }
      acc_t sum = 0;
      for (int64_t m = 0; m < n_keys; ++m) {
        probs[m] = std::exp(probs[m] - max_score);
        sum += probs[m];
      }
      const acc_t inv_sum = acc_t(1) / sum;
      for (int64_t m = 0; m < n_keys; ++m) probs[m] *= inv_sum;
      fill_zero(acc, D);
      combine_rows<acc_t, Ops>(acc, probs, w.value_ptrs.data(), n_keys, D);
      convert(a.out.at(row, task.s, h), acc, D);
      a.lse[(row * g.seqlen + task.s) * g.heads + h] = max_score + std::log(sum);
    });
  }
}

BRIDGE_OPS_CPU_DISPATCH(forward_chunk_for_cpu, forward_chunk)

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------
// With P = softmax(scale * Q K^T) over the visible keys (lse saved by the forward) and dP = dO V^T:
//   dV_j += P_ij dO_i,   dS_ij = P_ij (dP_ij - delta_i + dlse_i),   delta_i = sum_j P_ij dP_ij,
//   dQ_i += scale dS_ij K_j,   dK_j += scale dS_ij Q_i.
// delta_i is summed exactly from the row's own P and dP, so the backward does not need the forward output,
// and each score is computed once.

template <typename scalar_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  Rows<const scalar_t> grad_out, q, k, v;
  const acc_t* lse;       // contiguous [B, S, H]
  const acc_t* grad_lse;  // contiguous [B, S, H] or nullptr
  Rows<scalar_t> grad_q, grad_k, grad_v;
  Groups groups;
  acc_t scale;
};

template <typename scalar_t, template <typename> class OpsFor>
BRIDGE_OPS_INLINE void backward_chunk(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  using Ops = OpsFor<acc_t>;
  const Groups& g = a.groups;
  const int64_t D = g.head_dim, N = g.max_group;
  Workspace<acc_t> w(6, g);
  acc_t *q_tile = w.tile(0), *k_tile = w.tile(1), *v_tile = w.tile(2), *do_tile = w.tile(3);
  acc_t *grad_k_tile = w.tile(4), *grad_v_tile = w.tile(5);
  acc_t* grad_q_acc = w.row.data();
  acc_t *probs = grad_q_acc + D, *grad_probs = probs + N, *grad_scores = grad_probs + N;

  for (int64_t t = begin; t < end; ++t) {
    const Groups::Task task = g.task(t);
    const int64_t n = task.size;
    pack(a.q, task, g, q_tile);
    pack(a.k, task, g, k_tile);
    pack(a.v, task, g, v_tile);
    pack(a.grad_out, task, g, do_tile);
    fill_zero(grad_k_tile, g.heads * n * D);
    fill_zero(grad_v_tile, g.heads * n * D);
    for_each_query(g, task, w, k_tile, v_tile, [&](int64_t i, int64_t h, int64_t head, int64_t n_keys) {
      const int64_t row = task.first_row + i, stat = (row * g.seqlen + task.s) * g.heads + h;
      const acc_t* q_i = q_tile + head + i * D;
      const acc_t* do_i = do_tile + head + i * D;
      dot_rows<acc_t, Ops>(q_i, w.key_ptrs.data(), n_keys, D, probs);
      dot_rows<acc_t, Ops>(do_i, w.value_ptrs.data(), n_keys, D, grad_probs);
      // The row holds all its keys, so P is renormalized to sum to 1: this cancels the rounding of the saved lse
      // (which would otherwise scale the whole row by exp(rounding error)) for n extra multiplications.
      const acc_t lse = a.lse[stat];
      acc_t sum = 0;
      for (int64_t m = 0; m < n_keys; ++m) {
        probs[m] = std::exp(probs[m] * a.scale - lse);
        sum += probs[m];
      }
      const acc_t inv_sum = acc_t(1) / sum;
      acc_t delta = 0;
      for (int64_t m = 0; m < n_keys; ++m) {
        probs[m] *= inv_sum;
        delta += probs[m] * grad_probs[m];
      }
      // (dP - delta) first: for a row that sees only itself it is exactly 0, and dlse is not lost to rounding.
      const acc_t grad_lse = a.grad_lse == nullptr ? acc_t(0) : a.grad_lse[stat];
      for (int64_t m = 0; m < n_keys; ++m) {
        grad_scores[m] = probs[m] * ((grad_probs[m] - delta) + grad_lse) * a.scale;
      }
      fill_zero(grad_q_acc, D);
      combine_rows<acc_t, Ops>(grad_q_acc, grad_scores, w.key_ptrs.data(), n_keys, D);
      convert(a.grad_q.at(row, task.s, h), grad_q_acc, D);
      for (int64_t m = 0; m < n_keys; ++m) {
        const int64_t key = head + w.keys[m] * D;
        Ops::axpy(grad_k_tile + key, grad_scores[m], q_i, D);
        Ops::axpy(grad_v_tile + key, probs[m], do_i, D);
      }
    });
    unpack(grad_k_tile, task, g, a.grad_k);
    unpack(grad_v_tile, task, g, a.grad_v);
  }
}

BRIDGE_OPS_CPU_DISPATCH(backward_chunk_for_cpu, backward_chunk)

// ---------------------------------------------------------------------------------------------------------
// Operator entry points
// ---------------------------------------------------------------------------------------------------------

void check_on_cpu(const at::Tensor& q) { BRIDGE_CHECK(q.device().is_cpu(), "the CPU kernel got q on ", q.device()); }

// Tasks per parallel chunk: about 32k multiply-adds (a task costs ~ n^2 H Dh for a group of n rows).
int64_t grain_size(const AttentionDims& d) {
  const int64_t mean_group = std::max<int64_t>(1, d.batch / d.groups);
  return std::max<int64_t>(1, 32768 / (mean_group * mean_group * d.heads * d.head_dim));
}

at::Tensor empty_like_rows(const at::Tensor& q) {
  return at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
}

std::tuple<at::Tensor, at::Tensor> bridge_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, const at::Tensor& cu_group_lens,
                                                        const std::optional<at::Tensor>& key_mask,
                                                        std::optional<double> scale) {
  const AttentionDims d = check_attention_args(q_in, k_in, v_in, cu_group_lens, key_mask);
  check_on_cpu(q_in);
  const at::Tensor cu = cu_group_lens.contiguous();
  const int64_t max_group = check_cu_group_lens_values(cu.const_data_ptr<int32_t>(), d.groups, d.batch);
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  at::Tensor out = empty_like_rows(q);
  at::Tensor lse = at::empty({d.batch, d.seqlen, d.heads}, q.options().dtype(lse_dtype(q.scalar_type())));
  const Groups groups = make_groups(cu, key_mask, d, max_group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bridge_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t> args{rows_of<scalar_t>(q),
                                     rows_of<scalar_t>(k),
                                     rows_of<scalar_t>(v),
                                     mutable_rows_of<scalar_t>(out),
                                     lse.mutable_data_ptr<acc_t>(),
                                     groups,
                                     static_cast<acc_t>(resolve_scale(scale, d.head_dim))};
    at::parallel_for(0, groups.tasks(), grain_size(d),
                     [&](int64_t begin, int64_t end) { forward_chunk_for_cpu<scalar_t>(args, begin, end); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& lse_in, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  const AttentionDims d = check_attention_args(q_in, k_in, v_in, cu_group_lens, key_mask);
  check_on_cpu(q_in);
  check_attention_backward_args(grad_out_in, grad_lse_in, q_in, lse_in);
  const at::Tensor cu = cu_group_lens.contiguous();
  const int64_t max_group = check_cu_group_lens_values(cu.const_data_ptr<int32_t>(), d.groups, d.batch);
  const at::ScalarType stat_dtype = lse_dtype(q_in.scalar_type());
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor grad_out = with_unit_last_stride(grad_out_in);
  const at::Tensor lse = lse_in.to(stat_dtype).contiguous();
  std::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(stat_dtype).contiguous();
  at::Tensor grad_q = empty_like_rows(q), grad_k = empty_like_rows(q), grad_v = empty_like_rows(q);
  const Groups groups = make_groups(cu, key_mask, d, max_group);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "bridge_attention_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t> args{rows_of<scalar_t>(grad_out),
                                      rows_of<scalar_t>(q),
                                      rows_of<scalar_t>(k),
                                      rows_of<scalar_t>(v),
                                      lse.const_data_ptr<acc_t>(),
                                      grad_lse.has_value() ? grad_lse->const_data_ptr<acc_t>() : nullptr,
                                      mutable_rows_of<scalar_t>(grad_q),
                                      mutable_rows_of<scalar_t>(grad_k),
                                      mutable_rows_of<scalar_t>(grad_v),
                                      groups,
                                      static_cast<acc_t>(resolve_scale(scale, d.head_dim))};
    at::parallel_for(0, groups.tasks(), grain_size(d),
                     [&](int64_t begin, int64_t end) { backward_chunk_for_cpu<scalar_t>(args, begin, end); });
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CPU, m) {
  m.impl("bridge_attention", &bridge_attention_cpu);
  m.impl("bridge_attention_backward", &bridge_attention_backward_cpu);
}

}  // namespace bridge_ops::cpu
