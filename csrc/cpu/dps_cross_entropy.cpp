// Fused CPU kernels: the DPS step (docs/method.md §2) and the soft-target cross-entropy (docs/method.md §3).
//
// One pass per sample row: the logits of all V views are read once into L1-sized
// scratch, the max / logsumexp / softmax are formed in float32, the bank row is
// gathered, discounted, given the evidence and stored back in the bank dtype, the
// target is formed, and the loss and the gradient (softmax - target, already scaled
// for the reduction) are written. Backward then only multiplies by grad_output.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
  loss.fill_(s);
}

void check_grad_buffer(const at::Tensor& grad, const at::Tensor& logits) {
  if (grad.numel() == 0) return;
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes() && grad.scalar_type() == logits.scalar_type() &&
                        grad.is_contiguous(),
                    "dps_fast: grad buffer must be a contiguous tensor like the logits");
}

// Sweep A: max and plain sum (the sum only detects non-finite values).
inline void max_and_sum(const float* x, int64_t n, float& mx, float& sm) {
  Vec vm(-std::numeric_limits<float>::infinity()), vs(0.f);
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const Vec v = Vec::loadu(x + j);
    vm = at::vec::maximum(vm, v);
    vs = vs + v;
  }
  mx = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, vm);
  sm = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, vs);
  for (; j < n; ++j) {
    mx = std::max(mx, x[j]);
    sm += x[j];
  }
  if (std::isnan(sm)) mx = sm;
}

template <typename TZ, typename TA>
void dps_ce_kernel(const at::Tensor& z, const int64_t* idx, at::Tensor& alpha, TZ* grad,
                   float* loss_rows, int64_t V, int64_t B, int64_t C, float gamma, float tau_e,
                   bool posterior, bool update, float gscale) {
  const TZ* zp = z.data_ptr<TZ>();
  TA* ap = alpha.data_ptr<TA>();
  const int64_t N = alpha.size(0), a_stride = alpha.stride(0);
  const bool temper = tau_e != 1.0f;
  const float inv_tau = 1.0f / tau_e;
  constexpr bool z_f32 = std::is_same_v<TZ, float>;

  at::parallel_for(0, B, grain_rows(V * C), [&](int64_t b0, int64_t b1) {
    // scratch: ex [V*C] | ext [V*C] (tempered) | zf [V*C] (reduced logits) | tgt [C] | an [C]
    const int64_t nz = z_f32 ? 0 : V * C, nt = temper ? V * C : 0;
    std::vector<float> buf(V * C + nt + nz + 2 * C);
    float* ex = buf.data();
    float* ext = temper ? ex + V * C : ex;
    float* zbuf = z_f32 ? nullptr : ex + V * C + nt;
    float* tgt = ex + V * C + nt + nz;
    float* an = (update && !posterior) ? tgt + C : tgt;
    std::vector<float> m(V), s(V), kv(V);
    std::vector<const float*> zrow(V);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t id = idx[b];
      bool bad = id < 0 || id >= N;  // only reachable with validate=False
      if (!bad) {
        // bank rows are random: start fetching this one into L2 now, so the DRAM
        // latency overlaps the softmax sweeps below
        const char* ar0 = reinterpret_cast<const char*>(ap + id * a_stride);
        for (int64_t off = 0; off < C * static_cast<int64_t>(sizeof(TA)); off += 64) __builtin_prefetch(ar0 + off, 1, 2);
      }
      // A + B: per view max, softmax numerators and sums
      for (int64_t v = 0; v < V; ++v) {
        const TZ* zr = zp + (v * B + b) * C;
        if constexpr (z_f32) {
          zrow[v] = zr;
        } else {
          load_row(zr, zbuf + v * C, C);
          zrow[v] = zbuf + v * C;
        }
        float zs;
        max_and_sum(zrow[v], C, m[v], zs);
        s[v] = exp_row(zrow[v], ex + v * C, C, m[v], 1.0f);
        if (!std::isfinite(zs) || !std::isfinite(s[v]) || !std::isfinite(m[v])) bad = true;
        const float se = temper ? exp_row(zrow[v], ext + v * C, C, m[v], inv_tau) : s[v];
        kv[v] = 1.0f / (se * static_cast<float>(V));
      }
      float inv_t = 0.f;
      if (!bad) {
        // C: evidence, discounted bank row, target base and its sum
        TA* ar = ap + id * a_stride;
        const Vec g(gamma);
        const float S = accurate_sum(C, [&](int64_t j, int64_t k) {
          const Vec a_old = ld(ar + j, k);
          Vec e = ldf(ext + j, k) * Vec(kv[0]);
          for (int64_t v = 1; v < V; ++v) e = at::vec::fmadd(ldf(ext + v * C + j, k), Vec(kv[v]), e);
          const Vec a_new = at::vec::fmadd(a_old, g, e);
          if (update) stf(a_new, an + j, k);
          const Vec t = posterior ? a_new : a_old;
          stf(t, tgt + j, k);
          return t;
        });
        inv_t = 1.0f / S;
        if (update) store_row(an, ar, C);
      }
      // D: loss and gradient per view
      for (int64_t v = 0; v < V; ++v) {
        const int64_t r = v * B + b;
        if (bad) {
          loss_rows[r] = std::numeric_limits<float>::quiet_NaN();
          if (grad) std::fill(grad + r * C, grad + (r + 1) * C, static_cast<TZ>(NAN));
          continue;
        }
        const float* zf = zrow[v];
        float* exv = ex + v * C;
        const float inv_s = 1.0f / s[v];
        const Vec vit(inv_t), vis(inv_s), vg(gscale);
        // reduced dtypes: the gradient goes to the ex scratch, then is converted
        float* gdst = nullptr;
        if (grad) {
          if constexpr (z_f32) gdst = reinterpret_cast<float*>(grad) + r * C;
          else gdst = exv;
        }
        const float dot = accurate_sum(C, [&](int64_t j, int64_t k) {
          const Vec t = ldf(tgt + j, k) * vit;
          const Vec zv = ldf(zf + j, k);
          if (gdst) stf((ldf(exv + j, k) * vis - t) * vg, gdst + j, k);
          return t * zv;
        });
        loss_rows[r] = m[v] + std::log(s[v]) - dot;
        if constexpr (!z_f32) {
          if (grad) store_row(exv, grad + r * C, C);
        }
      }
    }
  });
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
        dps_ce_kernel<TZ, scalar_t>(z, idx.data_ptr<int64_t>(), alpha, g, rows.data(), V, B, C,
                                    static_cast<float>(gamma), static_cast<float>(tau_e), posterior,
                                    update, gscale);
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
      float m, zs;
      max_and_sum(zf, C, m, zs);
      const float s = exp_row(zf, ex, C, m, 1.0f);
      const float inv_t =
          normalize ? 1.0f / accurate_sum(C, [&](int64_t j, int64_t k) { return ld(tr + j, k); }) : 1.0f;
      const float inv_s = 1.0f / s;
      float* gdst = nullptr;
      if (grad) {
        if constexpr (z_f32) gdst = reinterpret_cast<float*>(grad) + b * C;
        else gdst = ex;
      }
      const Vec vit(inv_t), vis(inv_s), vg(gscale);
      const float dot = accurate_sum(C, [&](int64_t j, int64_t k) {
        const Vec t = ld(tr + j, k) * vit;
        const Vec zv = ldf(zf + j, k);
        if (gdst) stf((ldf(ex + j, k) * vis - t) * vg, gdst + j, k);
        return t * zv;
      });
      loss_rows[b] = m + std::log(s) - dot;
      if constexpr (!z_f32) {
        if (grad) store_row(ex, grad + b * C, C);
      }
    }
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
