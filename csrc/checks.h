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
  BRIDGE_CHECK(t.sizes() == ref.sizes(), name, " must have the same shape as ", ref_name, " ", ref.sizes(),
               ", got ", t.sizes());
  BRIDGE_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have the same dtype as ", ref_name, " (",
               ref.scalar_type(), "), got ", t.scalar_type());
  BRIDGE_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device(),
               "; all tensors must be on one device");
}

inline void check_cu_group_lens_meta(const at::Tensor& cu, const at::Tensor& q) {
  BRIDGE_CHECK(cu.scalar_type() == at::kInt, "cu_group_lens must be int32 (torch.int32), got ", cu.scalar_type());
  BRIDGE_CHECK(cu.dim() == 1, "cu_group_lens must be 1-D [G+1], got shape ", cu.sizes());
  BRIDGE_CHECK(cu.numel() >= 2, "cu_group_lens must hold at least 2 offsets ([0, B] for one group), got ",
               cu.numel());
  BRIDGE_CHECK(cu.device() == q.device(), "cu_group_lens is on ", cu.device(), " but q is on ", q.device(),
               "; all tensors must be on one device");
}

inline void check_key_mask(const std::optional<at::Tensor>& key_mask, const at::Tensor& q) {
  if (!key_mask.has_value()) return;
  const at::Tensor& m = *key_mask;
  BRIDGE_CHECK(m.scalar_type() == at::kBool, "key_mask must be bool (True = visible key), got ", m.scalar_type());
  BRIDGE_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == q.size(1),
               "key_mask must have shape [B, S] = [", q.size(0), ", ", q.size(1), "], got ", m.sizes());
  BRIDGE_CHECK(m.device() == q.device(), "key_mask is on ", m.device(), " but q is on ", q.device(),
               "; all tensors must be on one device");
}

// Checks q, k, v, cu_group_lens (shape/dtype/device only) and key_mask; returns the dimensions.
inline AttentionDims check_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const at::Tensor& cu_group_lens,
                                          const std::optional<at::Tensor>& key_mask) {
  BRIDGE_CHECK(q.dim() == 4, "q must have shape [B, S, H, Dh] (4 dims), got shape ", q.sizes());
  BRIDGE_CHECK(is_supported_float(q.scalar_type()), "q must be float16, bfloat16, float32 or float64, got ",
               q.scalar_type());
  check_like(k, "k", q, "q");
  check_like(v, "v", q, "q");
  BRIDGE_CHECK(q.size(0) > 0, "q has an empty batch (B = 0); bridge_attention needs at least one row");
  BRIDGE_CHECK(q.size(2) > 0 && q.size(3) > 0, "q must have H > 0 heads and Dh > 0 head_dim, got shape ",
               q.sizes());
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
    BRIDGE_CHECK(size > 0, "cu_group_lens must be strictly increasing (every group has at least one row), got "
                 "cu_group_lens[", g, "] = ", cu[g], " and cu_group_lens[", g + 1, "] = ", cu[g + 1]);
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
    BRIDGE_CHECK(grad_lse->device() == q.device(), "grad_lse is on ", grad_lse->device(), " but q is on ",
                 q.device());
  }
}

// Accumulation dtype of lse (and of every softmax statistic): float64 for float64 inputs, else float32.
inline at::ScalarType lse_dtype(at::ScalarType input) { return input == at::kDouble ? at::kDouble : at::kFloat; }

// Default softmax scale: head_dim ** -0.5.
inline double resolve_scale(std::optional<double> scale, int64_t head_dim) {
  return scale.has_value() ? *scale : std::pow(static_cast<double>(head_dim), -0.5);  // as Python head_dim ** -0.5
}

}  // namespace bridge_ops
