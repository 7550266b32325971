// Vectorised row primitives shared by the fused CPU kernels.
// All arithmetic is float32; inputs and outputs may be float, BFloat16 or Half.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cmath>
#include <limits>

#if defined(__GNUC__)
// The row loops pass lambdas to accurate_sum; unless everything is inlined, the
// lambdas' captures are reloaded from memory on every vector (aliasing stores).
#define DPS_INLINE inline __attribute__((always_inline))
#else
#define DPS_INLINE inline
#endif

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
DPS_INLINE Vec ldf(const float* p, int64_t cnt) {
  return cnt == kW ? Vec::loadu(p) : Vec(_mm256_maskload_ps(p, tail_mask(cnt)));
}
// A tail goes out in 4-, 2- and 1-float pieces: AMD's masked store (vmaskmovps) is microcoded,
// and at C = 10 the small-C step's masked stores took ~15% of its time (perf, 2026-11-30).
DPS_INLINE void stf(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kW) return v.store(p);
  __m128 part = _mm256_castps256_ps128(v);
  if (cnt & 4) {
    _mm_storeu_ps(p, part);
    part = _mm256_extractf128_ps(v, 1);
    p += 4;
  }
  if (cnt & 2) {
    _mm_storel_pi(reinterpret_cast<__m64*>(p), part);
    part = _mm_movehl_ps(part, part);
    p += 2;
  }
  if (cnt & 1) _mm_store_ss(p, part);
}
#else
inline Vec ldf(const float* p, int64_t cnt) { return cnt == kW ? Vec::loadu(p) : Vec::loadu(p, cnt); }
inline void stf(const Vec& v, float* p, int64_t cnt) {
  if (cnt == kW) v.store(p);
  else v.store(p, cnt);
}
#endif
// v with the lanes from cnt on set to 0, inlined (Vec::set is an out-of-line call with a switch)
DPS_INLINE Vec keep_lanes(const Vec& v, int64_t cnt) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_and_ps(v, _mm256_castsi256_ps(tail_mask(cnt))));
#else
  return Vec::set(Vec(0.f), v, cnt);
#endif
}
// Stores the cnt <= kW lanes of v as T at p, rounding to nearest even like
// Tensor.to. NT: a streaming (non-temporal) store for a full vector, which the
// caller guarantees to be aligned (32 bytes for float, 16 for 16-bit types).
template <bool NT, typename T>
DPS_INLINE void store_as(const Vec& v, T* p, int64_t cnt) {
  if constexpr (std::is_same_v<T, float>) {
#if defined(CPU_CAPABILITY_AVX2)
    if (NT && cnt == kW) {
      _mm256_stream_ps(p, v);
      return;
    }
#endif
    stf(v, p, cnt);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    if (cnt == kW) {
      const __m128i h = std::is_same_v<T, at::BFloat16> ? at::vec::cvtfp32_bf16(__m256(v))
                                                         : at::vec::cvtfp32_fp16(__m256(v));
      if (NT) _mm_stream_si128(reinterpret_cast<__m128i*>(p), h);
      else _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
      return;
    }
#endif
    float tmp[kW];
    v.store(tmp);
    for (int64_t i = 0; i < cnt; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}
// Streaming stores are weakly ordered: fence them before the thread's work is published.
inline void stream_fence() {
#if defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

template <typename T>
DPS_INLINE Vec ld(const T* p, int64_t cnt) {
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
DPS_INLINE float accurate_sum(int64_t n, const VF& vf) {
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
  if (j < n) rest = rest + keep_lanes(vf(j, n - j), n - j);
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

// Prefetches `lines` cache lines from p on into L2 (prefetcht1). An asm statement, not
// __builtin_prefetch: GCC 12 at -O3 dropped every loop of __builtin_prefetch calls over a
// variable number of lines, so _C.so held no prefetch instruction until 2026-11-30 (seen
// with objdump; with -fno-finite-loops the loops stayed, so that flag is the likely cause).
// tests/test_cpu_row_kernels.py checks the build holds them.
DPS_INLINE void prefetch_line(const char* p) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}
DPS_INLINE void prefetch_lines(const char* p, int64_t lines) {
  for (int64_t i = 0; i < lines; ++i) prefetch_line(p + 64 * i);
}

// Starts fetching [p, p + bytes) from DRAM. A short span is prefetched line by line;
// a longer one only by its first lines in each 4 KiB page: the L2 hardware streamer,
// which stops at page boundaries, then fetches the rest of the page by itself. Measured
// with the prefetches in the build (2026-11-30, benchmarks/kernel_probe.py --time, [4096,
// 1000], 100k-row bank, 2 threads, medians of 3 runs taken in turn): no prefetch 6.0 ms,
// every line 4 rows ahead 5.5 ms, this 5.1 ms. (An ~8% gain quoted here before was
// measured while GCC had deleted the prefetches: noise.)
DPS_INLINE void prefetch_span(const char* p, int64_t bytes) {
  constexpr int64_t kLines = 4, kPage = 4096;
  const int64_t lines = (reinterpret_cast<uintptr_t>(p) % 64 + bytes + 63) / 64;
  if (lines <= 2 * kLines) return prefetch_lines(p, lines);
  const char* end = p + bytes;
  for (const char* q = p; q < end;) {
    prefetch_lines(q, std::min<int64_t>(kLines, (end - q + 63) / 64));
    q += kPage - reinterpret_cast<uintptr_t>(q) % kPage;  // the next page
  }
}

// exp(x) for x <= 0 (and NaN): ATen's exp_u20 bit for bit where x <= 0, but it
// propagates NaN (exp_u20 clamps NaN to a finite value), and it drops what cannot
// change the result for x <= 0: the clamp at ln(FLT_MAX), and the mask that zeroes
// x < ln(FLT_MIN) (clamped to ln(FLT_MIN), such x get fx = -126 and so a zero
// scale factor already). 14 AVX2 operations instead of 19; tests/test_kernel_exp
// compares it with exp_u20 on every non-positive float.
DPS_INLINE Vec exp_nonpos(const Vec& x) {
#if defined(CPU_CAPABILITY_AVX2)
  const __m256 lo = _mm256_castsi256_ps(_mm256_set1_epi32(0xc2aeac50));  // ln(FLT_MIN)
  const __m256 src = _mm256_max_ps(lo, x);  // NaN x: returns x (the second operand)
  // fx = floor(x log2(e) + 1/2), r = x - fx ln(2), exp(r) by a degree-5 polynomial
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(
      src, _mm256_castsi256_ps(_mm256_set1_epi32(0x3fb8aa3b)), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fnmadd_ps(fx, _mm256_castsi256_ps(_mm256_set1_epi32(0x3f317218)), src);
  __m256 p = _mm256_fmadd_ps(r, _mm256_set1_ps(0.00828929059f), _mm256_set1_ps(0.0418978221f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.166676521f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.499991506f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(0.999999701f));
  p = _mm256_fmadd_ps(r, p, _mm256_set1_ps(1.f));
  // 2^(fx - 1) from the exponent bits: exp_u20 converts fx - 1 and adds 127; fx is
  // an integer in [-126, 0], so converting fx and adding 126 gives the same bits
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(126)), 23);
  return Vec(_mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_set1_ps(2.f)));
#else
  return x.exp_u20();
#endif
}

// out[j] = exp((x[j] - mx) * scale) with mx = max_j x[j] (every argument is <= 0) and
// scale > 0; returns sum_j out[j]. The same values as exp_row(x, out, n, mx, scale).
DPS_INLINE float exp_row_from_max(const float* x, float* out, int64_t n, float mx, float scale) {
  const Vec neg(-mx), vk(scale);  // x + (-mx) is x - mx, and takes x from memory directly
  if (scale == 1.0f) {
    return accurate_sum(n, [=](int64_t j, int64_t k) {
      const Vec e = exp_nonpos(ldf(x + j, k) + neg);
      stf(e, out + j, k);
      return e;
    });
  }
  return accurate_sum(n, [=](int64_t j, int64_t k) {
    const Vec e = exp_nonpos((ldf(x + j, k) + neg) * vk);
    stf(e, out + j, k);
    return e;
  });
}

// max(a, b), min(a, b) lane-wise; a NaN lane may or may not propagate (one operation
// each instead of at::vec::maximum's three).
DPS_INLINE Vec max_nonan(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_max_ps(a, b));
#else
  return at::vec::maximum(a, b);
#endif
}
DPS_INLINE Vec min_nonan(const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  return Vec(_mm256_min_ps(a, b));
#else
  return at::vec::minimum(a, b);
#endif
}

// mx = max_j x[j], mn = min_j x[j], exact for finite x. A NaN in x may or may not
// reach mx: callers detect NaNs through exp_row_from_max, which propagates them.
DPS_INLINE void row_max_min(const float* x, int64_t n, float& mx, float& mn) {
  const float inf = std::numeric_limits<float>::infinity();
  Vec m0(-inf), m1(-inf), m2(-inf), m3(-inf), n0(inf), n1(inf), n2(inf), n3(inf);
  int64_t j = 0;
  for (; j + 4 * kW <= n; j += 4 * kW) {
    const Vec a = Vec::loadu(x + j), b = Vec::loadu(x + j + kW);
    const Vec c = Vec::loadu(x + j + 2 * kW), d = Vec::loadu(x + j + 3 * kW);
    m0 = max_nonan(m0, a), m1 = max_nonan(m1, b), m2 = max_nonan(m2, c), m3 = max_nonan(m3, d);
    n0 = min_nonan(n0, a), n1 = min_nonan(n1, b), n2 = min_nonan(n2, c), n3 = min_nonan(n3, d);
  }
  for (; j + kW <= n; j += kW) {
    const Vec a = Vec::loadu(x + j);
    m0 = max_nonan(m0, a), n0 = min_nonan(n0, a);
  }
  // lambdas, not the functions themselves: an always-inline function passed by pointer cannot
  // be inlined at -O1 (the sanitizer build)
  const auto vmax = [](const Vec& a, const Vec& b) { return max_nonan(a, b); };
  const auto vmin = [](const Vec& a, const Vec& b) { return min_nonan(a, b); };
  mx = at::vec::vec_reduce_all<float>(vmax, vmax(vmax(m0, m1), vmax(m2, m3)));
  mn = at::vec::vec_reduce_all<float>(vmin, vmin(vmin(n0, n1), vmin(n2, n3)));
  for (; j < n; ++j) {
    mx = std::max(mx, x[j]);
    mn = std::min(mn, x[j]);
  }
}

// sum_j a[j] * b[j]
inline float row_dot(const float* a, const float* b, int64_t n) {
  return accurate_sum(n, [&](int64_t j, int64_t k) { return ldf(a + j, k) * ldf(b + j, k); });
}

#if defined(CPU_CAPABILITY_AVX2)
// Lane-per-row tiles (the small-C DPS step): up to 8 rows of up to 16 floats as one vector
// per column, lane i holding row i. A missing row (nullptr) reads as zeros and is not written.
// Tiles are arrays of plain __m256: an array of Vec would be zeroed by Vec's constructor
// (rep stos), which took ~40% of the step at C = 8 (perf, 2026-11-30).
constexpr int64_t kTileCols = 2 * kW;

// r[0..8) = the transpose of the 8 x 8 block r[0..8) (unpack, shuffle, swap 128-bit halves).
DPS_INLINE void transpose8x8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// cols[j] = lanes rows[i][j] for j < C <= kTileCols (zero lanes for missing rows).
DPS_INLINE void load_tile(const float* const rows[kW], int64_t C, __m256 cols[kTileCols]) {
  for (int64_t h = 0; h < C; h += kW) {
    const int64_t cnt = std::min<int64_t>(kW, C - h);
    __m256 r[kW];
    for (int64_t i = 0; i < kW; ++i) r[i] = rows[i] ? __m256(ldf(rows[i] + h, cnt)) : _mm256_setzero_ps();
    transpose8x8(r);
    for (int64_t k = 0; k < kW; ++k) cols[h + k] = r[k];  // a fixed count: no memcpy call
  }
}

// rows[i][j] = lane i of cols[j] for j < C, for the rows that are not nullptr.
DPS_INLINE void store_tile(const __m256 cols[kTileCols], int64_t C, float* const rows[kW]) {
  for (int64_t h = 0; h < C; h += kW) {
    const int64_t cnt = std::min<int64_t>(kW, C - h);
    __m256 r[kW];
    for (int64_t k = 0; k < kW; ++k) r[k] = k < cnt ? cols[h + k] : _mm256_setzero_ps();
    transpose8x8(r);
    for (int64_t i = 0; i < kW; ++i)
      if (rows[i]) stf(Vec(r[i]), rows[i] + h, cnt);
  }
}

// sum_j v[j] over n vectors, lane-wise, in four interleaved chains (one per j % 4).
DPS_INLINE Vec lane_sum(const __m256* v, int64_t n) {
  __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t j = 0; j < n; ++j) a[j % 4] = _mm256_add_ps(a[j % 4], v[j]);
  return Vec(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
}

// Lanes where x is finite, as a bit mask (bit i: lane i); NaN is not finite.
DPS_INLINE int finite_lanes(const Vec& x) {
  const __m256 abs = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
  return _mm256_movemask_ps(_mm256_cmp_ps(abs, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
}
#endif

// Rows per parallel task so that each task touches about 8k elements. Measured with 2
// threads on the 2-core VM (2026-11-30, DPS fwd+bwd, medians of 30 interleaved rounds): at
// [256, 100] two tasks take 164-179 us where one took 190-233 (with 32k elements per task);
// at [128, 10] (1,280 elements, one task either way) splitting into 3 tasks cost 109 -> 126 us.
inline int64_t grain_rows(int64_t elems_per_row) {
  return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, elems_per_row));
}

// Sum of a float32 buffer in double (for the mean/sum reductions).
inline double sum_double(const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

}  // namespace cpu
}  // namespace dps_fast
