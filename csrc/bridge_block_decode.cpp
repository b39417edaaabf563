// bridge_block_decode: one inference step of a BridgeBlock in a single call.
//
//   normed = weight * (hidden * rsqrt(mean(hidden^2) + eps))      (HF Llama-style RMSNorm, computed in float32)
//   q, k, v = normed @ Wq^T, normed @ Wk^T, normed @ Wv^T         ([B, S, d_bridge] seen as [B, S, H, Dh])
//   return hidden + bridge_attention(q, k, v, cu_group_lens, key_mask, scale) @ Wo^T
//
// Device-independent (ATen ops and the bridge_attention kernel of the tensors' device, called below autograd), so it
// is registered once as CompositeExplicitAutograd: it has no backward, which is what a decode step needs.
// Generation calls it once per layer and step instead of ~10 Python-level ops. In a decode step (S = 1) on the CPU its
// projections go through decode_linear (each weight row read once for the few rows); every other call (prompts,
// teacher-forced no-grad forwards) keeps at::linear, so a forward's numerics do not depend on how many rows it has.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace bridge_ops {
namespace {

void check_device(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  BRIDGE_CHECK(t.device() == hidden.device(), name, " is on ", t.device(), " but hidden is on ", hidden.device(),
               "; all tensors must be on one device");
}

void check_weight(const at::Tensor& w, const char* name, int64_t rows, int64_t cols, const at::Tensor& hidden) {
  BRIDGE_CHECK(w.dim() == 2 && w.size(0) == rows && w.size(1) == cols, name, " must have shape [", rows, ", ", cols,
               "], got ", w.sizes());
  BRIDGE_CHECK(w.scalar_type() == hidden.scalar_type(), name, " must have the dtype of hidden (", hidden.scalar_type(),
               "), got ", w.scalar_type());
  check_device(w, name, hidden);
}

// x @ w^T: decode_linear for a decode step on the CPU, at::linear otherwise.
at::Tensor project(const at::Tensor& x, const at::Tensor& w, bool decode_step) {
  if (!decode_step || !x.device().is_cpu()) return at::linear(x, w);
  static const auto decode_linear =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bridge_ops::decode_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return decode_linear.call(x, w, std::nullopt);
}

at::Tensor bridge_block_decode(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                               const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& v_weight,
                               const at::Tensor& o_weight, const at::Tensor& cu_group_lens,
                               const std::optional<at::Tensor>& key_mask, int64_t num_heads,
                               std::optional<double> scale) {
  BRIDGE_CHECK(hidden.dim() == 3, "hidden must have shape [B, S, D], got ", hidden.sizes());
  BRIDGE_CHECK(is_supported_float(hidden.scalar_type()), "hidden must be float16, bfloat16, float32 or float64, got ",
               hidden.scalar_type());
  BRIDGE_CHECK(eps > 0 && std::isfinite(eps), "eps must be a finite number > 0 (the RMSNorm epsilon, e.g. 1e-6), got ",
               eps);
  const int64_t batch = hidden.size(0), seqlen = hidden.size(1), dim = hidden.size(2);
  const int64_t d_bridge = q_weight.dim() == 2 ? q_weight.size(0) : -1;
  BRIDGE_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == dim, "norm_weight must have shape [", dim, "], got ",
               norm_weight.sizes());
  BRIDGE_CHECK(norm_weight.scalar_type() == hidden.scalar_type(), "norm_weight must have the dtype of hidden (",
               hidden.scalar_type(), "), got ", norm_weight.scalar_type());
  check_device(norm_weight, "norm_weight", hidden);
  check_device(cu_group_lens, "cu_group_lens", hidden);
  if (key_mask.has_value()) check_device(*key_mask, "key_mask", hidden);
  check_weight(q_weight, "q_weight", d_bridge, dim, hidden);
  check_weight(k_weight, "k_weight", d_bridge, dim, hidden);
  check_weight(v_weight, "v_weight", d_bridge, dim, hidden);
  check_weight(o_weight, "o_weight", dim, d_bridge, hidden);
  BRIDGE_CHECK(num_heads >= 1 && d_bridge % num_heads == 0, "num_heads (", num_heads,
               ") must be >= 1 and divide d_bridge (", d_bridge, ")");

  const at::Tensor x = hidden.to(lse_dtype(hidden.scalar_type()));
  const at::Tensor normed =
      (x * at::rsqrt(x.square().mean(-1, /*keepdim=*/true) + eps)).to(hidden.scalar_type()) * norm_weight;
  const std::vector<int64_t> heads{batch, seqlen, num_heads, d_bridge / num_heads};
  const bool step = seqlen == 1;
  static const auto attention = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("bridge_ops::bridge_attention", "")
                                    .typed<std::tuple<at::Tensor, at::Tensor>(
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, std::optional<double>)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::Tensor mixed = std::get<0>(
      attention.call(project(normed, q_weight, step).view(heads), project(normed, k_weight, step).view(heads),
                     project(normed, v_weight, step).view(heads), cu_group_lens, key_mask, scale));
  return hidden + project(mixed.view({batch, seqlen, d_bridge}), o_weight, step);
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CompositeExplicitAutograd, m) { m.impl("bridge_block_decode", &bridge_block_decode); }

}  // namespace bridge_ops
