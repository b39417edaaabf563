// CUDA launchers of the cascade decode ops (prefix_suffix_attention, merge_attention_states), registered as their CUDA
// kernels. The kernels are in kernels/prefix_attention.cuh (also run by the tests' warp emulator); this file checks
// arguments (csrc/checks.h, as every backend), validates cu_group_lens once per tensor (csrc/group_validation.h) and
// launches on the current stream. prefix_lens / suffix_lens are not read on the host: the kernels clamp them into
// [0, P] / [0, T] (the CPU kernel raises instead).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../checks.h"
#include "../group_validation.h"
#include "kernels/prefix_attention.cuh"

namespace bridge_ops::cuda {
namespace {

namespace kn = bridge_ops::kernels;

template <typename S>
struct KernelTypes;
template <>
struct KernelTypes<float> {
  using type = float;
  using acc = float;
};
template <>
struct KernelTypes<double> {
  using type = double;
  using acc = double;
};
template <>
struct KernelTypes<c10::BFloat16> {
  using type = kn::bf16_t;
  using acc = float;
};
template <>
struct KernelTypes<c10::Half> {
  using type = kn::half_t;
  using acc = float;
};

template <typename T>
kn::KeyView<T> key_view(const at::Tensor& t) {
  return {reinterpret_cast<const T*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

void check_head_dim(int64_t head_dim) {
  BRIDGE_CHECK(head_dim <= 32 * BRIDGE_CASCADE_MAX_TD, "the CUDA cascade kernels take head_dim <= ",
               32 * BRIDGE_CASCADE_MAX_TD, ", got ", head_dim);
}

template <typename scalar_t>
void launch_cascade(const at::Tensor& q, const at::Tensor& pk, const at::Tensor& pv, const at::Tensor& plens,
                    const at::Tensor& sk, const at::Tensor& sv, const std::optional<at::Tensor>& slens,
                    const at::Tensor& cu, at::Tensor& out, at::Tensor& lse, const kn::CascadeShape& shape,
                    double scale) {
  using T = typename KernelTypes<scalar_t>::type;
  using A = typename KernelTypes<scalar_t>::acc;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const T* qp = reinterpret_cast<const T*>(q.const_data_ptr());
  at::Tensor ws_o = at::empty({std::max(shape.chunks, 1), shape.batch, shape.q_heads, shape.dim},
                              q.options().dtype(lse.scalar_type()));
  at::Tensor ws_lse = at::empty({std::max(shape.chunks, 1), shape.batch, shape.q_heads}, lse.options());
  if (shape.chunks > 0) {
    const long long blocks = static_cast<long long>(shape.chunks) * shape.groups * shape.kv_heads;
    BRIDGE_CHECK(blocks <= 2147483647LL, "too many (chunk, group, head) tasks for one launch: ", blocks);
    const int smem = shape.chunk_len * (shape.dim + 1) * static_cast<int>(sizeof(A));
    kn::cascade_prefix_chunks<T, A><<<static_cast<unsigned int>(blocks), 32, smem, stream>>>(
        qp, q.stride(0), q.stride(1), key_view<T>(pk), key_view<T>(pv), plens.const_data_ptr<int32_t>(),
        cu.const_data_ptr<int32_t>(), ws_o.mutable_data_ptr<A>(), ws_lse.mutable_data_ptr<A>(), shape,
        static_cast<A>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  kn::cascade_suffix_merge<T, A><<<static_cast<unsigned int>(shape.batch * shape.q_heads), 32, 0, stream>>>(
      qp, q.stride(0), q.stride(1), key_view<T>(sk), key_view<T>(sv),
      slens.has_value() ? slens->const_data_ptr<int32_t>() : nullptr, plens.const_data_ptr<int32_t>(),
      cu.const_data_ptr<int32_t>(), ws_o.const_data_ptr<A>(), ws_lse.const_data_ptr<A>(),
      reinterpret_cast<T*>(out.mutable_data_ptr()), lse.mutable_data_ptr<A>(), shape, static_cast<A>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> prefix_suffix_attention_cuda(
    const at::Tensor& q_in, const at::Tensor& prefix_k_in, const at::Tensor& prefix_v_in,
    const at::Tensor& prefix_lens, const at::Tensor& suffix_k_in, const at::Tensor& suffix_v_in,
    const at::Tensor& cu_group_lens, const std::optional<at::Tensor>& suffix_lens, std::optional<double> scale) {
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
  const int chunk_len = kn::cascade_chunk_len(static_cast<int>(d.head_dim), stat == at::kDouble ? 8 : 4);
  const kn::CascadeShape shape{static_cast<int>(d.batch),
                               static_cast<int>(d.q_heads),
                               static_cast<int>(d.kv_heads),
                               static_cast<int>(d.head_dim),
                               static_cast<int>(d.groups),
                               static_cast<int>(d.prefix_len),
                               static_cast<int>(d.suffix_len),
                               static_cast<int>((d.prefix_len + chunk_len - 1) / chunk_len),
                               chunk_len};
  const double s = resolve_scale(scale, d.head_dim);
  const auto launch = [&](auto tag) {
    launch_cascade<decltype(tag)>(q, prefix_k, prefix_v, plens, suffix_k, suffix_v, slens, cu, out, lse, shape, s);
  };
  switch (q.scalar_type()) {
    case at::kFloat: launch(float{}); break;
    case at::kDouble: launch(double{}); break;
    case at::kHalf: launch(c10::Half{}); break;
    default: launch(c10::BFloat16{}); break;
  }
  return {out, lse};
}

template <typename scalar_t>
void launch_merge(const at::Tensor& a, const at::Tensor& la, const at::Tensor& b, const at::Tensor& lb,
                  at::Tensor& out, at::Tensor& lse, int64_t rows, int dim) {
  using T = typename KernelTypes<scalar_t>::type;
  using A = typename KernelTypes<scalar_t>::acc;
  kn::merge_states<T, A><<<static_cast<unsigned int>(rows), 32, 0, c10::cuda::getCurrentCUDAStream().stream()>>>(
      reinterpret_cast<const T*>(a.const_data_ptr()), la.const_data_ptr<A>(),
      reinterpret_cast<const T*>(b.const_data_ptr()), lb.const_data_ptr<A>(),
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
  const int64_t rows = dim == 0 ? 0 : o_a.numel() / dim;
  BRIDGE_CHECK(rows <= 2147483647LL, "merge_attention_states on CUDA takes fewer than 2^31 rows, got ", rows);
  if (rows == 0) return {out, lse};
  switch (a.scalar_type()) {
    case at::kFloat: launch_merge<float>(a, la, b, lb, out, lse, rows, dim); break;
    case at::kDouble: launch_merge<double>(a, la, b, lb, out, lse, rows, dim); break;
    case at::kHalf: launch_merge<c10::Half>(a, la, b, lb, out, lse, rows, dim); break;
    default: launch_merge<c10::BFloat16>(a, la, b, lb, out, lse, rows, dim); break;
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CUDA, m) {
  m.impl("prefix_suffix_attention", &prefix_suffix_attention_cuda);
  m.impl("merge_attention_states", &merge_attention_states_cuda);
}

}  // namespace bridge_ops::cuda
