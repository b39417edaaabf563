// CUDA launchers of bridge_attention (forward and backward), registered as the ops' CUDA kernels.
//
// The kernels themselves are in kernels/bridge_attention.cuh (also compiled at run time by the cupy backend and
// emulated on the CPU by the tests); this file only checks arguments (csrc/checks.h, as every backend), validates
// cu_group_lens once per tensor (csrc/group_validation.h), picks the launch plan of the header (plan_launch) and
// launches on the current stream of the tensors' device. bridge_ops/cupy_backend.py is the Python twin of this
// file: keep the two in step.
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

#include <mutex>
#include <vector>

#include "../checks.h"
#include "../group_validation.h"
#include "kernels/bridge_attention.cuh"

namespace bridge_ops::cuda {
namespace {

namespace kn = bridge_ops::kernels;
using kn::i64;

template <typename S>
struct KernelType;
template <>
struct KernelType<float> {
  using type = float;
};
template <>
struct KernelType<double> {
  using type = double;
};
template <>
struct KernelType<c10::BFloat16> {
  using type = kn::bf16_t;
};
template <>
struct KernelType<c10::Half> {
  using type = kn::half_t;
};

template <typename T>
const T* in(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* out_ptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}
template <typename T>
const T* maybe(const std::optional<at::Tensor>& t) {
  return t.has_value() ? in<T>(*t) : nullptr;
}

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

// Every row of every tensor starts on a 4-element boundary, so the kernels may use 8/16-byte vector accesses.
bool rows_aligned(std::initializer_list<const at::Tensor*> tensors, int64_t dim) {
  if (dim % 4 != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (reinterpret_cast<uintptr_t>(t->const_data_ptr()) % (4 * t->element_size()) != 0) return false;
    for (int d = 0; d < 3; ++d) {
      if (t->stride(d) % 4 != 0) return false;
    }
  }
  return true;
}

// Common part of both ops: argument checks, device guard's device, offsets validation, dims as kernel ints.
struct Setup {
  AttentionDims d;
  int64_t max_group;
  int batch, seqlen, heads, dim, groups;
  long long tasks;
  int sms;
};

// Shape/dtype/device checks only (no device work): run before the device guard, so that a tensor on the wrong
// device is named in a ValueError rather than failing in the guard.
AttentionDims check_cuda_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu,
                              const std::optional<at::Tensor>& key_mask) {
  const AttentionDims d = check_attention_args(q, k, v, cu, key_mask);
  BRIDGE_CHECK(q.is_cuda(), "the CUDA kernel got q on ", q.device());
  return d;
}

// Under the device guard: offsets validation (once per cu_group_lens tensor), dims as kernel ints.
Setup setup(const AttentionDims& d, const at::Tensor& q, const at::Tensor& cu) {
  Setup s;
  s.d = d;
  constexpr int64_t kIntMax = 2147483647;
  BRIDGE_CHECK(s.d.batch <= kIntMax && s.d.seqlen <= kIntMax && s.d.heads <= kIntMax && s.d.head_dim <= kIntMax,
               "the CUDA kernels take B, S, H and Dh below 2^31, got shape ", q.sizes());
  const bool may_read = c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None;
  s.max_group = validated_max_group(cu, s.d.batch, may_read, [](const at::Tensor& t) { return t.cpu().contiguous(); });
  s.batch = static_cast<int>(s.d.batch);
  s.seqlen = static_cast<int>(s.d.seqlen);
  s.heads = static_cast<int>(s.d.heads);
  s.dim = static_cast<int>(s.d.head_dim);
  s.groups = static_cast<int>(s.d.groups);
  s.tasks = static_cast<long long>(s.d.seqlen) * s.d.groups * s.d.heads;
  s.sms = num_sms(q.get_device());
  return s;
}

void check_plan(const kn::LaunchPlan& plan) {
  BRIDGE_CHECK(plan.blocks <= 2147483647LL, "too many (position, group, head) tasks for one launch: ", plan.blocks,
               " blocks");
}

struct Mask {
  const unsigned char* ptr = nullptr;
  i64 sb = 0, ss = 0;
  explicit Mask(const std::optional<at::Tensor>& m) {
    if (m.has_value()) {
      ptr = reinterpret_cast<const unsigned char*>(m->const_data_ptr());
      sb = m->stride(0);
      ss = m->stride(1);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

struct ForwardCall {
  const at::Tensor &q, &k, &v, &cu;
  at::Tensor &out, &lse;
  Mask mask;
  const Setup& s;
  double scale;
  bool aligned;
  kn::LaunchPlan plan;
  cudaStream_t stream;
};

template <typename T, int TD>
void launch_forward_fast(const ForwardCall& c) {
  const at::Tensor &q = c.q, &k = c.k, &v = c.v;
  kn::bridge_attention_fwd<T, TD><<<static_cast<unsigned int>(c.plan.blocks), c.plan.threads, c.plan.smem_bytes,
                                    c.stream>>>(
      in<T>(q), q.stride(0), q.stride(1), q.stride(2), in<T>(k), k.stride(0), k.stride(1), k.stride(2), in<T>(v),
      v.stride(0), v.stride(1), v.stride(2), out_ptr<T>(c.out), c.out.stride(0), c.out.stride(1), c.out.stride(2),
      out_ptr<float>(c.lse), c.cu.const_data_ptr<int32_t>(), c.mask.ptr, c.mask.sb, c.mask.ss, c.s.batch, c.s.seqlen,
      c.s.heads, c.s.dim, c.s.groups, c.scale, c.aligned ? 1 : 0);
}

template <typename T>
void launch_forward(const ForwardCall& c) {
  switch (c.plan.td) {
    case 1: return launch_forward_fast<T, 1>(c);
    case 2: return launch_forward_fast<T, 2>(c);
    case 4: return launch_forward_fast<T, 4>(c);
    default: return launch_forward_fast<T, 8>(c);
  }
}

template <typename T, typename A>
void launch_forward_simple(const ForwardCall& c, at::Tensor& out_acc) {
  const at::Tensor &q = c.q, &k = c.k, &v = c.v;
  kn::bridge_attention_fwd_simple<T, A><<<static_cast<unsigned int>(c.plan.blocks), c.plan.threads, 0, c.stream>>>(
      in<T>(q), q.stride(0), q.stride(1), q.stride(2), in<T>(k), k.stride(0), k.stride(1), k.stride(2), in<T>(v),
      v.stride(0), v.stride(1), v.stride(2), out_ptr<A>(out_acc), out_ptr<A>(c.lse), c.cu.const_data_ptr<int32_t>(),
      c.mask.ptr, c.mask.sb, c.mask.ss, c.s.batch, c.s.seqlen, c.s.heads, c.s.dim, c.s.groups, c.scale);
}

std::tuple<at::Tensor, at::Tensor> bridge_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& cu_group_lens,
                                                         const std::optional<at::Tensor>& key_mask,
                                                         std::optional<double> scale) {
  const AttentionDims d = check_cuda_args(q_in, k_in, v_in, cu_group_lens, key_mask);
  c10::cuda::CUDAGuard guard(q_in.device());
  const Setup s = setup(d, q_in, cu_group_lens);
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor cu = cu_group_lens.contiguous();
  const at::ScalarType dtype = q.scalar_type();
  at::Tensor out = empty_rows(q, dtype);
  at::Tensor lse = at::empty({s.d.batch, s.d.seqlen, s.d.heads}, q.options().dtype(lse_dtype(dtype)));
  const kn::LaunchPlan plan = kn::plan_launch(dtype == at::kDouble, s.dim, s.tasks, s.sms, 0, s.max_group);
  check_plan(plan);
  if (plan.blocks == 0) return {out, lse};  // S = 0: nothing to compute (an empty grid is a launch error)
  ForwardCall c{q,     k,
                v,     cu,
                out,   lse,
                Mask(key_mask), s,
                resolve_scale(scale, s.d.head_dim), rows_aligned({&q, &k, &v, &out}, s.d.head_dim),
                plan,  c10::cuda::getCurrentCUDAStream().stream()};
  if (plan.fast) {
    switch (dtype) {
      case at::kFloat: launch_forward<float>(c); break;
      case at::kHalf: launch_forward<kn::half_t>(c); break;
      default: launch_forward<kn::bf16_t>(c); break;
    }
  } else if (dtype == at::kDouble) {
    launch_forward_simple<double, double>(c, out);
  } else {
    at::Tensor out_acc = empty_rows(q, at::kFloat);
    switch (dtype) {
      case at::kFloat: launch_forward_simple<float, float>(c, out_acc); break;
      case at::kHalf: launch_forward_simple<kn::half_t, float>(c, out_acc); break;
      default: launch_forward_simple<kn::bf16_t, float>(c, out_acc); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out.copy_(out_acc);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

struct BackwardCall {
  const at::Tensor &grad_out, &q, &k, &v, &lse, &cu;
  const std::optional<at::Tensor>& grad_lse;
  at::Tensor &dq, &dk, &dv;
  float* ws;
  Mask mask;
  const Setup& s;
  double scale;
  bool aligned;
  kn::LaunchPlan plan;
  cudaStream_t stream;
};

template <typename T, int TD>
void launch_backward_fast(const BackwardCall& c) {
  const at::Tensor &g = c.grad_out, &q = c.q, &k = c.k, &v = c.v;
  kn::bridge_attention_bwd<T, TD><<<static_cast<unsigned int>(c.plan.blocks), c.plan.threads, c.plan.smem_bytes,
                                    c.stream>>>(
      in<T>(g), g.stride(0), g.stride(1), g.stride(2), in<T>(q), q.stride(0), q.stride(1), q.stride(2), in<T>(k),
      k.stride(0), k.stride(1), k.stride(2), in<T>(v), v.stride(0), v.stride(1), v.stride(2), in<float>(c.lse),
      maybe<float>(c.grad_lse), out_ptr<T>(c.dq), c.dq.stride(0), c.dq.stride(1), c.dq.stride(2), out_ptr<T>(c.dk),
      c.dk.stride(0), c.dk.stride(1), c.dk.stride(2), out_ptr<T>(c.dv), c.dv.stride(0), c.dv.stride(1),
      c.dv.stride(2), c.ws, c.cu.const_data_ptr<int32_t>(), c.mask.ptr, c.mask.sb, c.mask.ss, c.s.batch, c.s.seqlen,
      c.s.heads, c.s.dim, c.s.groups, c.scale, c.aligned ? 1 : 0);
}

template <typename T>
void launch_backward(const BackwardCall& c) {
  switch (c.plan.td) {
    case 1: return launch_backward_fast<T, 1>(c);
    case 2: return launch_backward_fast<T, 2>(c);
    case 4: return launch_backward_fast<T, 4>(c);
    default: return launch_backward_fast<T, 8>(c);
  }
}

template <typename T, typename A>
void launch_backward_simple(const BackwardCall& c) {
  const at::Tensor &g = c.grad_out, &q = c.q, &k = c.k, &v = c.v;
  kn::bridge_attention_bwd_simple<T, A><<<static_cast<unsigned int>(c.plan.blocks), c.plan.threads, 0, c.stream>>>(
      in<T>(g), g.stride(0), g.stride(1), g.stride(2), in<T>(q), q.stride(0), q.stride(1), q.stride(2), in<T>(k),
      k.stride(0), k.stride(1), k.stride(2), in<T>(v), v.stride(0), v.stride(1), v.stride(2), in<A>(c.lse),
      maybe<A>(c.grad_lse), out_ptr<A>(c.dq), out_ptr<A>(c.dk), out_ptr<A>(c.dv), c.cu.const_data_ptr<int32_t>(),
      c.mask.ptr, c.mask.sb, c.mask.ss, c.s.batch, c.s.seqlen, c.s.heads, c.s.dim, c.s.groups, c.scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bridge_attention_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& lse_in, const at::Tensor& cu_group_lens,
    const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  const AttentionDims d = check_cuda_args(q_in, k_in, v_in, cu_group_lens, key_mask);
  check_attention_backward_args(grad_out_in, grad_lse_in, q_in, lse_in);
  c10::cuda::CUDAGuard guard(q_in.device());
  const Setup s = setup(d, q_in, cu_group_lens);
  const at::ScalarType dtype = q_in.scalar_type(), stat = lse_dtype(dtype);
  const at::Tensor q = with_unit_last_stride(q_in), k = with_unit_last_stride(k_in), v = with_unit_last_stride(v_in);
  const at::Tensor grad_out = with_unit_last_stride(grad_out_in);
  const at::Tensor lse = lse_in.to(stat).contiguous();
  std::optional<at::Tensor> grad_lse;
  if (grad_lse_in.has_value()) grad_lse = grad_lse_in->to(stat).contiguous();
  const at::Tensor cu = cu_group_lens.contiguous();
  const kn::LaunchPlan plan = kn::plan_launch(dtype == at::kDouble, s.dim, s.tasks, s.sms, 1, s.max_group);
  check_plan(plan);
  const at::ScalarType grad_dtype = plan.fast ? dtype : stat;  // the simple kernels write accumulation-type grads
  at::Tensor dq = empty_rows(q, grad_dtype), dk = empty_rows(q, grad_dtype), dv = empty_rows(q, grad_dtype);
  if (plan.blocks == 0) {  // S = 0
    return {empty_rows(q, dtype), empty_rows(q, dtype), empty_rows(q, dtype)};
  }
  at::Tensor ws;
  if (plan.workspace) ws = at::empty({s.d.batch * s.d.seqlen * s.d.heads * 2}, q.options().dtype(at::kFloat));
  BackwardCall c{grad_out,
                 q,
                 k,
                 v,
                 lse,
                 cu,
                 grad_lse,
                 dq,
                 dk,
                 dv,
                 ws.defined() ? ws.mutable_data_ptr<float>() : nullptr,
                 Mask(key_mask),
                 s,
                 resolve_scale(scale, s.d.head_dim),
                 rows_aligned({&grad_out, &q, &k, &v, &dq, &dk, &dv}, s.d.head_dim),
                 plan,
                 c10::cuda::getCurrentCUDAStream().stream()};
  if (plan.fast) {
    switch (dtype) {
      case at::kFloat: launch_backward<float>(c); break;
      case at::kHalf: launch_backward<kn::half_t>(c); break;
      default: launch_backward<kn::bf16_t>(c); break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {dq, dk, dv};
  }
  switch (dtype) {
    case at::kDouble: launch_backward_simple<double, double>(c); break;
    case at::kFloat: launch_backward_simple<float, float>(c); break;
    case at::kHalf: launch_backward_simple<kn::half_t, float>(c); break;
    default: launch_backward_simple<kn::bf16_t, float>(c); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (grad_dtype == dtype) return {dq, dk, dv};
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(bridge_ops, CUDA, m) {
  m.impl("bridge_attention", &bridge_attention_cuda);
  m.impl("bridge_attention_backward", &bridge_attention_backward_cuda);
}

}  // namespace bridge_ops::cuda
