// Vectorised row primitives shared by the fused CPU kernels.
// All arithmetic is float32; inputs and outputs may be float, BFloat16 or Half.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

namespace dps_fast {
namespace cpu {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();

// dst[0:n] = float(src[0:n])
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t j = 0;
    for (; j + kW <= n; j += kW) {
      Vec v;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        at::vec::load_fp32_from_bf16(src + j, v);
      } else {
        at::vec::load_fp32_from_fp16(src + j, v);
      }
      v.store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// dst[0:n] = T(src[0:n]) (round to nearest even, like Tensor.to)
template <typename T>
inline void store_row(const float* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    if (reinterpret_cast<const void*>(src) != reinterpret_cast<const void*>(dst))
      std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

inline float row_max(const float* x, int64_t n) {
  return at::vec::reduce_all<float>(
      [](Vec a, Vec b) { return at::vec::maximum(a, b); }, x, n);
}

// Loads / stores of cnt <= kW floats (cnt < kW only at a row's tail; missing lanes are 0).
#if defined(CPU_CAPABILITY_AVX2)
inline __m256i tail_mask(int64_t cnt) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(cnt)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Vec ldf(const float* p, int64_t cnt) {
  return cnt == kW ? Vec::loadu(p) : Vec(_mm256_maskload_ps(p, tail_mask(cnt)));
}
inline void stf(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kW) v.store(p);
  else _mm256_maskstore_ps(p, tail_mask(cnt), __m256(v));
}
#else
inline Vec ldf(const float* p, int64_t cnt) { return cnt == kW ? Vec::loadu(p) : Vec::loadu(p, cnt); }
inline void stf(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kW) v.store(p);
  else v.store(p, cnt);
}
#endif
template <typename T>
inline Vec ld(const T* p, int64_t cnt) {
  if constexpr (std::is_same_v<T, float>) {
    return ldf(p, cnt);
  } else {
    if (cnt == kW) {
      Vec v;
      if constexpr (std::is_same_v<T, at::BFloat16>) at::vec::load_fp32_from_bf16(p, v);
      else at::vec::load_fp32_from_fp16(p, v);
      return v;
    }
    float tmp[kW] = {0.f};
    for (int64_t i = 0; i < cnt; ++i) tmp[i] = static_cast<float>(p[i]);
    return Vec::loadu(tmp);
  }
}

// sum_j f(j), accurately: four vector accumulators inside chunks of 1024 elements,
// chunk sums added to a running vector, so no accumulation chain exceeds
// ~n/1024 + 32 terms (float32 sums over 32k classes stay within a few ulp).
// vf(j, cnt) returns the Vec of elements [j, j + cnt), cnt == kW except at the tail
// (lanes past cnt are ignored). Everything is vectorised, also for tiny n.
template <typename VF>
inline float accurate_sum(int64_t n, const VF& vf) {
  Vec total(0.f);
  int64_t j = 0;
  const int64_t nfull = n - n % (4 * kW);
  while (j < nfull) {
    const int64_t end = std::min<int64_t>(nfull, j + 1024);
    Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
    for (; j < end; j += 4 * kW) {
      a0 = a0 + vf(j, kW);
      a1 = a1 + vf(j + kW, kW);
      a2 = a2 + vf(j + 2 * kW, kW);
      a3 = a3 + vf(j + 3 * kW, kW);
    }
    total = total + ((a0 + a1) + (a2 + a3));
  }
  Vec rest(0.f);
  for (; j + kW <= n; j += kW) rest = rest + vf(j, kW);
  if (j < n) rest = rest + Vec::set(Vec(0.f), vf(j, n - j), n - j);
  return at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, total + rest);
}

inline float row_sum(const float* x, int64_t n) {
  return accurate_sum(n, [&](int64_t j, int64_t k) { return ldf(x + j, k); });
}

// out[j] = exp((x[j] - shift) * scale); returns sum_j out[j]. Uses ATen's exp_u20 (a
// polynomial exp with an error of a few ulp, the one PyTorch's own softmax kernels use);
// Sleef's 1-ulp exp costs as much as the whole rest of the DPS step.
inline float exp_row(const float* x, float* out, int64_t n, float shift, float scale) {
  const Vec vs(shift), vk(scale);
  return accurate_sum(n, [&](int64_t j, int64_t k) {
    const Vec e = ((ldf(x + j, k) - vs) * vk).exp_u20();
    stf(e, out + j, k);
    return e;
  });
}

// sum_j a[j] * b[j]
inline float row_dot(const float* a, const float* b, int64_t n) {
  return accurate_sum(n, [&](int64_t j, int64_t k) { return ldf(a + j, k) * ldf(b + j, k); });
}

// Rows per parallel task so that each task touches about 32k elements.
inline int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, elems_per_row));
}

// Sum of a float32 buffer in double (for the mean/sum reductions).
inline double sum_double(const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

}  // namespace cpu
}  // namespace dps_fast
