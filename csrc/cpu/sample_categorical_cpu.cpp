// CPU kernel of sample_categorical: one token per row of a probability matrix, torch.multinomial(probs, 1)'s draw.
//
// torch.multinomial(probs, 1) on the CPU draws q ~ Exp(1) for every (row, token) with exponential_ (one uniform
// double from the generator per element, in memory order, then -log1p(-u)), divides probs / q in float and takes the
// argmax of each row. For a decode step's vocabulary (8 rows x 49,152 tokens) that is about 10 ms, serial: the
// logarithms run one at a time while the generator is held. Here the uniforms are drawn in the same order under the
// generator's lock (the generator ends in the same state), and the transformation, the division and the argmax run
// in parallel over rows, with the same functions (ATen's uniform_real_distribution and transformation::exponential,
// the same float division, argmax's rule: the first maximum, NaN above everything). So the tokens and the generator
// state equal torch.multinomial's bit for bit (python_tests/test_sample_categorical.py).
//
// Float32 [rows, vocab] contiguous CPU input with valid rows only; anything else (other dtypes, devices, layouts, or
// a row torch.multinomial would reject) goes to torch.multinomial itself, before any number is drawn.
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/multinomial.h>
#include <torch/library.h>

#include <cmath>
#include <mutex>
#include <optional>
#include <vector>

#include "../checks.h"

namespace bridge_ops::cpu {
namespace {

// What torch.multinomial accepts: every probability finite and >= 0, and each row's sum above 0.
bool valid_rows(const float* p, int64_t rows, int64_t vocab) {
  for (int64_t r = 0; r < rows; ++r) {
    double sum = 0;
    for (int64_t i = 0; i < vocab; ++i) {
      const float x = p[r * vocab + i];
      if (!(x >= 0.0f) || std::isinf(x)) return false;
      sum += x;
    }
    if (!(sum > 0)) return false;
  }
  return true;
}

at::Tensor sample_categorical_cpu(const at::Tensor& probs, std::optional<at::Generator> generator) {
  BRIDGE_CHECK(probs.dim() == 2, "sample_categorical: probs must be [rows, vocab], got ", probs.sizes());
  const int64_t rows = probs.size(0), vocab = probs.size(1);
  if (probs.scalar_type() != at::kFloat || !probs.is_contiguous() || rows == 0 || vocab == 0 ||
      !valid_rows(probs.const_data_ptr<float>(), rows, vocab)) {
    return at::multinomial(probs, 1, false, generator).squeeze(1);
  }
  const float* p = probs.const_data_ptr<float>();
  std::vector<double> uniform(static_cast<size_t>(rows * vocab));
  {
    auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    at::uniform_real_distribution<double> draw(0.0, 1.0);
    for (double& u : uniform) u = draw(gen);
  }
  at::Tensor tokens = at::empty({rows}, probs.options().dtype(at::kLong));
  int64_t* out = tokens.mutable_data_ptr<int64_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t best = 0;
      float best_value = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        const double u = uniform[static_cast<size_t>(r * vocab + i)];
        const float q = static_cast<float>(at::transformation::exponential<double>(u, 1.0));
        const float value = p[r * vocab + i] / q;
        if (i == 0 || (!std::isnan(best_value) && (std::isnan(value) || value > best_value))) {
          best = i;
          best_value = value;
        }
      }
      out[r] = best;
    }
  });
  return tokens;
}

}  // namespace
}  // namespace bridge_ops::cpu

TORCH_LIBRARY_IMPL(bridge_ops, CPU, m) { m.impl("sample_categorical", &bridge_ops::cpu::sample_categorical_cpu); }
