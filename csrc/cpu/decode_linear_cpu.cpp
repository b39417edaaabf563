// CPU kernel of decode_linear: y = x @ weight^T (+ bias) for the few rows of a decode step.
//
// A decode step at width N multiplies N rows (one new token each) by every weight matrix of the model: the work is
// reading the weights (538 MB per step for SmolLM2-135M in fp32), and each weight element is used N times. A BLAS
// sgemm tuned for large blocks reaches a fraction of the memory bandwidth at M = 8 (measured in bench/
// test_bench_real_model.py). Here every weight row is streamed from memory once and dotted, while it sits in L1,
// with the x rows in blocks of kRowBlock (one accumulator register per x row): the loop the memory bus limits.
// Parallel over output features (contiguous ranges of weight rows per thread).
//
// Float32 with rows <= kMaxRows only; any other case (dtypes, many rows, non-CPU) is at::linear, so the op is a
// drop-in for a linear layer. Sums run in 8 lanes over the input features then the GenericOps tree, the order of
// vector_ops.h, so a result does not depend on the row's position in the batch or on the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <torch/library.h>

#include <algorithm>

#include "../checks.h"
#include "vector_ops.h"

namespace bridge_ops::cpu {
namespace {

constexpr int64_t kMaxRows = 32;  // beyond this a blocked GEMM reuses each weight element enough: at::linear
constexpr int64_t kRowBlock = 8;  // x rows per pass over a weight row (8 accumulators)

struct DecodeLinearArgs {
  const float* x;       // [rows, in]
  const float* weight;  // [out, in]
  const float* bias;    // [out] or nullptr
  float* y;             // [rows, out]
  int64_t rows, in, out;
};

template <typename scalar_t, template <typename> class Ops>
void decode_linear_range(const DecodeLinearArgs& a, int64_t begin, int64_t end) {
  for (int64_t j = begin; j < end; ++j) {
    const float* w = a.weight + j * a.in;
    const float b = a.bias != nullptr ? a.bias[j] : 0.0f;
    for (int64_t r0 = 0; r0 < a.rows; r0 += kRowBlock) {
      const int64_t block = std::min(kRowBlock, a.rows - r0);
      float sums[kRowBlock];
      Ops<float>::dot_rows(w, a.x + r0 * a.in, a.in, block, sums);
      for (int64_t r = 0; r < block; ++r) a.y[(r0 + r) * a.out + j] = sums[r] + b;
    }
  }
}

BRIDGE_OPS_CPU_DISPATCH(decode_linear_for_cpu, decode_linear_range)

at::Tensor decode_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  BRIDGE_CHECK(weight.dim() == 2, "decode_linear: weight must be [out_features, in_features], got ", weight.sizes());
  BRIDGE_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1),
               "decode_linear: x must be [..., in_features = ", weight.size(1), "], got ", x.sizes());
  if (bias.has_value()) {
    BRIDGE_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0),
                 "decode_linear: bias must be [out_features = ", weight.size(0), "], got ", bias->sizes());
  }
  const int64_t in = weight.size(1), out = weight.size(0);
  const int64_t rows = in > 0 ? x.numel() / in : 0;
  const bool fp32 = x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat &&
                    (!bias.has_value() || bias->scalar_type() == at::kFloat);
  if (!fp32 || rows == 0 || rows > kMaxRows || in == 0 || !x.device().is_cpu() || !weight.device().is_cpu()) {
    return at::linear(x, weight, bias);
  }
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  const std::optional<at::Tensor> bc = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  const DecodeLinearArgs args{xc.const_data_ptr<float>(),
                              wc.const_data_ptr<float>(),
                              bc.has_value() ? bc->const_data_ptr<float>() : nullptr,
                              y.mutable_data_ptr<float>(),
                              rows,
                              in,
                              out};
  // Ranges of at least 16 weight rows, and about 64k multiply-adds each.
  const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, rows * in));
  at::parallel_for(0, out, grain, [&](int64_t begin, int64_t end) { decode_linear_for_cpu<float>(args, begin, end); });
  return y;
}

}  // namespace
}  // namespace bridge_ops::cpu

TORCH_LIBRARY_IMPL(bridge_ops, CPU, m) { m.impl("decode_linear", &bridge_ops::cpu::decode_linear_cpu); }
