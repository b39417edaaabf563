// Dense-vector micro-kernels of the CPU kernels, in two builds with one interface:
//
//   GenericOps<T>   portable loops the compiler vectorizes for whatever target the caller is compiled for
//                   (`omp simd` loops need -fopenmp or -fopenmp-simd);
//   Avx2Ops<T>      AVX2 + FMA intrinsics for float (4 independent accumulators per dot4, one hadd tree);
//                   other types use the portable loops, compiled for AVX2 + FMA by their caller.
//
// A kernel body is a template over `Ops`; BRIDGE_OPS_CPU_DISPATCH compiles it once per build and picks
// the build from CPUID at run time (cpu_features.h). Everything here ends up inlined into that body (the AVX2
// build is `flatten`ed, since GCC refuses to inline an AVX2 function into a generic-target inline helper).
#pragma once

#include <cmath>
#include <cstdint>
#include <utility>

#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BRIDGE_OPS_HAVE_AVX2_BUILD 1
#define BRIDGE_OPS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define BRIDGE_OPS_HAVE_AVX2_BUILD 0
#define BRIDGE_OPS_TARGET_AVX2
#endif

#define BRIDGE_OPS_INLINE inline __attribute__((always_inline))

namespace bridge_ops::cpu {

// Reductions keep kLanes partial sums in a fixed order (the compiler maps the lanes onto vector registers), so a
// result never depends on how the operands happen to be aligned, as an `omp simd` reduction's peeling would.
template <typename T>
struct GenericOps {
  static constexpr int64_t kLanes = 8;

  static BRIDGE_OPS_INLINE T sum_lanes(const T* lanes) {
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  }

  static BRIDGE_OPS_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
    T lanes[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[i + l] * b[i + l];
    }
    T acc = sum_lanes(lanes);
    for (; i < n; ++i) acc += a[i] * b[i];
    return acc;
  }

  // sums[r] = x[r * n : (r + 1) * n] . w for r < rows (rows <= 8): one weight row against a block of input rows
  static BRIDGE_OPS_INLINE void dot_rows(const T* __restrict w, const T* __restrict x, int64_t n, int64_t rows,
                                         T* sums) {
    for (int64_t r = 0; r < rows; ++r) sums[r] = dot(x + r * n, w, n);
  }

  // out[j] = a . b[j] for j < 4
  static BRIDGE_OPS_INLINE void dot4(const T* __restrict a, const T* const* b, int64_t n, T* out) {
    for (int64_t j = 0; j < 4; ++j) out[j] = dot(a, b[j], n);
  }

  // y += alpha * x
  static BRIDGE_OPS_INLINE void axpy(T* __restrict y, T alpha, const T* __restrict x, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
  }

  // y += sum_j alpha[j] * x[j] for j < 4
  static BRIDGE_OPS_INLINE void axpy4(T* __restrict y, const T* alpha, const T* const* x, int64_t n) {
    const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    const T a0 = alpha[0], a1 = alpha[1], a2 = alpha[2], a3 = alpha[3];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += a0 * x0[i] + a1 * x1[i] + a2 * x2[i] + a3 * x3[i];
  }

  // x[i] = exp(x[i] - shift) for i < n (x[i] <= shift); returns the sum of the new x[i].
  static BRIDGE_OPS_INLINE T exp_sum(T* __restrict x, T shift, int64_t n) {
    T sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      x[i] = std::exp(x[i] - shift);
      sum += x[i];
    }
    return sum;
  }
};

template <typename T>
struct Avx2Ops : GenericOps<T> {};

#if BRIDGE_OPS_HAVE_AVX2_BUILD
template <>
struct Avx2Ops<float> {
#define BRIDGE_OPS_AVX2_INLINE inline __attribute__((target("avx2,fma")))
  // ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): the order of dot4's hadd tree and of GenericOps::sum_lanes.
  static BRIDGE_OPS_AVX2_INLINE float hsum(__m256 v) {
    __m256 h = _mm256_hadd_ps(v, v);
    h = _mm256_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
  }

  // Same lane order as dot4, so a score does not depend on whether it was computed in a block of four.
  static BRIDGE_OPS_AVX2_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
  }

  // Software prefetches of the weight stream (a prefetch never faults): into L1 4 KiB ahead and into L2 32 KiB ahead.
  static constexpr int64_t kPrefetchFloats = 1024;
  static constexpr int64_t kL2PrefetchFloats = 8192;

  // dot(x[r], w) for R rows in one sweep of w (R accumulators; each sum in dot's lane order).
  template <int R>
  static BRIDGE_OPS_AVX2_INLINE void dot_rows_of(const float* __restrict w, const float* __restrict x, int64_t n,
                                                 float* sums) {
    __m256 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      // Two prefetches per 64-byte line: the hardware prefetcher alone keeps too few lines of the weight stream in
      // flight while this loop computes (8 rows: the compute and the memory time added up, no overlap). Measured on
      // all of SmolLM2's linear layers at 8 rows, 2 threads (AMD EPYC Zen 4): none 12.3 GB/s, L1 only 18.9 GB/s,
      // L1 + L2 27.5 GB/s (a plain sum reads at 33 GB/s).
      if (i % 16 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(w + i + kPrefetchFloats), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + i + kL2PrefetchFloats), _MM_HINT_T1);
      }
      const __m256 wv = _mm256_loadu_ps(w + i);
      for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * n + i), wv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float s = hsum(acc[r]);
      for (int64_t t = i; t < n; ++t) s += x[r * n + t] * w[t];
      sums[r] = s;
    }
  }

  static BRIDGE_OPS_AVX2_INLINE void dot_rows(const float* __restrict w, const float* __restrict x, int64_t n,
                                              int64_t rows, float* sums) {
    switch (rows) {
      case 8: return dot_rows_of<8>(w, x, n, sums);
      case 7: return dot_rows_of<7>(w, x, n, sums);
      case 6: return dot_rows_of<6>(w, x, n, sums);
      case 5: return dot_rows_of<5>(w, x, n, sums);
      case 4: return dot_rows_of<4>(w, x, n, sums);
      case 3: return dot_rows_of<3>(w, x, n, sums);
      case 2: return dot_rows_of<2>(w, x, n, sums);
      default: return dot_rows_of<1>(w, x, n, sums);
    }
  }

  static BRIDGE_OPS_AVX2_INLINE void dot4(const float* __restrict a, const float* const* b, int64_t n, float* out) {
    const float *b0 = b[0], *b1 = b[1], *b2 = b[2], *b3 = b[3];
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 av = _mm256_loadu_ps(a + i);
      s0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b0 + i), s0);
      s1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b1 + i), s1);
      s2 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b2 + i), s2);
      s3 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b3 + i), s3);
    }
    // One hadd tree reduces the four accumulators at once: lane j of the result is sum(s_j).
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(s0, s1), _mm256_hadd_ps(s2, s3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
    for (; i < n; ++i) {
      out[0] += a[i] * b0[i];
      out[1] += a[i] * b1[i];
      out[2] += a[i] * b2[i];
      out[3] += a[i] * b3[i];
    }
  }

  static BRIDGE_OPS_AVX2_INLINE void axpy(float* __restrict y, float alpha, const float* __restrict x, int64_t n) {
    const __m256 av = _mm256_set1_ps(alpha);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; ++i) y[i] += alpha * x[i];
  }

  static BRIDGE_OPS_AVX2_INLINE void axpy4(float* __restrict y, const float* alpha, const float* const* x, int64_t n) {
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    const __m256 a0 = _mm256_set1_ps(alpha[0]), a1 = _mm256_set1_ps(alpha[1]), a2 = _mm256_set1_ps(alpha[2]),
                 a3 = _mm256_set1_ps(alpha[3]);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      __m256 acc = _mm256_loadu_ps(y + i);
      acc = _mm256_fmadd_ps(a0, _mm256_loadu_ps(x0 + i), acc);
      acc = _mm256_fmadd_ps(a1, _mm256_loadu_ps(x1 + i), acc);
      acc = _mm256_fmadd_ps(a2, _mm256_loadu_ps(x2 + i), acc);
      acc = _mm256_fmadd_ps(a3, _mm256_loadu_ps(x3 + i), acc);
      _mm256_storeu_ps(y + i, acc);
    }
    for (; i < n; ++i) y[i] += alpha[0] * x0[i] + alpha[1] * x1[i] + alpha[2] * x2[i] + alpha[3] * x3[i];
  }

  // exp(x) for x <= 0, 8 lanes: x = k ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact k ln2), exp(r) by a
  // degree-6 polynomial (the Taylor coefficients, minimax-adjusted), times 2^k through the exponent bits. Relative
  // error about 2 ulp; arguments below -87 (exp < 2^-126) give 0, NaN gives NaN (as std::exp).
  static BRIDGE_OPS_AVX2_INLINE __m256 exp_nonpositive(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // maxps returns its second operand when one is NaN: keeps a NaN
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
  }

  static BRIDGE_OPS_AVX2_INLINE float exp_sum(float* __restrict x, float shift, int64_t n) {
    const __m256 s = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
      _mm256_storeu_ps(x + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; i < n; ++i) {
      x[i] = std::exp(x[i] - shift);
      sum += x[i];
    }
    return sum;
  }
#undef BRIDGE_OPS_AVX2_INLINE
};
#endif

// Element-wise helpers; plain loops that vectorize under either build.
template <typename Dst, typename Src>
BRIDGE_OPS_INLINE void convert(Dst* __restrict dst, const Src* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(src[i]);
}

// dst = alpha * src, converted to the destination type.
template <typename Dst, typename Src>
BRIDGE_OPS_INLINE void scale_to(Dst* __restrict dst, Src alpha, const Src* __restrict src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Dst>(alpha * src[i]);
}

template <typename T>
BRIDGE_OPS_INLINE void fill_zero(T* __restrict y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = T(0);
}

}  // namespace bridge_ops::cpu

// Defines `name<scalar_t>(args...)`, which runs `body<scalar_t, Ops>(args...)` with Ops = Avx2Ops compiled for
// AVX2 + FMA when this CPU has both, and with Ops = GenericOps compiled for the baseline target otherwise.
#define BRIDGE_OPS_CPU_DISPATCH(name, body)                                                                  \
  template <typename scalar_t, typename... Args>                                                             \
  BRIDGE_OPS_TARGET_AVX2 __attribute__((flatten)) void name##_avx2(Args&&... args) {                         \
    body<scalar_t, ::bridge_ops::cpu::Avx2Ops>(std::forward<Args>(args)...);                                 \
  }                                                                                                          \
  template <typename scalar_t, typename... Args>                                                             \
  void name##_generic(Args&&... args) {                                                                      \
    body<scalar_t, ::bridge_ops::cpu::GenericOps>(std::forward<Args>(args)...);                              \
  }                                                                                                          \
  template <typename scalar_t, typename... Args>                                                             \
  void name(Args&&... args) {                                                                                \
    if (BRIDGE_OPS_HAVE_AVX2_BUILD && ::bridge_ops::cpu::active_isa() == ::bridge_ops::cpu::Isa::kAvx2Fma) { \
      name##_avx2<scalar_t>(std::forward<Args>(args)...);                                                    \
    } else {                                                                                                 \
      name##_generic<scalar_t>(std::forward<Args>(args)...);                                                 \
    }                                                                                                        \
  }
