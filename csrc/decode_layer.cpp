// decode_layer: one Llama-family decoder layer (Llama, Mistral, Qwen2) for one new token per row, over the
// shared-prefix cache, in a single call.
//
//   x = rms_norm(hidden, input_norm_weight)                           (HF's LlamaRMSNorm: float32, then the weight)
//   q, k, v = decode_linear(x, W_q|k|v, b_q|k|v)                       ([B, Hq, Dh], [B, Hkv, Dh], [B, Hkv, Dh])
//   q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin          (HF's apply_rotary_pos_emb)
//   suffix_k[:, :, slot], suffix_v[:, :, slot] = k, v                               (written in place)
//   a = cascade_attention(q, prefix_k/v, prefix_lens, suffix_k/v[:, :, :slot+1], cu_group_lens, scale=scaling)
//   hidden = hidden + decode_linear(a, W_o, b_o)
//   x = rms_norm(hidden, post_norm_weight)
//   return hidden + decode_linear(silu(decode_linear(x, W_gate)) * decode_linear(x, W_up), W_down)
//
// The same ATen operations in the same order as bridge_ops.hf.decode_step's Python layer (which is HF's forward
// for these layers), so the result is bit-identical to it; what it saves is the Python between the ~25 operations of
// a layer (about a fifth of a decode step of SmolLM2-135M on a 2-core CPU). Device-independent (ATen and the ops of
// the tensors' device, called below autograd), registered once as CompositeExplicitAutograd. No backward: an
// inference op for decode steps under torch.no_grad.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "checks.h"

namespace bridge_ops {
namespace {

constexpr int64_t kProjections = 7;  // q, k, v, o, gate, up, down
enum Projection { kQ, kK, kV, kO, kGate, kUp, kDown };
const char* const kProjectionNames[kProjections] = {"q", "k", "v", "o", "gate", "up", "down"};

// HF's LlamaRMSNorm.forward (also Mistral's and Qwen2's), op for op: the weight times the float32 normalization cast
// back to the input dtype.
at::Tensor hf_rms_norm(const at::Tensor& hidden, const at::Tensor& weight, double eps) {
  const at::Tensor x = hidden.to(at::kFloat);
  const at::Tensor variance = x.pow(2).mean(-1, /*keepdim=*/true);
  return weight * (x * at::rsqrt(variance + eps)).to(hidden.scalar_type());
}

// HF's apply_rotary_pos_emb for one tensor: x [B, H, Dh], cos/sin [B, 1, Dh].
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return (x * cos) + (rotated * sin);
}

at::Tensor project(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bridge_ops::decode_linear", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
  return op.call(x, w, b);
}

at::Tensor cascade(const at::Tensor& q, const at::Tensor& prefix_k, const at::Tensor& prefix_v,
                   const at::Tensor& prefix_lens, const at::Tensor& suffix_k, const at::Tensor& suffix_v,
                   const at::Tensor& cu_group_lens, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("bridge_ops::cascade_attention", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, std::optional<double>)>();
  return std::get<0>(
      op.call(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu_group_lens, std::nullopt, scale));
}

void check_args(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                const at::Tensor& input_norm_weight, double input_norm_eps, const at::Tensor& post_norm_weight,
                double post_norm_eps, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                const at::Tensor& suffix_k, const at::Tensor& suffix_v, int64_t slot) {
  BRIDGE_CHECK(hidden.dim() == 3 && hidden.size(1) == 1, "hidden must have shape [B, 1, D] (one token per row), got ",
               hidden.sizes());
  const int64_t rows = hidden.size(0), dim = hidden.size(2);
  BRIDGE_CHECK(cos.dim() == 2 && cos.size(0) == rows && cos.size(1) % 2 == 0, "cos must have shape [B = ", rows,
               ", head_dim] with an even head_dim, got ", cos.sizes());
  check_like(sin, "sin", cos, "cos");
  for (const auto& [w, name, eps] : {std::make_tuple(&input_norm_weight, "input_norm_weight", input_norm_eps),
                                     std::make_tuple(&post_norm_weight, "post_norm_weight", post_norm_eps)}) {
    BRIDGE_CHECK(w->dim() == 1 && w->size(0) == dim, name, " must have shape [D = ", dim, "], got ", w->sizes());
    BRIDGE_CHECK(eps > 0 && std::isfinite(eps), name, "'s eps must be a finite number > 0, got ", eps);
  }
  BRIDGE_CHECK(weights.size() == kProjections, "weights must hold the ", kProjections,
               " projection weights (q, k, v, o, gate, up, down), got ", weights.size());
  BRIDGE_CHECK(biases.size() == kProjections, "biases must hold ", kProjections,
               " entries (q, k, v, o, gate, up, down; None where a projection has no bias), got ", biases.size());
  for (int64_t i = 0; i < kProjections; ++i) {
    BRIDGE_CHECK(weights[i].dim() == 2, "weights[", i, "] (", kProjectionNames[i],
                 ") must be [out_features, in_features], got ", weights[i].sizes());
  }
  const int64_t head_dim = cos.size(1);
  for (const auto& [t, name] : {std::make_pair(&suffix_k, "suffix_k"), std::make_pair(&suffix_v, "suffix_v")}) {
    BRIDGE_CHECK(t->dim() == 4 && t->size(0) == rows && t->size(3) == head_dim, name,
                 " must be the suffix buffer [B = ", rows, ", Hkv, capacity, Dh = ", head_dim, "], got ", t->sizes());
  }
  BRIDGE_CHECK(slot >= 0 && slot < suffix_k.size(2), "slot must index the suffix buffers' capacity [0, ",
               suffix_k.size(2), "), got ", slot);
}

at::Tensor decode_layer(const at::Tensor& hidden, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& input_norm_weight, double input_norm_eps, const at::Tensor& post_norm_weight,
                        double post_norm_eps, at::TensorList weights,
                        const c10::List<std::optional<at::Tensor>>& biases, const at::Tensor& prefix_k,
                        const at::Tensor& prefix_v, const at::Tensor& prefix_lens, const at::Tensor& suffix_k,
                        const at::Tensor& suffix_v, int64_t slot, const at::Tensor& cu_group_lens, double scaling) {
  check_args(hidden, cos, sin, input_norm_weight, input_norm_eps, post_norm_weight, post_norm_eps, weights, biases,
             suffix_k, suffix_v, slot);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t rows = hidden.size(0), head_dim = cos.size(1);
  const auto bias = [&](Projection p) { return biases.get(p); };
  const at::Tensor x = hf_rms_norm(hidden, input_norm_weight, input_norm_eps);
  const at::Tensor q = project(x, weights[kQ], bias(kQ)).view({rows, -1, head_dim});
  const at::Tensor k = project(x, weights[kK], bias(kK)).view({rows, -1, head_dim});
  const at::Tensor v = project(x, weights[kV], bias(kV)).view({rows, -1, 1, head_dim});
  const at::Tensor c = cos.unsqueeze(1), s = sin.unsqueeze(1);
  const at::Tensor q_rotated = rotate(q, c, s), k_rotated = rotate(k, c, s);
  suffix_k.narrow(2, slot, 1).copy_(k_rotated.unsqueeze(2));
  suffix_v.narrow(2, slot, 1).copy_(v);
  const at::Tensor attended = cascade(q_rotated, prefix_k, prefix_v, prefix_lens, suffix_k.narrow(2, 0, slot + 1),
                                      suffix_v.narrow(2, 0, slot + 1), cu_group_lens, scaling);
  const at::Tensor after_attention = hidden + project(attended.reshape({rows, 1, -1}), weights[kO], bias(kO));
  const at::Tensor y = hf_rms_norm(after_attention, post_norm_weight, post_norm_eps);
  const at::Tensor gated = at::silu(project(y, weights[kGate], bias(kGate))) * project(y, weights[kUp], bias(kUp));
  return after_attention + project(gated, weights[kDown], bias(kDown));
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CompositeExplicitAutograd, m) { m.impl("decode_layer", &decode_layer); }

}  // namespace bridge_ops
