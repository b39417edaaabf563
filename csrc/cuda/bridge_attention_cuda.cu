// CUDA launchers of bridge_attention (forward and backward), registered as the ops' CUDA kernels.
//
// The kernels are in kernels/bridge_attention.cuh (also compiled at run time by the cupy backend and emulated on the
// CPU by the tests); what a launch looks like (plan, shared memory, parameter structs) is kernels/launch.h, which the
// cupy backend reads through bridge_ops._C.kernels. This file checks arguments (csrc/checks.h, as every backend),
// validates cu_group_lens once per tensor (csrc/group_validation.h), fills the kernel's parameter struct and launches
// the plan's kernel on the current stream of the tensors' device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../checks.h"
#include "../group_validation.h"
#include "kernels/bridge_attention.cuh"
#include "static_switch.h"

namespace bridge_ops::cuda {
namespace {

namespace kn = bridge_ops::kernels;

int num_sms(int device) {
  static std::mutex mutex;
  static std::vector<int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= static_cast<int>(counts.size())) counts.resize(device + 1, 0);
  if (counts[device] == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  }
  return counts[device];
}

at::Tensor empty_rows(const at::Tensor& q, at::ScalarType dtype) {
  return at::empty(q.sizes(), q.options().dtype(dtype).memory_format(at::MemoryFormat::Contiguous));
}

kn::RowsArg rows(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

template <typename Params>
void launch(void (*kernel)(Params), const kn::LaunchPlan& plan, const Params& params) {
  kernel<<<static_cast<unsigned int>(plan.blocks), plan.threads, plan.smem_bytes,
           c10::cuda::getCurrentCUDAStream().stream()>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Shape/dtype/device checks only (no device work): run before the device guard, so that a tensor on the wrong
// device is named in a ValueError rather than failing in the guard.
AttentionDims check_cuda_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu,
                              const std::optional<at::Tensor>& key_mask) {
  const AttentionDims d = check_attention_args(q, k, v, cu, key_mask);
  BRIDGE_CHECK(q.is_cuda(), "the CUDA kernel got q on ", q.device());
  return d;
}

// Under the device guard: cu_group_lens validated (once per tensor), the launch plan, the problem part of the
// kernel parameters (`cu`: the contiguous offsets the kernel reads).
struct Setup {
  kn::Problem problem;
  kn::LaunchPlan plan;
};

Setup setup(const AttentionDims& d, const at::Tensor& q, const at::Tensor& cu_group_lens, const at::Tensor& cu,
            const std::optional<at::Tensor>& mask, std::optional<double> scale, bool backward) {
  constexpr int64_t kIntMax = 2147483647;
  BRIDGE_CHECK(d.batch <= kIntMax && d.seqlen <= kIntMax && d.heads <= kIntMax && d.head_dim <= kIntMax,
               "the CUDA kernels take B, S, H and Dh below 2^31, got shape ", q.sizes());
  const bool may_read = c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  const int64_t max_group =
      validated_max_group(cu_group_lens, d.batch, may_read, [](const at::Tensor& t) { return t.cpu().contiguous(); });
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
                           num_sms(q.get_device()), backward, max_group);
  BRIDGE_CHECK(s.plan.blocks <= kIntMax, "too many (position, group, head) tasks for one launch: ", s.plan.blocks,
               " blocks");
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> bridge_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& cu_group_lens,
                                                         const std::optional<at::Tensor>& key_mask,
                                                         std::optional<double> scale) {
  const AttentionDims d = check_cuda_args(q_in, k_in, v_in, cu_group_lens, key_mask);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor cu = cu_group_lens.contiguous();
  const Setup s = setup(d, q, cu_group_lens, cu, key_mask, scale, false);
  const at::ScalarType dtype = q.scalar_type();
  at::Tensor out = empty_rows(q, dtype);
  at::Tensor lse = at::empty({d.batch, d.seqlen, d.heads}, q.options().dtype(lse_dtype(dtype)));
  if (s.plan.blocks == 0) return {out, lse};  // S = 0: nothing to compute (an empty grid is a launch error)
  // The simple kernels write accumulation-type outputs (float32 for the 16-bit types, cast below).
  at::Tensor out_acc = s.plan.fast || dtype == at::kDouble ? out : empty_rows(q, at::kFloat);
  kn::ForwardParams params{s.problem, rows(q), rows(k), rows(v), rows(out_acc), lse.data_ptr()};
  if (s.plan.fast) {
    params.problem.aligned = kn::rows_aligned(params, static_cast<int>(q.element_size()));
    BRIDGE_FAST_DTYPE_SWITCH(dtype, T, A, [&] {
      BRIDGE_TD_SWITCH(s.plan.td, TD, [&] { launch(kn::bridge_attention_fwd<T, TD>, s.plan, params); });
    });
  } else {
    BRIDGE_DTYPE_SWITCH(dtype, T, A, [&] { launch(kn::bridge_attention_fwd_simple<T, A>, s.plan, params); });
  }
  if (!out_acc.is_same(out)) out.copy_(out_acc);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& lse_in, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  const AttentionDims d = check_cuda_args(q_in, k_in, v_in, cu_group_lens, key_mask);
  check_attention_backward_args(grad_out_in, grad_lse_in, q_in, lse_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  const at::ScalarType dtype = q_in.scalar_type(), stat = lse_dtype(dtype);
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor grad_out = with_unit_last_stride(grad_out_in);
  const at::Tensor lse = lse_in.to(stat).contiguous();
  std::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(stat).contiguous();
  const at::Tensor cu = cu_group_lens.contiguous();
  const Setup s = setup(d, q, cu_group_lens, cu, key_mask, scale, true);
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
  if (s.plan.fast) {
    params.problem.aligned = kn::rows_aligned(params, static_cast<int>(q.element_size()));
    BRIDGE_FAST_DTYPE_SWITCH(dtype, T, A, [&] {
      BRIDGE_TD_SWITCH(s.plan.td, TD, [&] { launch(kn::bridge_attention_bwd<T, TD>, s.plan, params); });
    });
    return {dq, dk, dv};
  }
  BRIDGE_DTYPE_SWITCH(dtype, T, A, [&] { launch(kn::bridge_attention_bwd_simple<T, A>, s.plan, params); });
  if (grad_dtype == dtype) return {dq, dk, dv};
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CUDA, m) {
  m.impl("bridge_attention", &bridge_attention_cuda);
  m.impl("bridge_attention_backward", &bridge_attention_backward_cuda);
}

}  // namespace bridge_ops::cuda
