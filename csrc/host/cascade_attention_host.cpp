// The host of the cascade decode ops, cascade_attention and merge_attention_states (csrc/host/launcher.h):
// checks (csrc/checks.h, as every backend, plus the kernels' head_dim limit), cu_group_lens validated once per tensor,
// launch.h's plan_cascade, the workspace of the prefix chunks' partial states, the params structs of
// cascade_attention.cuh's kernels, the launches (cascade_prefix_chunks when there is a prefix, then
// cascade_suffix_merge; merge_states).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <cstdint>

#include "hosts.h"

namespace bridge_ops::host {
namespace {

namespace kn = bridge_ops::kernels;

constexpr int64_t kIntMax = 2147483647;

kn::KeysArg keys(const at::Tensor& t) { return {t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

void check_head_dim(int64_t head_dim) {
  BRIDGE_CHECK(head_dim <= kn::kWarpSize * kn::kCascadeMaxTd,
               "the CUDA cascade kernels take head_dim <= ", kn::kWarpSize * kn::kCascadeMaxTd, ", got ", head_dim);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cascade_attention(Launcher& launcher, const at::Tensor& q_in,
                                                     const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
                                                     const at::Tensor& prefix_lens, const at::Tensor& suffix_k_in,
                                                     const at::Tensor& suffix_v_in, const at::Tensor& cu_group_lens,
                                                     const std::optional<at::Tensor>& suffix_lens,
                                                     std::optional<double> scale) {
  const CascadeAttentionDims d = check_cascade_attention_args(q_in, prefix_k_in, prefix_v_in, prefix_lens, suffix_k_in,
                                                              suffix_v_in, suffix_lens, cu_group_lens);
  check_launcher_device(launcher, q_in, "q");
  check_head_dim(d.head_dim);
  BRIDGE_CHECK(d.batch * d.q_heads <= kIntMax && d.prefix_len <= kIntMax && d.suffix_len <= kIntMax,
               "the CUDA cascade kernels take B * Hq, P and T below 2^31");
  const c10::DeviceGuard guard(q_in.device());
  validated_max_group(launcher, cu_group_lens, d.batch);
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
  BRIDGE_CHECK(plan.prefix_blocks <= kIntMax,
               "too many (chunk, group, head) tasks for one launch: ", plan.prefix_blocks);
  at::Tensor ws_o = at::empty({plan.workspace_chunks, d.batch, d.q_heads, d.head_dim}, q.options().dtype(stat));
  at::Tensor ws_lse = at::empty({plan.workspace_chunks, d.batch, d.q_heads}, q.options().dtype(stat));
  const kn::CascadeParams params{plan.shape,
                                 q.const_data_ptr(),
                                 q.stride(0),
                                 q.stride(1),
                                 keys(prefix_k),
                                 keys(prefix_v),
                                 keys(suffix_k),
                                 keys(suffix_v),
                                 plens.const_data_ptr<int32_t>(),
                                 slens.has_value() ? slens->const_data_ptr<int32_t>() : nullptr,
                                 cu.const_data_ptr<int32_t>(),
                                 ws_o.mutable_data_ptr(),
                                 ws_lse.mutable_data_ptr(),
                                 out.mutable_data_ptr(),
                                 lse.mutable_data_ptr(),
                                 resolve_scale(scale, d.head_dim)};
  const kn::Dtype dtype = kernel_dtype(q.scalar_type());
  if (plan.prefix_blocks > 0) {
    launcher.launch(kn::kernel_name(kn::Kernel::kCascadePrefix, dtype, 0), kn::prefix_grid_of(plan), params);
  }
  launcher.launch(kn::kernel_name(kn::Kernel::kCascadeMerge, dtype, 0), kn::merge_grid_of(plan), params);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> merge_attention_states(Launcher& launcher, const at::Tensor& o_a,
                                                          const at::Tensor& lse_a, const at::Tensor& o_b,
                                                          const at::Tensor& lse_b) {
  check_merge_args(o_a, lse_a, o_b, lse_b);
  check_launcher_device(launcher, o_a, "o_a");
  check_head_dim(o_a.size(-1));
  const int64_t rows = lse_a.numel();  // head dim 0 too: every row still gets its merged lse
  BRIDGE_CHECK(rows <= kIntMax, "merge_attention_states on CUDA takes fewer than 2^31 rows, got ", rows);
  const c10::DeviceGuard guard(o_a.device());
  const at::Tensor a = o_a.contiguous(), b = o_b.contiguous(), la = lse_a.contiguous(), lb = lse_b.contiguous();
  at::Tensor out = at::empty(o_a.sizes(), o_a.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty(lse_a.sizes(), lse_a.options().memory_format(at::MemoryFormat::Contiguous));
  if (rows == 0) return {out, lse};
  const kn::MergeParams params{a.const_data_ptr(),
                               la.const_data_ptr(),
                               b.const_data_ptr(),
                               lb.const_data_ptr(),
                               out.mutable_data_ptr(),
                               lse.mutable_data_ptr(),
                               static_cast<int>(o_a.size(-1))};
  launcher.launch(kn::kernel_name(kn::Kernel::kMergeStates, kernel_dtype(a.scalar_type()), 0),
                  kn::Grid{rows, kn::kCascadeThreads, 0}, params);
  return {out, lse};
}

}  // namespace bridge_ops::host
