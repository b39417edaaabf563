// The host of bridge_attention and bridge_attention_backward (csrc/host/launcher.h): checks (csrc/checks.h, as every
// backend), cu_group_lens validated once per tensor, launch.h's plan, the params struct of the plan's kernel
// (bridge_attention.cuh: fast kernels <T, TD> or simple kernels <T, A>), the launch, the casts of the simple kernels'
// accumulation-type outputs.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>

#include "hosts.h"

namespace bridge_ops::host {
namespace {

namespace kn = bridge_ops::kernels;

constexpr int64_t kIntMax = 2147483647;

at::Tensor empty_rows(const at::Tensor& q, at::ScalarType dtype) {
  return at::empty(q.sizes(), q.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

kn::RowsArg rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

// Shapes, dtypes and devices only (no device work), before the device guard.
AttentionDims check_args(const Launcher& launcher, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask) {
  const AttentionDims d = check_attention_args(q, k, v, cu_group_lens, key_mask);
  check_launcher_device(launcher, q, "q");
  return d;
}

// Under the device guard: cu_group_lens validated, the launch plan, and the problem part of the params (`cu`: the
// contiguous offsets the kernel reads; Problem::aligned is set per kernel by the caller).
struct Setup {
  kn::Problem problem;
  kn::LaunchPlan plan;
};

Setup setup(Launcher& launcher, const AttentionDims& d, const at::Tensor& q, const at::Tensor& cu_group_lens,
            const at::Tensor& cu, const std::optional<at::Tensor>& mask, std::optional<double> scale, bool backward) {
  BRIDGE_CHECK(d.batch <= kIntMax && d.seqlen <= kIntMax && d.heads <= kIntMax && d.head_dim <= kIntMax,
               "the CUDA kernels take B, S, H and Dh below 2^31, got shape ", q.sizes());
  const int64_t max_group = validated_max_group(launcher, cu_group_lens, d.batch);
  Setup s;
  s.problem.cu = cu.const_data_ptr<int32_t>();
  s.problem.mask = mask.has_value() ? static_cast<const unsigned char*>(mask->const_data_ptr()) : nullptr;
  s.problem.mask_sb = mask.has_value() ? mask->stride(0) : 0;
  s.problem.mask_ss = mask.has_value() ? mask->stride(1) : 0;
  s.problem.scale = resolve_scale(scale, d.head_dim);
  s.problem.batch = static_cast<int>(d.batch);
  s.problem.seqlen = static_cast<int>(d.seqlen);
  s.problem.heads = static_cast<int>(d.heads);
  s.problem.dim = static_cast<int>(d.head_dim);
  s.problem.groups = static_cast<int>(d.groups);
  s.problem.aligned = 0;
  s.plan = kn::plan_launch(q.scalar_type() == at::kDouble, s.problem.dim, d.seqlen * d.groups * d.heads,
                           launcher.num_sms(q.device().index()), backward, max_group);
  BRIDGE_CHECK(s.plan.blocks <= kIntMax, "too many (position, group, head) tasks for one launch: ", s.plan.blocks,
               " blocks");
  return s;
}

// The plan's kernel: the fast one of its register layout, or the simple one.
std::string kernel(const kn::LaunchPlan& plan, bool backward, at::ScalarType dtype) {
  const kn::Kernel k = plan.fast ? (backward ? kn::Kernel::kBridgeBwd : kn::Kernel::kBridgeFwd)
                                 : (backward ? kn::Kernel::kBridgeBwdSimple : kn::Kernel::kBridgeFwdSimple);
  return kn::kernel_name(k, kernel_dtype(dtype), plan.td);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bridge_attention(Launcher& launcher, const at::Tensor& q_in, const at::Tensor& k_in,
                                                    const at::Tensor& v_in, const at::Tensor& cu_group_lens,
                                                    const std::optional<at::Tensor>& key_mask,
                                                    std::optional<double> scale) {
  const AttentionDims d = check_args(launcher, q_in, k_in, v_in, cu_group_lens, key_mask);
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor cu = cu_group_lens.contiguous();
  const Setup s = setup(launcher, d, q, cu_group_lens, cu, key_mask, scale, false);
  const at::ScalarType dtype = q.scalar_type();
  at::Tensor out = empty_rows(q, dtype);
  at::Tensor lse = at::empty({d.batch, d.seqlen, d.heads}, q.options().dtype(lse_dtype(dtype)));
  if (s.plan.blocks == 0) return {out, lse};  // S = 0: nothing to compute (an empty grid is a launch error)
  // The simple kernels write accumulation-type outputs (float32 for the 16-bit types, cast below).
  at::Tensor out_acc = s.plan.fast || dtype == at::kDouble ? out : empty_rows(q, at::kFloat);
  kn::ForwardParams params{s.problem, rows(q), rows(k), rows(v), rows(out_acc), lse.data_ptr()};
  if (s.plan.fast) params.problem.aligned = kn::rows_aligned(params, static_cast<int>(q.element_size()));
  launcher.launch(kernel(s.plan, false, dtype), kn::grid_of(s.plan), params);
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward(
    Launcher& launcher, const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in,
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& lse_in,
    const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  const AttentionDims d = check_args(launcher, q_in, k_in, v_in, cu_group_lens, key_mask);
  check_attention_backward_args(grad_out_in, grad_lse_in, q_in, lse_in);
  const c10::DeviceGuard guard(q_in.device());
  const at::ScalarType dtype = q_in.scalar_type(), stat = lse_dtype(dtype);
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor grad_out = with_unit_last_stride(grad_out_in);
  const at::Tensor lse = lse_in.to(stat).contiguous();
  std::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(stat).contiguous();
  const at::Tensor cu = cu_group_lens.contiguous();
  const Setup s = setup(launcher, d, q, cu_group_lens, cu, key_mask, scale, true);
  if (s.plan.blocks == 0) {  // S = 0
    return {empty_rows(q, dtype), empty_rows(q, dtype), empty_rows(q, dtype)};
  }
  const at::ScalarType grad_dtype = s.plan.fast ? dtype : stat;  // the simple kernels write accumulation-type grads
  at::Tensor dq = empty_rows(q, grad_dtype), dk = empty_rows(q, grad_dtype), dv = empty_rows(q, grad_dtype);
  at::Tensor ws;
  if (s.plan.workspace) ws = at::empty({d.batch * d.seqlen * d.heads * 2}, q.options().dtype(at::kFloat));
  kn::BackwardParams params{s.problem,
                            rows(grad_out),
                            rows(q),
                            rows(k),
                            rows(v),
                            rows(dq),
                            rows(dk),
                            rows(dv),
                            lse.const_data_ptr(),
                            grad_lse.has_value() ? grad_lse->const_data_ptr() : nullptr,
                            ws.defined() ? ws.mutable_data_ptr<float>() : nullptr};
  if (s.plan.fast) params.problem.aligned = kn::rows_aligned(params, static_cast<int>(q.element_size()));
  launcher.launch(kernel(s.plan, true, dtype), kn::grid_of(s.plan), params);
  if (grad_dtype == dtype) return {dq, dk, dv};
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace bridge_ops::host
