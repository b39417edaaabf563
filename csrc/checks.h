// Argument checks shared by every backend of every bridge_ops operator.
//
// Each failed check raises a Python ValueError (TORCH_CHECK_VALUE) whose message names the offending
// argument and says what was expected and what was received. The checks here are device-independent:
// they read shapes, dtypes and devices only. Checks that must read tensor *contents*
// (cu_group_lens offsets) take a host pointer so that each backend decides how to obtain one.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <utility>

namespace bridge_ops {

#define BRIDGE_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "bridge_ops: ", __VA_ARGS__)

// Shapes of one call of bridge_attention: q, k, v are [batch, seqlen, heads, head_dim].
struct AttentionDims {
  int64_t batch;
  int64_t seqlen;
  int64_t heads;
  int64_t head_dim;
  int64_t groups;  // G = cu_group_lens.numel() - 1
};

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `name` must have the same shape, dtype and device as `ref` (named `ref_name`).
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  BRIDGE_CHECK(t.sizes() == ref.sizes(), name, " must have the same shape as ", ref_name, " ", ref.sizes(), ", got ",
               t.sizes());
  BRIDGE_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
               ref.scalar_type(), "), got ", t.scalar_type());
  BRIDGE_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
               "; all tensors must be on one device");
}

inline void check_cu_group_lens_meta(const at::Tensor& cu, const at::Tensor& q) {
  BRIDGE_CHECK(cu.scalar_type() == at::kInt, "cu_group_lens must be int32 (torch.int32), got ", cu.scalar_type());
  BRIDGE_CHECK(cu.dim() == 1, "cu_group_lens must be 1-D [G+1], got shape ", cu.sizes());
  BRIDGE_CHECK(cu.numel() >= 2, "cu_group_lens must hold at least 2 offsets ([0, B] for one group), got ", cu.numel());
  BRIDGE_CHECK(cu.device() == q.device(), "cu_group_lens is on ", cu.device(), " but q is on ", q.device(),
               "; all tensors must be on one device");
}

inline void check_key_mask(const std::optional<at::Tensor>& key_mask, const at::Tensor& q) {
  if (!key_mask.has_value()) return;
  const at::Tensor& m = *key_mask;
  BRIDGE_CHECK(m.scalar_type() == at::kBool, "key_mask must be bool (True = visible key), got ", m.scalar_type());
  BRIDGE_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(1), "key_mask must have shape [B, S] = [",
               q.size(0), ", ", q.size(1), "], got ", m.sizes());
  BRIDGE_CHECK(m.device() == q.device(), "key_mask is on ", m.device(), " but q is on ", q.device(),
               "; all tensors must be on one device");
}

// Checks q, k, v, cu_group_lens (shape/dtype/device only) and key_mask; returns the dimensions.
inline AttentionDims check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask) {
  BRIDGE_CHECK(q.dim() == 4, "q must have shape [B, S, H, Dh] (4 dims), got shape ", q.sizes());
  BRIDGE_CHECK(is_supported_float(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
               q.scalar_type());
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  BRIDGE_CHECK(q.size(0) > 0, "q has an empty batch (B = 0); bridge_attention needs at least one row");
  BRIDGE_CHECK(q.size(2) > 0 && q.size(3) > 0, "q must have H > 0 heads and Dh > 0 head_dim, got shape ", q.sizes());
  check_cu_group_lens_meta(cu_group_lens, q);
  check_key_mask(key_mask, q);
  return {q.size(0), q.size(1), q.size(2), q.size(3), cu_group_lens.numel() - 1};
}

// Validates the offsets themselves (host memory): cu[0] == 0, strictly increasing, cu[G] == batch.
// Returns the largest group size.
inline int64_t check_cu_group_lens_values(const int32_t* cu, int64_t groups, int64_t batch) {
  BRIDGE_CHECK(cu[0] == 0, "cu_group_lens must start at 0, got cu_group_lens[0] = ", cu[0]);
  int64_t max_group = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t size = static_cast<int64_t>(cu[g + 1]) - cu[g];
    BRIDGE_CHECK(size > 0,
                 "cu_group_lens must be strictly increasing (every group has at least one row), got "
                 "cu_group_lens[",
                 g, "] = ", cu[g], " and cu_group_lens[", g + 1, "] = ", cu[g + 1]);
    max_group = size > max_group ? size : max_group;
  }
  BRIDGE_CHECK(cu[groups] == batch, "cu_group_lens must end at the batch size B = ", batch,
               ", got cu_group_lens[-1] = ", cu[groups]);
  return max_group;
}

// Checks the extra arguments of the backward op against the forward's q (already checked).
inline void check_attention_backward_args(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse,
                                          const at::Tensor& q, const at::Tensor& lse) {
  check_like(grad_out, "grad_out", q, "q");
  BRIDGE_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
               "lse must have shape [B, S, H] = [", q.size(0), ", ", q.size(1), ", ", q.size(2), "], got ",
               lse.sizes());
  BRIDGE_CHECK(lse.device() == q.device(), "lse is on ", lse.device(), " but q is on ", q.device());
  if (grad_lse.has_value()) {
    BRIDGE_CHECK(grad_lse->sizes() == lse.sizes(), "grad_lse must have the shape of lse ", lse.sizes(), ", got ",
                 grad_lse->sizes());
    BRIDGE_CHECK(grad_lse->device() == q.device(), "grad_lse is on ", grad_lse->device(), " but q is on ", q.device());
  }
}

// Accumulation dtype of lse (and of every softmax statistic): float64 for float64 inputs, else float32.
inline at::ScalarType lse_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// The kernels need a contiguous last dimension; other strides are used as they are.
inline at::Tensor with_unit_last_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

// Default softmax scale: head_dim ** -0.5.
inline double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : std::pow(static_cast<double>(head_dim), -0.5);  // as Python head_dim ** -0.5
}

// Shapes of one call of cascade_attention: q [B, Hq, Dh]; prefix_k/v [G, Hkv, P, Dh]; suffix_k/v [B, Hkv, T, Dh].
struct CascadeAttentionDims {
  int64_t batch, q_heads, kv_heads, head_dim, groups, prefix_len, suffix_len;
};

// `name` is an int32 vector [n] on q's device.
inline void check_lengths(const at::Tensor& t, const char* name, int64_t n, const char* shape, const at::Tensor& q) {
  BRIDGE_CHECK(t.scalar_type() == at::kInt, name, " must be int32 (torch.int32), got ", t.scalar_type());
  BRIDGE_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape ", shape, " = [", n, "], got ", t.sizes());
  BRIDGE_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
               "; all tensors must be on one device");
}

// `name` is [d0, d1, any, head_dim] with q's dtype and device.
inline void check_kv(const at::Tensor& t, const char* name, const char* shape, int64_t d0, int64_t d1, int64_t head_dim,
                     const at::Tensor& q) {
  BRIDGE_CHECK(t.dim() == 4 && t.size(0) == d0 && t.size(1) == d1 && t.size(3) == head_dim, name, " must have shape ",
               shape, " = [", d0, ", ", d1, ", *, ", head_dim, "], got ", t.sizes());
  BRIDGE_CHECK(t.scalar_type() == q.scalar_type(), name, " must have the dtype of q (", q.scalar_type(), "), got ",
               t.scalar_type());
  BRIDGE_CHECK(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
               "; all tensors must be on one device");
}

inline CascadeAttentionDims check_cascade_attention_args(const at::Tensor& q, const at::Tensor& prefix_k,
                                                         const at::Tensor& prefix_v, const at::Tensor& prefix_lens,
                                                         const at::Tensor& suffix_k, const at::Tensor& suffix_v,
                                                         const std::optional<at::Tensor>& suffix_lens,
                                                         const at::Tensor& cu_group_lens) {
  BRIDGE_CHECK(q.dim() == 3, "q must have shape [B, Hq, Dh] (3 dims: one new token per row), got shape ", q.sizes());
  BRIDGE_CHECK(is_supported_float(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
               q.scalar_type());
  BRIDGE_CHECK(q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0, "q must have B, Hq, Dh > 0, got shape ", q.sizes());
  BRIDGE_CHECK(prefix_k.dim() == 4, "prefix_k must have shape [G, Hkv, P, Dh] (4 dims), got shape ", prefix_k.sizes());
  const int64_t kv_heads = prefix_k.size(1);
  BRIDGE_CHECK(kv_heads > 0 && q.size(1) % kv_heads == 0, "the q heads (", q.size(1),
               ") must be a multiple of the key/value heads of prefix_k (", kv_heads, ")");
  check_cu_group_lens_meta(cu_group_lens, q);
  const int64_t groups = cu_group_lens.numel() - 1;
  check_kv(prefix_k, "prefix_k", "[G, Hkv, P, Dh]", groups, kv_heads, q.size(2), q);
  check_like(prefix_v, "prefix_v", prefix_k, "prefix_k");
  check_lengths(prefix_lens, "prefix_lens", groups, "[G]", q);
  check_kv(suffix_k, "suffix_k", "[B, Hkv, T, Dh]", q.size(0), kv_heads, q.size(2), q);
  check_like(suffix_v, "suffix_v", suffix_k, "suffix_k");
  if (suffix_lens.has_value()) check_lengths(*suffix_lens, "suffix_lens", q.size(0), "[B]", q);
  return {q.size(0), q.size(1), kv_heads, q.size(2), groups, prefix_k.size(2), suffix_k.size(2)};
}

// Validates length values (host memory): 0 <= lens[i] <= limit.
inline void check_length_values(const int32_t* lens, int64_t n, int64_t limit, const char* name, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    BRIDGE_CHECK(lens[i] >= 0 && lens[i] <= limit, name, " must lie in [0, ", limit, "] (", what, "), got ", name, "[",
                 i, "] = ", lens[i]);
  }
}

// Checks the arguments of merge_attention_states: o_a, o_b [..., Dh] alike; lse_a, lse_b [...] (o's leading dims) in
// the accumulation dtype of o.
inline void check_merge_args(const at::Tensor& o_a, const at::Tensor& lse_a, const at::Tensor& o_b,
                             const at::Tensor& lse_b) {
  BRIDGE_CHECK(o_a.dim() >= 1, "o_a must have shape [..., Dh] (at least 1 dim), got shape ", o_a.sizes());
  BRIDGE_CHECK(is_supported_float(o_a.scalar_type()), "o_a must be float16, bfloat16, float32 or float64, got ",
               o_a.scalar_type());
  check_like(o_b, "o_b", o_a, "o_a");
  const at::ScalarType stat = lse_dtype(o_a.scalar_type());
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{lse_a, "lse_a"}, {lse_b, "lse_b"}}) {
    BRIDGE_CHECK(t.sizes() == o_a.sizes().slice(0, o_a.dim() - 1), name, " must have shape ",
                 o_a.sizes().slice(0, o_a.dim() - 1), " (o_a without its last dim), got ", t.sizes());
    BRIDGE_CHECK(t.scalar_type() == stat, name, " must be ", stat, " (the lse dtype of ", o_a.scalar_type(),
                 " outputs), got ", t.scalar_type());
    BRIDGE_CHECK(t.device() == o_a.device(), name, " is on ", t.device(), " but o_a is on ", o_a.device(),
                 "; all tensors must be on one device");
  }
}

}  // namespace bridge_ops
