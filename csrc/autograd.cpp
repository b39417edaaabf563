// Autograd kernels of the bridge_ops operators (device-independent: they call the ops back through the
// dispatcher, which picks the CPU or CUDA kernel): bridge_attention's backward, and the refusal of the backward op
// (no double backward) and of the inference ops (bridge_block_decode, cascade_attention,
// merge_attention_states) to run where a backward would be needed.
// Registered in C++ rather than from Python so that a call from Python, under no_grad included, never re-enters the
// interpreter: at decode shapes a Python autograd wrapper costs more than the kernel itself.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
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

// The backward is a fused kernel without a backward of its own. Where its result could be differentiated again
// (create_graph=True through bridge_attention), the gradients it returns hang on an Error node (what
// torch.autograd.function.once_differentiable does): a double backward raises instead of returning zeros.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward_autograd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& lse, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  const bool differentiable = torch::autograd::compute_requires_grad(grad_out, grad_lse, q, k, v, lse);
  auto grads = [&] {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_backward(grad_out, grad_lse, q, k, v, lse, cu_group_lens, key_mask, scale);
  }();
  if (differentiable) {
    const auto error = c10::make_intrusive<torch::autograd::Error>(
        "bridge_ops: bridge_attention has no double backward (its backward is a fused kernel without a backward): "
        "use bridge_ops.reference.bridge_attention (plain PyTorch) for higher-order gradients",
        torch::autograd::collect_next_edges(grad_out, grad_lse, q, k, v, lse));
    torch::autograd::set_history({std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)}, error);
  }
  return grads;
}

std::tuple<at::Tensor, at::Tensor> bridge_attention_autograd(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_group_lens,
                                                             const std::optional<at::Tensor>& key_mask,
                                                             std::optional<double> scale) {
  const variable_list result = BridgeAttention::apply(q, k, v, cu_group_lens, key_mask, scale);
  return {result[0], result[1]};
}

// The inference ops have no backward: refuse a call that would need one instead of letting autograd treat the output as
// a constant.
void refuse_grad(const char* op, std::initializer_list<at::Tensor> inputs, const char* instead) {
  if (!at::GradMode::is_enabled()) return;
  for (const at::Tensor& t : inputs) {
    TORCH_CHECK(!t.requires_grad(), "bridge_ops: ", op, " has no backward (an inference op): call it under ",
                "torch.no_grad(), or ", instead);
  }
}

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor bridge_block_decode_autograd(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                                        const at::Tensor& q_weight, const at::Tensor& k_weight,
                                        const at::Tensor& v_weight, const at::Tensor& o_weight,
                                        const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask,
                                        int64_t num_heads, std::optional<double> scale) {
  refuse_grad("bridge_block_decode", {hidden, norm_weight, q_weight, k_weight, v_weight, o_weight},
              "train through BridgeBlock.forward");
  static const auto op =
      find_op<at::Tensor(const at::Tensor&, const at::Tensor&, double, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         int64_t, std::optional<double>)>("bridge_ops::bridge_block_decode");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(hidden, norm_weight, eps, q_weight, k_weight, v_weight, o_weight, cu_group_lens, key_mask, num_heads,
                 scale);
}

std::tuple<at::Tensor, at::Tensor> cascade_attention_autograd(const at::Tensor& q, const at::Tensor& prefix_k,
                                                              const at::Tensor& prefix_v, const at::Tensor& prefix_lens,
                                                              const at::Tensor& suffix_k, const at::Tensor& suffix_v,
                                                              const at::Tensor& cu_group_lens,
                                                              const std::optional<at::Tensor>& suffix_lens,
                                                              std::optional<double> scale) {
  refuse_grad("cascade_attention", {q, prefix_k, prefix_v, suffix_k, suffix_v},
              "train with ordinary attention over the expanded keys");
  static const auto op = find_op<std::tuple<at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, const std::optional<at::Tensor>&, std::optional<double>)>("bridge_ops::cascade_attention");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(q, prefix_k, prefix_v, prefix_lens, suffix_k, suffix_v, cu_group_lens, suffix_lens, scale);
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_autograd(const at::Tensor& o_a, const at::Tensor& lse_a,
                                                                   const at::Tensor& o_b, const at::Tensor& lse_b) {
  refuse_grad("merge_attention_states", {o_a, lse_a, o_b, lse_b}, "merge with ordinary PyTorch ops");
  static const auto op =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&)>("bridge_ops::merge_attention_states");
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(o_a, lse_a, o_b, lse_b);
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, Autograd, m) {
  m.impl("bridge_attention", &bridge_attention_autograd);
  m.impl("bridge_attention_backward", &bridge_attention_backward_autograd);
  m.impl("bridge_block_decode", &bridge_block_decode_autograd);
  m.impl("cascade_attention", &cascade_attention_autograd);
  m.impl("merge_attention_states", &merge_attention_states_autograd);
}

}  // namespace bridge_ops
