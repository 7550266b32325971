// Fused CPU kernel: supervised contrastive / NT-Xent loss (docs/method.md §4), forward and gradient.
//
// The M x M similarity matrix is never held: rows are processed in strips of R rows
// (R * M floats, about 8 MB), each strip formed by one GEMM, reduced on the fly to the
// per-row logsumexp and positive sums, and dropped. The gradient pass recomputes the
// strips and needs only per-row statistics of the forward pass (logsumexp, positive
// weight sums, validity).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "row_kernels.h"

namespace dps_fast {
namespace cpu {
namespace {

int64_t strip_rows(int64_t M) {
  const int64_t budget = int64_t(2) << 20;  // floats per strip (8 MB)
  return std::max<int64_t>(16, std::min<int64_t>(M, budget / std::max<int64_t>(M, 1)));
}

std::tuple<at::Tensor, at::Tensor> supcon_fwd_cpu(const at::Tensor& features,
                                                  const std::optional<at::Tensor>& labels,
                                                  const std::optional<at::Tensor>& soft, double tau,
                                                  bool normalize, bool need_grad) {
  TORCH_CHECK_VALUE(features.dim() == 2, "dps_fast: supcon_fwd takes features [M, d]");
  TORCH_CHECK_VALUE(labels.has_value() != soft.has_value(),
                    "dps_fast: supcon_fwd needs exactly one of labels and soft");
  TORCH_CHECK_TYPE(features.scalar_type() != at::kDouble,
                   "dps_fast: the fused CPU kernel takes float32/bfloat16/float16");
  const int64_t M = features.size(0), D = features.size(1);
  const float inv_tau = static_cast<float>(1.0 / tau);

  at::Tensor x = features.to(at::kFloat).contiguous();
  at::Tensor norm;
  at::Tensor f = x;
  if (normalize) {
    norm = x.norm(2, 1, true).clamp_min(1e-12);  // as F.normalize
    f = x / norm;
  }
  at::Tensor lab, w_src;
  if (labels.has_value()) {
    lab = labels->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(lab.numel() == M, "dps_fast: labels must be [M]");
  } else {
    w_src = soft->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(w_src.dim() == 2 && w_src.size(0) == M, "dps_fast: soft must be [M, K]");
  }
  const int64_t* lp = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;

  std::vector<float> lse(M), wsum(M), wdot(M);
  const int64_t R = strip_rows(M);
  at::Tensor s_strip = at::empty({R, M}, x.options());
  at::Tensor w_strip = lp ? at::Tensor() : at::empty({R, M}, x.options());
  const at::Tensor ft = f.t();
  const at::Tensor wt = lp ? at::Tensor() : w_src.t();

  // Fills w row r of the strip starting at i0 (hard labels: 0/1), diagonal zero.
  auto weights = [&](int64_t i0, int64_t r, float* wrow) {
    const int64_t i = i0 + r;
    if (lp) {
      const int64_t li = lp[i];
      for (int64_t j = 0; j < M; ++j) wrow[j] = lp[j] == li ? 1.f : 0.f;
    }
    wrow[i] = 0.f;
  };

  // Pass 1: per-row logsumexp over j != i, positive weight sum and weighted similarity.
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t r1 = std::min(R, M - i0);
    auto s = s_strip.narrow(0, 0, r1);
    at::mm_out(s, f.narrow(0, i0, r1), ft);
    if (!lp) {
      auto wn = w_strip.narrow(0, 0, r1);
      at::mm_out(wn, w_src.narrow(0, i0, r1), wt);
    }
    float* sp = s.data_ptr<float>();
    float* wp = lp ? nullptr : w_strip.data_ptr<float>();
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) {
      std::vector<float> tmp(M), wl(lp ? M : 0);
      for (int64_t r = a; r < b; ++r) {
        const int64_t i = i0 + r;
        float* srow = sp + r * M;
        float* wrow = lp ? wl.data() : wp + r * M;
        weights(i0, r, wrow);
        for (int64_t j = 0; j < M; ++j) srow[j] *= inv_tau;  // logits s / tau
        const float sii = srow[i];
        srow[i] = -std::numeric_limits<float>::infinity();
        const float mx = row_max(srow, M);
        const float z = exp_row(srow, tmp.data(), M, mx, 1.0f);
        srow[i] = 0.f;
        lse[i] = mx + std::log(z);
        wsum[i] = row_sum(wrow, M);
        wdot[i] = row_dot(wrow, srow, M);
        srow[i] = sii;
      }
    });
  }
  double total = 0.0;
  int64_t n_valid = 0;
  for (int64_t i = 0; i < M; ++i) {
    if (wsum[i] > 0.f) {
      total += static_cast<double>(lse[i]) - static_cast<double>(wdot[i]) / wsum[i];
      ++n_valid;
    }
  }
  at::Tensor loss = at::empty({}, x.options());
  loss.fill_(n_valid ? total / static_cast<double>(n_valid) : 0.0);
  if (!need_grad) return {loss, features.new_empty({0})};

  // Pass 2: dL/ds_ij = c_i (p_ij - w_ij / wsum_i) with c_i = valid_i / n_valid and
  // p_ij = exp(s_ij - lse_i); dL/df_i = (1/tau) sum_j (G_ij + G_ji) f_j.
  const float inv_nv = n_valid ? 1.0f / static_cast<float>(n_valid) : 0.f;
  std::vector<float> coef(M), inv_ws(M);
  for (int64_t i = 0; i < M; ++i) {
    const bool valid = wsum[i] > 0.f;
    coef[i] = valid ? inv_nv : 0.f;
    inv_ws[i] = valid ? 1.0f / wsum[i] : 0.f;
  }
  at::Tensor df = at::empty({M, D}, x.options());
  for (int64_t i0 = 0; i0 < M; i0 += R) {
    const int64_t r1 = std::min(R, M - i0);
    auto s = s_strip.narrow(0, 0, r1);
    at::mm_out(s, f.narrow(0, i0, r1), ft);
    if (!lp) {
      auto wn = w_strip.narrow(0, 0, r1);
      at::mm_out(wn, w_src.narrow(0, i0, r1), wt);
    }
    float* sp = s.data_ptr<float>();
    float* wp = lp ? nullptr : w_strip.data_ptr<float>();
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) {
      std::vector<float> wl(lp ? M : 0);
      for (int64_t r = a; r < b; ++r) {
        const int64_t i = i0 + r;
        float* srow = sp + r * M;
        float* wrow = lp ? wl.data() : wp + r * M;
        weights(i0, r, wrow);
        const float ci = coef[i], lsei = lse[i], wi = inv_ws[i];
        // s_ij = s_ji and w_ij = w_ji: both G_ij and G_ji come from this strip row
        const Vec vt(inv_tau), vci(ci), vl(lsei), vwi(wi);
        int64_t j = 0;
        for (; j + kW <= M; j += kW) {
          const Vec sj = Vec::loadu(srow + j) * vt;
          const Vec w = Vec::loadu(wrow + j);
          const Vec gij = vci * ((sj - vl).exp() - w * vwi);
          const Vec gji = Vec::loadu(coef.data() + j) *
                          ((sj - Vec::loadu(lse.data() + j)).exp() - w * Vec::loadu(inv_ws.data() + j));
          ((gij + gji) * vt).store(srow + j);
        }
        for (; j < M; ++j) {
          const float sj = srow[j] * inv_tau;
          const float gij = ci * (std::exp(sj - lsei) - wrow[j] * wi);
          const float gji = coef[j] * (std::exp(sj - lse[j]) - wrow[j] * inv_ws[j]);
          srow[j] = (gij + gji) * inv_tau;
        }
        srow[i] = 0.f;
      }
    });
    auto dfn = df.narrow(0, i0, r1);
    at::mm_out(dfn, s, f);
  }
  if (normalize) {
    // f = x / |x|: dx = (df - f * <f, df>) / |x|
    df = (df - f * (f * df).sum(1, true)) / norm;
  }
  return {loss, df.to(features.scalar_type())};
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY_FRAGMENT(dps_fast, m) {
  // SupCon / NT-Xent over rows [M, d] (docs/method.md §4): positives from labels [M] or soft
  // weights <soft_i, soft_j>; returns (mean loss, d loss / d features or empty).
  m.def(
      "supcon_fwd(Tensor features, Tensor? labels, Tensor? soft, float tau, bool normalize, "
      "bool need_grad) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dps_fast, CPU, m) { m.impl("supcon_fwd", &dps_fast::cpu::supcon_fwd_cpu); }
