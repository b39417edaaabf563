// Fused CPU kernels of the cascade decode attention (cascade_attention) and of merge_attention_states.
//
// cascade_attention runs in two parallel passes, each over independent tasks:
//   1. prefix, one task per (group g, key/value head, range of the prefix: ranges keep the threads busy when G * Hkv
//      is small): the m = n_g * Hq/Hkv queries of the group's rows that read this head are packed into one [m, Dh]
//      tile, and the group's ONE copy of the prefix keys is swept in blocks of kBlock positions: each key block is
//      converted once (to the accumulation type) and scored against all m queries while it sits in L1, with an online
//      softmax per query. So a prefix key is read from memory once per group and head, not once per row (what the
//      expanded cache does), and the scores are a small [m, kBlock] matrix product per block. The results (normalized
//      output + lse per query and range) go to a float32/64 scratch.
//   2. suffix, one task per (row b, key/value head): the row's Hq/Hkv queries against the row's own suffix keys
//      (the same block sweep), then the exact log-sum-exp merges with the row's prefix results (attention_merge.h),
//      written in q's dtype.
// Accumulation is float32 (float64 for float64 inputs); no [B, P] score tensor exists at any point.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention_merge.h"
#include "../checks.h"
#include "vector_ops.h"

namespace bridge_ops::cpu {
namespace {

constexpr int64_t kBlock = 64;  // key positions per block (fp32 K + V block of Dh = 128: 64 KiB)

// Rows of one (batch entry, head) of a [N, H, L, Dh] key or value tensor with a contiguous last dimension.
template <typename T>
struct KeyRows {
  const T* data;
  int64_t stride_n, stride_h, stride_l;

  const T* at(int64_t n, int64_t h, int64_t l) const { return data + n * stride_n + h * stride_h + l * stride_l; }
};

template <typename T>
KeyRows<T> key_rows(const at::Tensor& t) {
  return {t.const_data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Per-thread workspace for m queries at most.
template <typename acc_t>
struct Scratch {
  std::vector<acc_t> queries, acc, max_score, sum, scores, k_tile, v_tile, zeros;
  std::vector<const acc_t*> key_ptrs, value_ptrs, present_value_ptrs;

  Scratch(int64_t m, int64_t d)
      : queries(m * d),
        acc(m * d),
        max_score(m),
        sum(m),
        scores(kBlock),
        k_tile(kBlock * d),
        v_tile(kBlock * d),
        zeros(d),
        key_ptrs(kBlock),
        value_ptrs(kBlock),
        present_value_ptrs(kBlock) {}
};

// Points w.key_ptrs / w.value_ptrs at positions [begin, begin + count) of (n, h), converted to acc_t if needed.
template <typename scalar_t, typename acc_t>
BRIDGE_OPS_INLINE void load_block(const KeyRows<scalar_t>& k, const KeyRows<scalar_t>& v, int64_t n, int64_t h,
                                  int64_t begin, int64_t count, int64_t d, Scratch<acc_t>& w) {
  for (int64_t j = 0; j < count; ++j) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      w.key_ptrs[j] = k.at(n, h, begin + j);
      w.value_ptrs[j] = v.at(n, h, begin + j);
    } else {
      convert(w.k_tile.data() + j * d, k.at(n, h, begin + j), d);
      convert(w.v_tile.data() + j * d, v.at(n, h, begin + j), d);
      w.key_ptrs[j] = w.k_tile.data() + j * d;
      w.value_ptrs[j] = w.v_tile.data() + j * d;
    }
  }
}

// Attention of the m packed queries (w.queries, [m, Dh]) over positions [begin, end) of (n, h). Leaves query i's
// normalized output in w.acc[i * Dh ...] and its lse in w.max_score[i], with the non-finite policy of
// attention_merge.h: a key of score -inf is absent (its value is never read), a query with no present key gets
// output 0 and lse -inf, a NaN or +inf score makes both NaN.
template <typename scalar_t, typename Ops, typename acc_t>
BRIDGE_OPS_INLINE void attend(Scratch<acc_t>& w, int64_t m, int64_t d, const KeyRows<scalar_t>& k,
                              const KeyRows<scalar_t>& v, int64_t n, int64_t h, int64_t begin, int64_t end,
                              acc_t scale) {
  constexpr acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  std::fill(w.max_score.begin(), w.max_score.begin() + m, neg_inf);
  std::fill(w.sum.begin(), w.sum.begin() + m, acc_t(0));
  fill_zero(w.acc.data(), m * d);
  acc_t* scores = w.scores.data();
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t count = std::min(kBlock, end - block);
    load_block(k, v, n, h, block, count, d, w);
    for (int64_t i = 0; i < m; ++i) {
      const acc_t* q = w.queries.data() + i * d;
      int64_t j = 0;
      for (; j + 4 <= count; j += 4) Ops::dot4(q, w.key_ptrs.data() + j, d, scores + j);
      for (; j < count; ++j) scores[j] = Ops::dot(q, w.key_ptrs[j], d);
      acc_t top = w.max_score[i];
      bool any_absent = false;
      for (j = 0; j < count; ++j) {
        scores[j] *= scale;
        top = (scores[j] > top || std::isnan(scores[j])) ? scores[j] : top;  // a NaN score poisons the row
        any_absent |= key_is_absent(scores[j], neg_inf);
      }
      if (block_is_empty(top, neg_inf)) continue;  // no present key so far: nothing to add, no exp(-inf + inf)
      // The values the block reads: an absent key's is a row of zeros (its weight is 0, its value may be inf or NaN).
      const acc_t* const* values = w.value_ptrs.data();
      if (any_absent) {
        for (j = 0; j < count; ++j) {
          w.present_value_ptrs[j] = key_is_absent(scores[j], neg_inf) ? w.zeros.data() : w.value_ptrs[j];
        }
        values = w.present_value_ptrs.data();
      }
      acc_t* acc = w.acc.data() + i * d;
      const acc_t rescale = std::exp(w.max_score[i] - top);  // exp(-inf) = 0 until a present key was seen
      if (rescale != acc_t(1)) {
        for (int64_t e = 0; e < d; ++e) acc[e] *= rescale;
      }
      w.sum[i] = w.sum[i] * rescale + Ops::exp_sum(scores, top, count);
      w.max_score[i] = top;
      j = 0;
      for (; j + 4 <= count; j += 4) Ops::axpy4(acc, scores + j, values + j, d);
      for (; j < count; ++j) Ops::axpy(acc, scores[j], values[j], d);
    }
  }
  for (int64_t i = 0; i < m; ++i) {
    acc_t* o = w.acc.data() + i * d;
    if (w.sum[i] == acc_t(0)) {
      fill_zero(o, d);  // no present key
    } else {            // a NaN or +inf score made the sum NaN: out and lse become NaN, as in the reference
      const acc_t inv = acc_t(1) / w.sum[i];
      for (int64_t e = 0; e < d; ++e) o[e] *= inv;
    }
    w.max_score[i] = block_lse(w.max_score[i], w.sum[i], neg_inf);
  }
}

template <typename scalar_t>
struct CascadeArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q;
  int64_t q_stride_b, q_stride_h;
  KeyRows<scalar_t> prefix_k, prefix_v, suffix_k, suffix_v;
  const int32_t *cu, *prefix_lens, *suffix_lens;  // suffix_lens: nullptr = all T positions
  int64_t groups, q_heads, kv_heads, head_dim, prefix_len, suffix_len, max_group;
  int64_t splits, split_len;  // the prefix of a group is cut into `splits` ranges of split_len positions
  acc_t scale;
  acc_t *prefix_out, *prefix_lse;  // scratch [splits, B, Hq, Dh], [splits, B, Hq]
  scalar_t* out;                   // [B, Hq, Dh] contiguous
  acc_t* lse;                      // [B, Hq]

  int64_t ratio() const { return q_heads / kv_heads; }
};

// Packs the `ratio` query heads of key/value head hk of `count` rows starting at `first_row` into w.queries.
template <typename scalar_t, typename acc_t>
BRIDGE_OPS_INLINE void pack_queries(const CascadeArgs<scalar_t>& a, int64_t first_row, int64_t count, int64_t hk,
                                    Scratch<acc_t>& w) {
  const int64_t r = a.ratio();
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t j = 0; j < r; ++j) {
      convert(w.queries.data() + (i * r + j) * a.head_dim,
              a.q + (first_row + i) * a.q_stride_b + (hk * r + j) * a.q_stride_h, a.head_dim);
    }
  }
}

template <typename scalar_t, template <typename> class OpsFor>
BRIDGE_OPS_INLINE void prefix_chunk(const CascadeArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = a.ratio(), d = a.head_dim;
  Scratch<acc_t> w(a.max_group * r, d);
  const int64_t batch = a.cu[a.groups];
  for (int64_t t = begin; t < end; ++t) {
    const int64_t split = t % a.splits, hk = (t / a.splits) % a.kv_heads, g = t / (a.splits * a.kv_heads);
    const int64_t first_row = a.cu[g], rows = a.cu[g + 1] - a.cu[g];
    const int64_t start = std::min(a.prefix_len, a.prefix_len - a.prefix_lens[g] + split * a.split_len);
    pack_queries(a, first_row, rows, hk, w);
    attend<scalar_t, OpsFor<acc_t>>(w, rows * r, d, a.prefix_k, a.prefix_v, g, hk, start,
                                    std::min(a.prefix_len, start + a.split_len), a.scale);
    // Query i of the tile is head hk * r + i % r of row first_row + i / r; the scratch is [splits, B, Hq, Dh].
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t head0 = (split * batch + first_row + b) * a.q_heads + hk * r;
      std::copy_n(w.acc.data() + b * r * d, r * d, a.prefix_out + head0 * d);
      std::copy_n(w.max_score.data() + b * r, r, a.prefix_lse + head0);
    }
  }
}

BRIDGE_OPS_CPU_DISPATCH(prefix_chunk_for_cpu, prefix_chunk)

// Writes merge(o_a, lse_a, o_b, lse_b) (attention_merge.h) to out (converted; out may be o_a) and lse.
template <typename scalar_t, typename acc_t>
BRIDGE_OPS_INLINE void merge_into(const acc_t* o_a, acc_t lse_a, const acc_t* o_b, acc_t lse_b, int64_t d,
                                  scalar_t* out, acc_t* lse) {
  const MergeWeights<acc_t> m = merge_weights(lse_a, lse_b, -std::numeric_limits<acc_t>::infinity());
  // A side of weight 0 (an empty key set, or one outweighed beyond the accumulation type's range) is skipped, so
  // that its o is never read (it may be anything, NaN included).
  for (int64_t e = 0; e < d; ++e) {
    const acc_t a = m.weight_a == acc_t(0) ? acc_t(0) : m.weight_a * o_a[e];
    const acc_t b = m.weight_b == acc_t(0) ? acc_t(0) : m.weight_b * o_b[e];
    out[e] = static_cast<scalar_t>(a + b);
  }
  *lse = m.lse;
}

template <typename scalar_t, template <typename> class OpsFor>
BRIDGE_OPS_INLINE void suffix_chunk(const CascadeArgs<scalar_t>& a, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t r = a.ratio(), d = a.head_dim;
  Scratch<acc_t> w(r, d);
  for (int64_t t = begin; t < end; ++t) {
    const int64_t b = t / a.kv_heads, hk = t % a.kv_heads;
    const int64_t length = a.suffix_lens == nullptr ? a.suffix_len : a.suffix_lens[b];
    pack_queries(a, b, 1, hk, w);
    attend<scalar_t, OpsFor<acc_t>>(w, r, d, a.suffix_k, a.suffix_v, b, hk, 0, length, a.scale);
    const int64_t batch = a.cu[a.groups];
    for (int64_t j = 0; j < r; ++j) {
      const int64_t head = b * a.q_heads + hk * r + j;
      acc_t* o = w.acc.data() + j * d;
      for (int64_t split = 0; split < a.splits; ++split) {
        const int64_t part = split * batch * a.q_heads + head;
        merge_into(o, w.max_score[j], a.prefix_out + part * d, a.prefix_lse[part], d, o, &w.max_score[j]);
      }
      convert(a.out + head * d, o, d);
      a.lse[head] = w.max_score[j];
    }
  }
}

BRIDGE_OPS_CPU_DISPATCH(suffix_chunk_for_cpu, suffix_chunk)

// Tasks per parallel chunk: about 64k multiply-adds.
int64_t grain(int64_t work_per_task) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_task)); }

std::tuple<at::Tensor, at::Tensor> cascade_attention_cpu(const at::Tensor& q_in, const at::Tensor& prefix_k_in,
                                                         const at::Tensor& prefix_v_in, const at::Tensor& prefix_lens,
                                                         const at::Tensor& suffix_k_in, const at::Tensor& suffix_v_in,
                                                         const at::Tensor& cu_group_lens,
                                                         const std::optional<at::Tensor>& suffix_lens,
                                                         std::optional<double> scale) {
  const CascadeAttentionDims d = check_cascade_attention_args(q_in, prefix_k_in, prefix_v_in, prefix_lens, suffix_k_in,
                                                              suffix_v_in, suffix_lens, cu_group_lens);
  BRIDGE_CHECK(q_in.device().is_cpu(), "the CPU kernel got q on ", q_in.device());
  const at::Tensor cu = cu_group_lens.contiguous(), plens = prefix_lens.contiguous();
  const int64_t max_group = check_cu_group_lens_values(cu.const_data_ptr<int32_t>(), d.groups, d.batch);
  check_length_values(plens.const_data_ptr<int32_t>(), d.groups, d.prefix_len, "prefix_lens",
                      "valid prompt positions, right-aligned in prefix_k");
  std::optional<at::Tensor> slens;
  if (suffix_lens.has_value()) {
    slens = suffix_lens->contiguous();
    check_length_values(slens->const_data_ptr<int32_t>(), d.batch, d.suffix_len, "suffix_lens",
                        "valid positions from the start of suffix_k");
  }
  const at::Tensor q = with_unit_last_stride(q_in);
  const at::Tensor prefix_k = with_unit_last_stride(prefix_k_in), prefix_v = with_unit_last_stride(prefix_v_in);
  const at::Tensor suffix_k = with_unit_last_stride(suffix_k_in), suffix_v = with_unit_last_stride(suffix_v_in);
  const at::ScalarType stat = lse_dtype(q.scalar_type());
  at::Tensor out = at::empty({d.batch, d.q_heads, d.head_dim}, q.options());
  at::Tensor lse = at::empty({d.batch, d.q_heads}, q.options().dtype(stat));
  // Split the prefixes so that there are about two tasks per thread (each range at least kBlock positions): with few
  // groups and key/value heads, one task per (group, head) would leave threads idle.
  const int64_t tasks = d.groups * d.kv_heads;
  const int64_t splits = std::clamp<int64_t>((2 * at::get_num_threads() + tasks - 1) / tasks, 1,
                                             std::max<int64_t>(1, d.prefix_len / kBlock));
  const int64_t split_len = (d.prefix_len + splits - 1) / splits;
  at::Tensor prefix_out = at::empty({splits, d.batch, d.q_heads, d.head_dim}, q.options().dtype(stat));
  at::Tensor prefix_lse = at::empty({splits, d.batch, d.q_heads}, q.options().dtype(stat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "cascade_attention_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const CascadeArgs<scalar_t> args{q.const_data_ptr<scalar_t>(),
                                     q.stride(0),
                                     q.stride(1),
                                     key_rows<scalar_t>(prefix_k),
                                     key_rows<scalar_t>(prefix_v),
                                     key_rows<scalar_t>(suffix_k),
                                     key_rows<scalar_t>(suffix_v),
                                     cu.const_data_ptr<int32_t>(),
                                     plens.const_data_ptr<int32_t>(),
                                     slens.has_value() ? slens->const_data_ptr<int32_t>() : nullptr,
                                     d.groups,
                                     d.q_heads,
                                     d.kv_heads,
                                     d.head_dim,
                                     d.prefix_len,
                                     d.suffix_len,
                                     max_group,
                                     splits,
                                     split_len,
                                     static_cast<acc_t>(resolve_scale(scale, d.head_dim)),
                                     prefix_out.mutable_data_ptr<acc_t>(),
                                     prefix_lse.mutable_data_ptr<acc_t>(),
                                     out.mutable_data_ptr<scalar_t>(),
                                     lse.mutable_data_ptr<acc_t>()};
    const int64_t mean_group = std::max<int64_t>(1, d.batch / d.groups);
    at::parallel_for(0, tasks * splits, grain(mean_group * d.q_heads / d.kv_heads * split_len * d.head_dim),
                     [&](int64_t begin, int64_t end) { prefix_chunk_for_cpu<scalar_t>(args, begin, end); });
    at::parallel_for(0, d.batch * d.kv_heads, grain(d.q_heads / d.kv_heads * (d.suffix_len + 1) * d.head_dim),
                     [&](int64_t begin, int64_t end) { suffix_chunk_for_cpu<scalar_t>(args, begin, end); });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cpu(const at::Tensor& o_a, const at::Tensor& lse_a,
                                                              const at::Tensor& o_b, const at::Tensor& lse_b) {
  check_merge_args(o_a, lse_a, o_b, lse_b);
  BRIDGE_CHECK(o_a.device().is_cpu(), "the CPU kernel got o_a on ", o_a.device());
  const int64_t d = o_a.size(-1), rows = lse_a.numel();  // head dim 0 too: every row still gets its merged lse
  const at::Tensor a = o_a.contiguous(), b = o_b.contiguous(), la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(o_a.sizes(), o_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "merge_attention_states_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *pa = a.const_data_ptr<scalar_t>(), *pb = b.const_data_ptr<scalar_t>();
    const acc_t *pla = la.const_data_ptr<acc_t>(), *plb = lb.const_data_ptr<acc_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    acc_t* plse = lse.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, grain(4 * d), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row_a(d), row_b(d);
      for (int64_t i = begin; i < end; ++i) {
        convert(row_a.data(), pa + i * d, d);
        convert(row_b.data(), pb + i * d, d);
        merge_into(row_a.data(), pla[i], row_b.data(), plb[i], d, po + i * d, plse + i);
      }
    });
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CPU, m) {
  m.impl("cascade_attention", &cascade_attention_cpu);
  m.impl("merge_attention_states", &merge_attention_states_cpu);
}

}  // namespace bridge_ops::cpu
