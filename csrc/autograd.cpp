// Autograd kernels of the bridge_ops operators (device-independent: they call the ops back through the
// dispatcher, which picks the CPU or CUDA kernel): bridge_attention's backward, and bridge_block_decode's refusal
// of calls that would need one. Registered in C++ rather than from Python so that a call
// from Python, under no_grad included, never re-enters the interpreter: at decode shapes a Python autograd
// wrapper costs more than the kernel itself.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

namespace bridge_ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                const at::Tensor& cu_group_lens,
                                                const std::optional<at::Tensor>& key_mask,
                                                std::optional<double> scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bridge_ops::bridge_attention", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, std::optional<double>)>();
  return op.call(q, k, v, cu_group_lens, key_mask, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bridge_ops::bridge_attention_backward", "")
                             .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                                 const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const std::optional<at::Tensor>&, std::optional<double>)>();
  return op.call(grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask, scale);
}

class BridgeAttention : public torch::autograd::Function<BridgeAttention> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask,
                               std::optional<double> scale) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = call_forward(q, k, v, cu_group_lens, key_mask, scale);
    ctx->save_for_backward({q, k, v, lse, cu_group_lens, key_mask.value_or(at::Tensor())});
    ctx->saved_data["scale"] = scale;
    ctx->set_materialize_grads(false);
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &lse = saved[3], &cu = saved[4];
    const std::optional<at::Tensor> key_mask = saved[5].defined() ? std::optional<at::Tensor>(saved[5]) : std::nullopt;
    const std::optional<double> scale = ctx->saved_data["scale"].toOptional<double>();
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(q);
    const std::optional<at::Tensor> grad_lse = grads[1].defined() ? std::optional<at::Tensor>(grads[1]) : std::nullopt;
    auto [grad_q, grad_k, grad_v] = call_backward(grad_out, grad_lse, q, k, v, lse, cu, key_mask, scale);
    return {grad_q, grad_k, grad_v, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> bridge_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_group_lens,
                                                             const std::optional<at::Tensor>& key_mask,
                                                             std::optional<double> scale) {
  const variable_list result = BridgeAttention::apply(q, k, v, cu_group_lens, key_mask, scale);
  return {result[0], result[1]};
}

// bridge_block_decode has no backward: refuse a call that would need one instead of letting autograd treat the
// output as a constant.
at::Tensor bridge_block_decode_autograd(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                                        const at::Tensor& q_weight, const at::Tensor& k_weight,
                                        const at::Tensor& v_weight, const at::Tensor& o_weight,
                                        const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask,
                                        int64_t num_heads, std::optional<double> scale) {
  const bool needs_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || norm_weight.requires_grad() || q_weight.requires_grad() ||
                           k_weight.requires_grad() || v_weight.requires_grad() || o_weight.requires_grad());
  TORCH_CHECK(!needs_grad,
              "bridge_ops: bridge_block_decode has no backward (an inference op): call it under torch.no_grad(), "
              "or train through BridgeBlock.forward");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bridge_ops::bridge_block_decode", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&,
                                               const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const at::Tensor&, const std::optional<at::Tensor>&, int64_t,
                                               std::optional<double>)>();
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask,
                 num_heads, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, Autograd, m) {
  m.impl("bridge_attention", &bridge_attention_autograd);
  m.impl("bridge_block_decode", &bridge_block_decode_autograd);
}

}  // namespace bridge_ops
