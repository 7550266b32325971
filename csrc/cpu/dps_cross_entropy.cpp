// Fused CPU kernels: the DPS step (docs/method.md §2) and the soft-target cross-entropy (docs/method.md §3).
//
// One pass per sample row: the logits of all V views are read once into L1-sized
// scratch, the max / logsumexp / softmax are formed in float32, the bank row is
// gathered, discounted, given the evidence and stored back in the bank dtype, the
// target is formed, and the loss and the gradient (softmax - target, already scaled
// for the reduction) are written. Backward then only multiplies by grad_output.
// Non-finite logits and out-of-range ids: docs/method.md §9.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "row_kernels.h"

namespace dps_fast {
namespace cpu {
namespace {

constexpr int64_t kReductionNone = 0, kReductionMean = 1;

at::Tensor make_loss(const at::Tensor& logits, int64_t reduction) {
  auto opts = logits.options().dtype(at::kFloat);
  if (reduction == kReductionNone) {
    auto sizes = logits.sizes().vec();
    sizes.pop_back();
    return at::empty(sizes, opts);
  }
  return at::empty({}, opts);
}

void finish_loss(at::Tensor& loss, const std::vector<float>& rows, int64_t reduction) {
  if (reduction == kReductionNone) {
    std::memcpy(loss.data_ptr<float>(), rows.data(), rows.size() * sizeof(float));
    return;
  }
  double s = sum_double(rows.data(), static_cast<int64_t>(rows.size()));
  if (reduction == kReductionMean) s /= static_cast<double>(rows.size());
  // a double beyond the float range is inf in float32 (a plain cast would be undefined)
  const double fmax = std::numeric_limits<float>::max();
  *loss.mutable_data_ptr<float>() = s > fmax ? INFINITY : s < -fmax ? -INFINITY : static_cast<float>(s);
}

// A row's loss mass * lse - <t, z> (mass = sum_j t_j; 1 for the DPS step) from the half gap
// sum_j t_j (m/2 - z_j/2), with m the row max and s = sum_j exp(z_j - m): mass * log(s) + 2 * half_gap.
// Every term is >= 0 and m/2 - z_j/2 cannot overflow for finite z, so the loss overflows only where
// the exact loss does; lse - <t, z> as written gives inf - inf for rows near FLT_MAX (docs/method.md §9).
inline float half_gap_loss(float mass, float s, float half_gap) { return mass * std::log(s) + 2.0f * half_gap; }

void check_grad_buffer(const at::Tensor& grad, const at::Tensor& logits) {
  if (grad.numel() == 0) return;
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                        grad.is_contiguous(),
                    "dps_fast: grad buffer must be a contiguous tensor like the logits");
}

// Bytes one DPS step moves (the benchmarks' byte model): logits read and gradient
// written, bank rows read and written.
template <typename TZ, typename TA>
int64_t dps_step_bytes(int64_t V, int64_t B, int64_t C) {
  return V * B * C * 2 * static_cast<int64_t>(sizeof(TZ)) + B * C * 2 * static_cast<int64_t>(sizeof(TA));
}

// Streaming (non-temporal) stores for the gradient once the step moves more
// than kStreamMinBytes (a typical last-level cache: 32 MiB on the 2-core EPYC VM the
// benchmarks run on; sysconf's figure is unreliable in VMs). Then the early gradient
// rows are evicted before backward reads them anyway, and ordinary stores would first
// read every gradient line from DRAM (read for ownership): a quarter more traffic.
// Streaming needs aligned vectors: a 32-byte aligned buffer and C % 8 == 0.
// The values written are the same either way.
constexpr int64_t kStreamMinBytes = int64_t{32} << 20;

template <typename TZ>
bool stream_grad(const TZ* grad, int64_t C, int64_t step_bytes) {
#if defined(CPU_CAPABILITY_AVX2)
  return grad && reinterpret_cast<uintptr_t>(grad) % 32 == 0 && C % kW == 0 &&
         step_bytes > kStreamMinBytes;
#else
  return false;
#endif
}

// Bank rows are random: each thread starts fetching the row kPrefetchRows ahead of the
// one it works on, so that its DRAM latency overlaps the work on the rows in between.
// (The logits are read sequentially, which the hardware prefetchers cover.)
constexpr int64_t kPrefetchRows = 4;

// One DPS step over rows [b0, b1), one pass per sample row: the
// logits of all V views are read once into L1-sized scratch (sweeps A, B: max and
// softmax numerators), the bank row is gathered, discounted, given the evidence and
// stored back (sweep C, which also sums the target), then the loss and the gradient
// (softmax - target, already scaled for the reduction) are written (sweep D).
template <typename TZ, typename TA>
struct DpsStep {
  static constexpr bool z_f32 = std::is_same_v<TZ, float>, a_f32 = std::is_same_v<TA, float>;
  const TZ* z;
  const int64_t* idx;
  TA* alpha;
  TZ* grad;  // nullptr: no gradient wanted
  float* loss_rows;
  int64_t V, B, C, N, a_stride;
  float gamma, inv_tau_e, gscale;
  bool temper, posterior, update, stream;

  // Per-thread float32 rows: ex [V*C] softmax numerators | ext [V*C] tempered ones
  // (temper only) | zbuf [V*C] logits (reduced dtypes only) | tgt [C].
  struct Scratch {
    std::vector<float> buf, m, s, kv;
    std::vector<const float*> zrow;
    float *ex, *ext, *zbuf, *tgt;
    const float* tbase = nullptr;  // the target row before normalisation
    Scratch(int64_t V, int64_t C, bool temper)
        : buf(V * C * (1 + temper + !z_f32) + C), m(V), s(V), kv(V), zrow(V) {
      ex = buf.data();
      ext = temper ? ex + V * C : ex;
      zbuf = ex + V * C * (1 + temper);
      tgt = zbuf + (z_f32 ? 0 : V * C);
    }
  };

  // Sweeps A and B for every view; false if a logit is NaN or +-Inf.
  bool views(int64_t b, Scratch& w) const {
    for (int64_t v = 0; v < V; ++v) {
      const float* zf;
      if constexpr (z_f32) {
        zf = z + (v * B + b) * C;
      } else {
        load_row(z + (v * B + b) * C, w.zbuf + v * C, C);
        zf = w.zbuf + v * C;
      }
      w.zrow[v] = zf;
      float mn;
      row_max_min(zf, C, w.m[v], mn);
      // a NaN logit makes s NaN (exp_row_from_max propagates it), +Inf makes m +Inf
      w.s[v] = exp_row_from_max(zf, w.ex + v * C, C, w.m[v], 1.0f);
      if (!std::isfinite(w.m[v]) || !std::isfinite(w.s[v]) || mn == -std::numeric_limits<float>::infinity())
        return false;
      const float se = temper ? exp_row_from_max(zf, w.ext + v * C, C, w.m[v], inv_tau_e) : w.s[v];
      w.kv[v] = 1.0f / (se * static_cast<float>(V));
    }
    return true;
  }

  // Sweep C: evidence, discounted bank row, stored back when UPD; returns 1 / sum of
  // the target row (the new row when POST, else the old one) and points w.tbase at it.
  // A float32 bank takes the new row directly, and the target is read back from it.
  template <bool UPD, bool POST>
  float bank(TA* ar, Scratch& w) const {
    const float* ext = w.ext;
    const Vec k0(w.kv[0]);
    if (V == 1) return bank_sweep<UPD, POST>(ar, w, [=](int64_t j, int64_t k) { return ldf(ext + j, k) * k0; });
    const float* kv = w.kv.data();
    const int64_t V_ = V, C_ = C;
    return bank_sweep<UPD, POST>(ar, w, [=](int64_t j, int64_t k) {
      Vec e = ldf(ext + j, k) * k0;
      for (int64_t v = 1; v < V_; ++v) e = at::vec::fmadd(ldf(ext + v * C_ + j, k), Vec(kv[v]), e);
      return e;
    });
  }

  // evidence(j, cnt): the Vec of mean (tempered) softmax values [j, j + cnt).
  // The target row (float32) is kept in w.tgt, or read back from a float32 bank.
  template <bool UPD, bool POST, typename EF>
  DPS_INLINE float bank_sweep(TA* ar, Scratch& w, const EF& evidence) const {
    constexpr bool tgt_new = POST && !(UPD && a_f32), tgt_old = !POST && (UPD || !a_f32);
    float* tgt = w.tgt;
    w.tbase = tgt_new || tgt_old ? tgt : reinterpret_cast<const float*>(ar);
    const Vec g(gamma);
    const float S = accurate_sum(C, [=](int64_t j, int64_t k) {
      const Vec a_old = ld(ar + j, k);
      const Vec a_new = at::vec::fmadd(a_old, g, evidence(j, k));
      if constexpr (UPD) store_as<false>(a_new, ar + j, k);
      if constexpr (tgt_new) stf(a_new, tgt + j, k);
      if constexpr (tgt_old) stf(a_old, tgt + j, k);
      return POST ? a_new : a_old;
    });
    return 1.0f / S;
  }

  // Sweep D: loss and gradient of every view; NT: streaming stores of the gradient.
  template <bool NT>
  void outputs(int64_t b, float inv_t, const Scratch& w) const {
    for (int64_t v = 0; v < V; ++v) {
      const int64_t r = v * B + b;
      const float* zf = w.zrow[v];
      const float* exv = w.ex + v * C;
      const float* tb = w.tbase;
      TZ* gdst = grad ? grad + r * C : nullptr;
      const Vec vit(inv_t), vss(1.0f / w.s[v]), vg(gscale), vhm(0.5f * w.m[v]), vmh(-0.5f);
      // lse - <t, z> as log(s) + 2 sum_j t_j (m/2 - z_j/2) (see half_gap_loss)
      const float half_gap = accurate_sum(C, [=](int64_t j, int64_t k) {
        const Vec t = ldf(tb + j, k) * vit;
        const Vec zv = ldf(zf + j, k);
        if (gdst) store_as<NT>((ldf(exv + j, k) * vss - t) * vg, gdst + j, k);
        return t * at::vec::fmadd(zv, vmh, vhm);
      });
      loss_rows[r] = half_gap_loss(1.0f, w.s[v], half_gap);
    }
  }

  void bad_row(int64_t b) const {
    for (int64_t v = 0; v < V; ++v) {
      const int64_t r = v * B + b;
      loss_rows[r] = std::numeric_limits<float>::quiet_NaN();
      if (grad) std::fill(grad + r * C, grad + (r + 1) * C, static_cast<TZ>(NAN));
    }
  }

  // the bank row of sample b, if b < b1 and its id is in range; else nullptr
  TA* bank_row(int64_t b, int64_t b1) const {
    if (b >= b1 || idx[b] < 0 || idx[b] >= N) return nullptr;
    return alpha + idx[b] * a_stride;
  }

  void prefetch_bank_row(int64_t b, int64_t b1) const {
    if (const TA* ar = bank_row(b, b1))
      prefetch_span(reinterpret_cast<const char*>(ar), C * static_cast<int64_t>(sizeof(TA)));
  }

  void operator()(int64_t b0, int64_t b1) const {
    Scratch w(V, C, temper);
    for (int64_t b = b0; b < std::min(b1, b0 + kPrefetchRows); ++b) prefetch_bank_row(b, b1);
    for (int64_t b = b0; b < b1; ++b) {
      prefetch_bank_row(b + kPrefetchRows, b1);
      TA* ar = bank_row(b, b1);
      // out-of-range ids are only reachable with validate=False
      if (!ar || !views(b, w)) {
        bad_row(b);
        continue;
      }
      const float inv_t = update ? (posterior ? bank<true, true>(ar, w) : bank<true, false>(ar, w))
                                 : (posterior ? bank<false, true>(ar, w) : bank<false, false>(ar, w));
      if (stream) outputs<true>(b, inv_t, w);
      else outputs<false>(b, inv_t, w);
    }
    if (stream) stream_fence();
  }
};

#if defined(CPU_CAPABILITY_AVX2)
// The DPS step for C <= 16 classes (float32 logits and bank, one view), eight rows at a time,
// one row per lane: the rows' logits and bank rows are transposed into one Vec per class
// (row_kernels.h, load_tile), so every operation serves eight rows, and transposed back for
// the stores. The same formulas as DpsStep, element by element; only the order of the sums
// over the classes differs (four interleaved chains), and duplicated ids (an error unless
// validate=False) within a tile all read the old row, the last one's update winning, where
// DpsStep applies them in turn. No streaming stores (DpsStep's, for steps over 32 MiB): the
// values are the same. Why: DpsStep's cost per row is a chain of dependent reductions (max,
// sum of exp, bank sum, loss) that a short row cannot hide; here the eight rows of a tile
// run those chains side by side. Measured (benchmarks/kernel_probe.py --time --b 8192 --n 50000
// --threads 1, 2026-11-30, two runs): C = 16 here 59-60 ns per row, C = 17 on DpsStep 92-156.
constexpr int64_t kSmallC = kTileCols;
// Bank rows are prefetched this many tiles ahead. At [8192, 10] with fresh random ids
// (1 thread, 2026-11-30, medians of 25 interleaved rounds), 0 -> 1 -> 2 -> 4 tiles took
// 86 -> 65 -> 66 -> 67 ns per row with a 50k-row bank, 109 -> 84 -> 82 -> 82 with 1M rows.
constexpr int64_t kPrefetchTiles = 2;

struct SmallCStep {
  const float* z;
  const int64_t* idx;
  float* alpha;
  float* grad;  // nullptr: no gradient wanted
  float* loss_rows;
  int64_t B, C, N, a_stride;
  float gamma, inv_tau_e, gscale;
  bool temper, posterior, update;

  float* bank_row(int64_t b) const { return idx[b] >= 0 && idx[b] < N ? alpha + idx[b] * a_stride : nullptr; }

  void prefetch_bank_rows(int64_t b, int64_t b1) const {
    for (int64_t i = b; i < std::min(b + kW, b1); ++i)
      if (const float* row = bank_row(i)) prefetch_span(reinterpret_cast<const char*>(row), C * 4);
  }

  void operator()(int64_t b0, int64_t b1) const {
    for (int64_t t = 0; t < kPrefetchTiles; ++t) prefetch_bank_rows(b0 + t * kW, b1);
    for (int64_t b = b0; b < b1; b += kW) {
      prefetch_bank_rows(b + kPrefetchTiles * kW, b1);
      tile(b, std::min<int64_t>(kW, b1 - b));
    }
  }

  // Rows [b, b + n), n <= 8. One function of about 60 lines on purpose: its four sweeps share
  // the __m256 arrays zc / ex / et / a, kept in one scope so that the compiler may hold them in
  // registers from sweep to sweep (splitting it has not been measured).
  void tile(int64_t b, int64_t n) const {
    const float* zr[kW] = {};
    float* ar[kW] = {};
    float* gr[kW] = {};
    int present = 0;  // bit i: row b + i exists and has a bank row
    for (int64_t i = 0; i < n; ++i) {
      zr[i] = z + (b + i) * C;
      ar[i] = bank_row(b + i);
      gr[i] = grad ? grad + (b + i) * C : nullptr;
      if (ar[i]) present |= 1 << i;
    }
    __m256 zc[kSmallC], ex[kSmallC], et[kSmallC], a[kSmallC];
    load_tile(zr, C, zc);
    load_tile(ar, C, a);
    // sweeps A and B: max, min, softmax numerators (DpsStep::views)
    Vec m(zc[0]), mn(zc[0]);
    for (int64_t j = 1; j < C; ++j) m = max_nonan(m, Vec(zc[j])), mn = min_nonan(mn, Vec(zc[j]));
    const Vec neg = Vec(0.f) - m;
    for (int64_t j = 0; j < C; ++j) ex[j] = exp_nonpos(Vec(zc[j]) + neg);
    const Vec s = lane_sum(ex, C);
    Vec se = s;
    if (temper) {
      const Vec vk(inv_tau_e);
      for (int64_t j = 0; j < C; ++j) et[j] = exp_nonpos((Vec(zc[j]) + neg) * vk);
      se = lane_sum(et, C);
    }
    const __m256* evid = temper ? et : ex;
    const int no_neg_inf = _mm256_movemask_ps(_mm256_cmp_ps(mn, _mm256_set1_ps(-INFINITY), _CMP_NEQ_UQ));
    const int good = present & finite_lanes(m) & finite_lanes(s) & no_neg_inf;
    // sweep C: the bank rows (DpsStep::bank_sweep); t holds the target row before normalisation
    const Vec kv = Vec(1.f) / se, g(gamma);
    __m256* t = et;  // the tempered numerators are not needed past here
    for (int64_t j = 0; j < C; ++j) {
      const Vec a_new = at::vec::fmadd(Vec(a[j]), g, Vec(evid[j]) * kv);
      t[j] = posterior ? a_new : Vec(a[j]);
      a[j] = a_new;
    }
    if (update) {
      float* keep[kW] = {};
      for (int64_t i = 0; i < n; ++i) keep[i] = good >> i & 1 ? ar[i] : nullptr;
      store_tile(a, C, keep);
    }
    // sweep D: loss and gradient (DpsStep::outputs)
    const Vec inv_t = Vec(1.f) / lane_sum(t, C), vss = Vec(1.f) / s, vg(gscale);
    const Vec vhm = m * Vec(0.5f), vmh(-0.5f);
    const Vec bad = Vec(_mm256_castsi256_ps(_mm256_cmpeq_epi32(
        _mm256_and_si256(_mm256_set1_epi32(good), _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128)),
        _mm256_setzero_si256())));
    const Vec nan(std::numeric_limits<float>::quiet_NaN());
    for (int64_t j = 0; j < C; ++j) {
      const Vec tj = Vec(t[j]) * inv_t;
      ex[j] = Vec::blendv((Vec(ex[j]) * vss - tj) * vg, nan, bad);  // the gradient
      t[j] = tj * at::vec::fmadd(Vec(zc[j]), vmh, vhm);
    }
    if (grad) store_tile(ex, C, gr);
    float sv[kW], gap[kW];
    s.store(sv);
    lane_sum(t, C).store(gap);
    for (int64_t i = 0; i < n; ++i)
      loss_rows[b + i] = good >> i & 1 ? half_gap_loss(1.0f, sv[i], gap[i]) : std::numeric_limits<float>::quiet_NaN();
  }
};
#endif

// Runs the step with SmallCStep where it applies (AVX2, float32 logits and bank, one view,
// C <= 16); false where DpsStep runs it.
template <typename TZ, typename TA>
bool small_c_step(const at::Tensor& z, const at::Tensor& idx, at::Tensor& alpha, TZ* grad,
                  std::vector<float>& rows, int64_t V, int64_t C, double gamma, double tau_e, float gscale,
                  bool posterior, bool update) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<TZ, float> && std::is_same_v<TA, float>) {
    if (V != 1 || C < 1 || C > kSmallC) return false;
    const int64_t B = z.size(-2);
    SmallCStep step{z.data_ptr<float>(), idx.data_ptr<int64_t>(), alpha.data_ptr<float>(), grad, rows.data(),
                    B, C, alpha.size(0), alpha.stride(0), static_cast<float>(gamma),
                    1.0f / static_cast<float>(tau_e), gscale, static_cast<float>(tau_e) != 1.0f, posterior, update};
    // whole tiles per task (at::parallel_for splits a range into equal parts, not at grain multiples)
    const int64_t tiles = (B + kW - 1) / kW;
    at::parallel_for(0, tiles, std::max<int64_t>(1, grain_rows(C) / kW),
                     [&](int64_t t0, int64_t t1) { step(t0 * kW, std::min(B, t1 * kW)); });
    return true;
  }
#endif
  return false;
}

at::Tensor dps_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& index, at::Tensor& alpha,
                          at::Tensor& grad, double gamma, double tau_e, bool posterior, bool update,
                          int64_t reduction) {
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, "dps_fast: logits must be [B, C] or [V, B, C]");
  TORCH_CHECK_VALUE(alpha.dim() == 2 && alpha.size(1) == logits.size(-1) && (alpha.size(1) == 1 || alpha.stride(1) == 1),
                    "dps_fast: alpha must be [N, C] with unit class stride");
  check_grad_buffer(grad, logits);
  const int64_t C = logits.size(-1), B = logits.size(-2), V = logits.dim() == 3 ? logits.size(0) : 1;
  TORCH_CHECK_VALUE(index.dim() == 1 && index.size(0) == B, "dps_fast: index must be [B]");
  // The bank is written in place, behind autograd's back: bump its version as an in-place op
  // does, so that a backward needing the bank as it was refuses (the reference's index_put_).
  if (update && B > 0 && !alpha.is_inference()) alpha.unsafeGetTensorImpl()->bump_version();
  auto z = logits.contiguous();
  auto idx = index.to(at::kLong).contiguous();
  auto loss = make_loss(logits, reduction);
  std::vector<float> rows(V * B);
  const float gscale = reduction == kReductionMean ? 1.0f / static_cast<float>(V * B) : 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "dps_ce_z", [&] {
    using TZ = scalar_t;
    TZ* g = grad.numel() ? grad.data_ptr<TZ>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, alpha.scalar_type(), "dps_ce_a", [&] {
      if constexpr (std::is_same_v<TZ, double> || std::is_same_v<scalar_t, double>) {
        TORCH_CHECK_TYPE(false, "dps_fast: the fused CPU kernel takes float32/bfloat16/float16");
      } else {
        using TA = scalar_t;
        if (small_c_step<TZ, TA>(z, idx, alpha, g, rows, V, C, gamma, tau_e, gscale, posterior, update)) return;
        DpsStep<TZ, TA> step{z.data_ptr<TZ>(), idx.data_ptr<int64_t>(), alpha.data_ptr<TA>(), g, rows.data(),
                             V, B, C, alpha.size(0), alpha.stride(0), static_cast<float>(gamma),
                             1.0f / static_cast<float>(tau_e), gscale, static_cast<float>(tau_e) != 1.0f,
                             posterior, update, stream_grad(g, C, dps_step_bytes<TZ, TA>(V, B, C))};
        at::parallel_for(0, B, grain_rows(V * C), step);
      }
    });
  });
  finish_loss(loss, rows, reduction);
  return loss;
}

template <typename TZ, typename TT>
void soft_ce_kernel(const TZ* zp, const TT* tp, TZ* grad, float* loss_rows, int64_t B, int64_t C,
                    bool normalize, float gscale) {
  constexpr bool z_f32 = std::is_same_v<TZ, float>;
  // a float32 gradient of a large call goes out with streaming stores (see stream_grad)
  const bool stream = z_f32 && stream_grad(grad, C, B * C * static_cast<int64_t>(2 * sizeof(TZ) + sizeof(TT)));
  at::parallel_for(0, B, grain_rows(C), [&](int64_t b0, int64_t b1) {
    std::vector<float> buf((z_f32 ? 1 : 2) * C);
    float* ex = buf.data();
    float* zbuf = z_f32 ? nullptr : ex + C;
    for (int64_t b = b0; b < b1; ++b) {
      const float* zf;
      if constexpr (z_f32) {
        zf = zp + b * C;
      } else {
        load_row(zp + b * C, zbuf, C);
        zf = zbuf;
      }
      const TT* tr = tp + b * C;
      float m, mn;
      row_max_min(zf, C, m, mn);
      // a NaN logit makes s NaN (exp_row_from_max propagates it), +Inf makes m +Inf
      const float s = exp_row_from_max(zf, ex, C, m, 1.0f);
      if (!std::isfinite(m) || !std::isfinite(s) || mn == -std::numeric_limits<float>::infinity()) {
        loss_rows[b] = std::numeric_limits<float>::quiet_NaN();  // docs/method.md §9
        if (grad) std::fill(grad + b * C, grad + (b + 1) * C, static_cast<TZ>(NAN));
        continue;
      }
      // s_b = sum_j t_bj: the loss is s_b * lse - <t, z>, the gradient s_b * softmax - t
      // (PyTorch's cross-entropy for rows of any mass); normalize divides t by s_b first
      const float mass = accurate_sum(C, [&](int64_t j, int64_t k) { return ld(tr + j, k); });
      const float inv_t = normalize ? 1.0f / mass : 1.0f;
      const float row_mass = normalize ? 1.0f : mass;
      const float softmax_scale = row_mass / s;
      float* gdst = nullptr;
      if (grad) {
        if constexpr (z_f32) gdst = reinterpret_cast<float*>(grad) + b * C;
        else gdst = ex;
      }
      const Vec vit(inv_t), vss(softmax_scale), vg(gscale), vhm(0.5f * m), vmh(-0.5f);
      const auto gap_and_grad = [=](auto nt) {
        return accurate_sum(C, [=](int64_t j, int64_t k) {
          const Vec t = ld(tr + j, k) * vit;
          const Vec zv = ldf(zf + j, k);
          if (gdst) store_as<decltype(nt)::value>((ldf(ex + j, k) * vss - t) * vg, gdst + j, k);
          return t * at::vec::fmadd(zv, vmh, vhm);
        });
      };
      const float gap = stream ? gap_and_grad(std::true_type{}) : gap_and_grad(std::false_type{});
      loss_rows[b] = half_gap_loss(row_mass, s, gap);
      if constexpr (!z_f32) {
        if (grad) store_row(ex, grad + b * C, C);
      }
    }
    if (stream) stream_fence();
  });
}

at::Tensor soft_ce_fwd_cpu(const at::Tensor& logits, const at::Tensor& target, at::Tensor& grad,
                           bool normalize, int64_t reduction) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && target.sizes() == logits.sizes(),
                    "dps_fast: soft_cross_entropy needs logits and target of one shape [B, C]");
  check_grad_buffer(grad, logits);
  const int64_t B = logits.size(0), C = logits.size(1);
  auto z = logits.contiguous();
  auto t = target.contiguous();
  auto loss = make_loss(logits, reduction);
  std::vector<float> rows(B);
  const float gscale = reduction == kReductionMean ? 1.0f / static_cast<float>(B) : 1.0f;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "soft_ce_z", [&] {
    using TZ = scalar_t;
    TZ* g = grad.numel() ? grad.data_ptr<TZ>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "soft_ce_t", [&] {
      if constexpr (std::is_same_v<TZ, double> || std::is_same_v<scalar_t, double>) {
        TORCH_CHECK_TYPE(false, "dps_fast: the fused CPU kernel takes float32/bfloat16/float16");
      } else {
        soft_ce_kernel<TZ, scalar_t>(z.data_ptr<TZ>(), t.data_ptr<scalar_t>(), g, rows.data(), B, C,
                                     normalize, gscale);
      }
    });
  });
  finish_loss(loss, rows, reduction);
  return loss;
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY_FRAGMENT(dps_fast, m) {
  // One DPS step (docs/method.md §2): updates alpha[index] in place (when update), writes the
  // gradient of the loss (softmax - target, scaled for the reduction) into grad
  // (skipped when grad is empty; grad may be the logits' own storage), returns the loss.
  m.def(
      "dps_ce_fwd(Tensor logits, Tensor index, Tensor(a!) alpha, Tensor(b!) grad, float gamma, "
      "float tau_e, bool posterior, bool update, int reduction) -> Tensor");
  // Soft-target cross-entropy (docs/method.md §3), same conventions without the bank.
  m.def("soft_ce_fwd(Tensor logits, Tensor target, Tensor(a!) grad, bool normalize, int reduction) -> Tensor");
}

TORCH_LIBRARY_IMPL(dps_fast, CPU, m) {
  m.impl("dps_ce_fwd", &dps_fast::cpu::dps_ce_fwd_cpu);
  m.impl("soft_ce_fwd", &dps_fast::cpu::soft_ce_fwd_cpu);
}
