// Run-time values to compile-time template arguments for the CUDA launchers (flash-attention's static_switch.h):
//
//   BRIDGE_TD_SWITCH(plan.td, TD, [&] { launch(kn::bridge_attention_fwd<T, TD>, ...); });
//   BRIDGE_DTYPE_SWITCH(q.scalar_type(), T, A, [&] { launch(kn::bridge_attention_fwd_simple<T, A>, ...); });
//
// T is the kernels' storage type of a tensor dtype (kernels::bf16_t / half_t for the 16-bit types), A its
// accumulation type. BRIDGE_FAST_DTYPE_SWITCH covers the dtypes of the fast kernels only (no float64), so that
// nothing instantiates a fast kernel the launch plan never picks.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels/launch.h"

#define BRIDGE_TD_CASE(VALUE, TD, ...) \
  case VALUE: {                        \
    constexpr int TD = VALUE;          \
    return __VA_ARGS__();              \
  }

// One case per register layout of launch.h (kTdValues).
#define BRIDGE_TD_SWITCH(TD_VALUE, TD, ...)                                                     \
  [&] {                                                                                         \
    switch (TD_VALUE) {                                                                         \
      BRIDGE_TD_CASE(1, TD, __VA_ARGS__)                                                        \
      BRIDGE_TD_CASE(2, TD, __VA_ARGS__)                                                        \
      BRIDGE_TD_CASE(4, TD, __VA_ARGS__)                                                        \
      BRIDGE_TD_CASE(8, TD, __VA_ARGS__)                                                        \
      default: TORCH_CHECK(false, "bridge_ops: no fast kernel for register layout ", TD_VALUE); \
    }                                                                                           \
  }()

static_assert(::bridge_ops::kernels::kNumTd == 4 && ::bridge_ops::kernels::kTdValues[0] == 1 &&
                  ::bridge_ops::kernels::kTdValues[1] == 2 && ::bridge_ops::kernels::kTdValues[2] == 4 &&
                  ::bridge_ops::kernels::kTdValues[3] == 8,
              "BRIDGE_TD_SWITCH has one case per value of kernels::kTdValues");

#define BRIDGE_DTYPE_CASE(SCALAR, STORAGE, ACC, T, A, ...) \
  case SCALAR: {                                           \
    using T = STORAGE;                                     \
    using A [[maybe_unused]] = ACC;                        \
    return __VA_ARGS__();                                  \
  }

// float32, float16, bfloat16.
#define BRIDGE_FAST_DTYPE_SWITCH(DTYPE, T, A, ...)                                                \
  [&] {                                                                                           \
    switch (DTYPE) {                                                                              \
      BRIDGE_DTYPE_CASE(::at::kFloat, float, float, T, A, __VA_ARGS__)                            \
      BRIDGE_DTYPE_CASE(::at::kHalf, ::bridge_ops::kernels::half_t, float, T, A, __VA_ARGS__)     \
      BRIDGE_DTYPE_CASE(::at::kBFloat16, ::bridge_ops::kernels::bf16_t, float, T, A, __VA_ARGS__) \
      default: TORCH_CHECK(false, "bridge_ops: the CUDA kernels have no dtype ", DTYPE);          \
    }                                                                                             \
  }()

// float64 (accumulated in float64) and the dtypes of BRIDGE_FAST_DTYPE_SWITCH.
#define BRIDGE_DTYPE_SWITCH(DTYPE, T, A, ...)                             \
  [&] {                                                                   \
    switch (DTYPE) {                                                      \
      BRIDGE_DTYPE_CASE(::at::kDouble, double, double, T, A, __VA_ARGS__) \
      default: return BRIDGE_FAST_DTYPE_SWITCH(DTYPE, T, A, __VA_ARGS__); \
    }                                                                     \
  }()
