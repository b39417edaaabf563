// CUDA launchers of the cascade decode ops (prefix_suffix_attention, merge_attention_states), registered as their CUDA
// kernels. The kernels are in kernels/prefix_attention.cuh (also run by the tests' warp emulator), their launch plan
// in kernels/launch.h (plan_cascade, which the emulator tests read through bridge_ops._C.kernels); this file checks
// arguments (csrc/checks.h, as every backend), validates cu_group_lens once per tensor (csrc/group_validation.h) and
// launches on the current stream. prefix_lens / suffix_lens are not read on the host: the kernels clamp them into
// [0, P] / [0, T] (the CPU kernel raises instead).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../checks.h"
#include "../group_validation.h"
#include "kernels/prefix_attention.cuh"
#include "static_switch.h"

namespace bridge_ops::cuda {
namespace {

namespace kn = bridge_ops::kernels;

template <typename T>
kn::KeyView<T> key_view(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename T>
const T* in(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

void check_head_dim(int64_t head_dim) {
  BRIDGE_CHECK(head_dim <= kn::kWarpSize * kn::kCascadeMaxTd,
               "the CUDA cascade kernels take head_dim <= ", kn::kWarpSize * kn::kCascadeMaxTd, ", got ", head_dim);
}

template <typename T, typename A>
void launch_cascade(const at::Tensor& q, const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& plens,
                    const at::Tensor& sk, const at::Tensor& sv, const std::optional<at::Tensor>& slens,
                    const at::Tensor& cu, at::Tensor& out, at::Tensor& lse, const kn::CascadePlan& plan, double scale) {
  const kn::CascadeShape& shape = plan.shape;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  at::Tensor ws_o =
      at::empty({plan.workspace_chunks, shape.batch, shape.q_heads, shape.dim}, q.options().dtype(lse.scalar_type()));
  at::Tensor ws_lse = at::empty({plan.workspace_chunks, shape.batch, shape.q_heads}, lse.options());
  if (plan.prefix_blocks > 0) {
    BRIDGE_CHECK(plan.prefix_blocks <= 2147483647LL,
                 "too many (chunk, group, head) tasks for one launch: ", plan.prefix_blocks);
    kn::cascade_prefix_chunks<T, A>
        <<<static_cast<unsigned int>(plan.prefix_blocks), kn::kCascadeThreads, plan.prefix_smem_bytes, stream>>>(
            in<T>(q), q.stride(0), q.stride(1), key_view<T>(pk), key_view<T>(pv), plens.const_data_ptr<int32_t>(),
            cu.const_data_ptr<int32_t>(), ws_o.mutable_data_ptr<A>(), ws_lse.mutable_data_ptr<A>(), shape,
            static_cast<A>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  kn::cascade_suffix_merge<T, A><<<static_cast<unsigned int>(plan.merge_blocks), kn::kCascadeThreads, 0, stream>>>(
      in<T>(q), q.stride(0), q.stride(1), key_view<T>(sk), key_view<T>(sv),
      slens.has_value() ? slens->const_data_ptr<int32_t>() : nullptr, plens.const_data_ptr<int32_t>(),
      cu.const_data_ptr<int32_t>(), ws_o.const_data_ptr<A>(), ws_lse.const_data_ptr<A>(),
      reinterpret_cast<T*>(out.mutable_data_ptr()), lse.mutable_data_ptr<A>(), shape, static_cast<A>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> prefix_suffix_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in, const at::Tensor& prefix_lens,
    const at::Tensor& suffix_k_in, const at::Tensor& suffix_v_in, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& suffix_lens, std::optional<double> scale) {
  const PrefixAttentionDims d = check_prefix_attention_args(q_in, prefix_k_in, prefix_v_in, prefix_lens, suffix_k_in,
                                                            suffix_v_in, suffix_lens, cu_group_lens);
  BRIDGE_CHECK(q_in.is_cuda(), "the CUDA kernel got q on ", q_in.device());
  check_head_dim(d.head_dim);
  constexpr int64_t kIntMax = 2147483647;
  BRIDGE_CHECK(d.batch * d.q_heads <= kIntMax && d.prefix_len <= kIntMax && d.suffix_len <= kIntMax,
               "the CUDA cascade kernels take B * Hq, P and T below 2^31");
  c10::cuda::CUDAGuard guard(q_in.device());
  const bool may_read = c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  validated_max_group(cu_group_lens, d.batch, may_read, [](const at::Tensor& t) { return t.cpu().contiguous(); });
  const at::Tensor q = with_unit_last_stride(q_in), cu = cu_group_lens.contiguous();
  const at::Tensor prefix_k = with_unit_last_stride(prefix_k_in), prefix_v = with_unit_last_stride(prefix_v_in);
  const at::Tensor suffix_k = with_unit_last_stride(suffix_k_in), suffix_v = with_unit_last_stride(suffix_v_in);
  const at::Tensor plens = prefix_lens.contiguous();
  std::optional<at::Tensor> slens;
  if (suffix_lens.has_value()) slens = suffix_lens->contiguous();
  const at::ScalarType stat = lse_dtype(q.scalar_type());
  at::Tensor out = at::empty({d.batch, d.q_heads, d.head_dim}, q.options());
  at::Tensor lse = at::empty({d.batch, d.q_heads}, q.options().dtype(stat));
  const kn::CascadePlan plan =
      kn::plan_cascade(static_cast<int>(d.batch), static_cast<int>(d.q_heads), static_cast<int>(d.kv_heads),
                       static_cast<int>(d.head_dim), static_cast<int>(d.groups), static_cast<int>(d.prefix_len),
                       static_cast<int>(d.suffix_len), static_cast<int>(c10::elementSize(stat)));
  const double s = resolve_scale(scale, d.head_dim);
  BRIDGE_DTYPE_SWITCH(q.scalar_type(), T, A, [&] {
    launch_cascade<T, A>(q, prefix_k, prefix_v, plens, suffix_k, suffix_v, slens, cu, out, lse, plan, s);
  });
  return {out, lse};
}

template <typename T, typename A>
void launch_merge(const at::Tensor& a, const at::Tensor& la, const at::Tensor& b, const at::Tensor& lb, at::Tensor& out,
                  at::Tensor& lse, int64_t rows, int dim) {
  kn::merge_states<T, A>
      <<<static_cast<unsigned int>(rows), kn::kCascadeThreads, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
          in<T>(a), la.const_data_ptr<A>(), in<T>(b), lb.const_data_ptr<A>(),
          reinterpret_cast<T*>(out.mutable_data_ptr()), lse.mutable_data_ptr<A>(), dim);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states_cuda(const at::Tensor& o_a, const at::Tensor& lse_a,
                                                               const at::Tensor& o_b, const at::Tensor& lse_b) {
  check_merge_args(o_a, lse_a, o_b, lse_b);
  BRIDGE_CHECK(o_a.is_cuda(), "the CUDA kernel got o_a on ", o_a.device());
  check_head_dim(o_a.size(-1));
  c10::cuda::CUDAGuard guard(o_a.device());
  const at::Tensor a = o_a.contiguous(), b = o_b.contiguous(), la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(o_a.sizes(), o_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  const int dim = static_cast<int>(o_a.size(-1));
  const int64_t rows = lse_a.numel();  // head dim 0 too: every row still gets its merged lse
  BRIDGE_CHECK(rows <= 2147483647LL, "merge_attention_states on CUDA takes fewer than 2^31 rows, got ", rows);
  if (rows == 0) return {out, lse};
  BRIDGE_DTYPE_SWITCH(a.scalar_type(), T, A, [&] { launch_merge<T, A>(a, la, b, lb, out, lse, rows, dim); });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CUDA, m) {
  m.impl("prefix_suffix_attention", &prefix_suffix_attention_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace bridge_ops::cuda
