// Fused CPU kernels: supervised contrastive / NT-Xent loss (docs/method.md §4), as two ops
// over float32 rows f [M, d] (normalised by the caller): supcon_stats, the per-row statistics,
// and supcon_grad, the gradient from them. The host glue around them (normalisation, the mean
// over anchors, the per-row coefficients) is written once, in dps_fast/ops/supcon.py.
//
// The M x M similarity matrix is never held: rows are processed in strips of R rows
// (R * M floats, about 8 MB), each strip formed by one GEMM, reduced on the fly to the
// per-row logsumexp and positive sums, and dropped. The gradient op recomputes the
// strips and needs only per-row statistics (logsumexp, the coefficients).
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

// The inputs of one call: float32 rows f [M, D] (contiguous, normalised if asked, by the
// caller) and the positive weights' source, hard labels (lp) or soft targets (w_src).
struct SupconInputs {
  at::Tensor f, ft, lab, w_src, wt;
  const int64_t* lp = nullptr;
  int64_t M = 0, D = 0;
  float inv_tau = 1.f;
};

SupconInputs supcon_inputs(const at::Tensor& f, const std::optional<at::Tensor>& labels,
                           const std::optional<at::Tensor>& soft, double inv_tau) {
  TORCH_CHECK_VALUE(f.dim() == 2 && f.scalar_type() == at::kFloat && f.is_contiguous(),
                    "dps_fast: the SupCon ops take contiguous float32 rows [M, d]");
  TORCH_CHECK_VALUE(labels.has_value() != soft.has_value(), "dps_fast: the SupCon ops need exactly one of labels and soft");
  SupconInputs in;
  in.M = f.size(0);
  in.D = f.size(1);
  in.inv_tau = static_cast<float>(inv_tau);
  in.f = f;
  if (labels.has_value()) {
    in.lab = labels->to(at::kLong).contiguous();
    TORCH_CHECK_VALUE(in.lab.numel() == in.M, "dps_fast: labels must be [M]");
    in.lp = in.lab.data_ptr<int64_t>();
  } else {
    in.w_src = soft->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(in.w_src.dim() == 2 && in.w_src.size(0) == in.M, "dps_fast: soft must be [M, K]");
    in.wt = in.w_src.t();
  }
  in.ft = in.f.t();
  return in;
}

// The strip buffers, reused by both passes: similarities s [R, M] and, for soft targets,
// weights w [R, M]. `strip` forms rows i0 .. i0 + r1 of both by one GEMM each.
struct Strips {
  int64_t R;
  at::Tensor s, w;
  Strips(const SupconInputs& in) : R(strip_rows(in.M)) {
    s = at::empty({R, in.M}, in.f.options());
    if (!in.lp) w = at::empty({R, in.M}, in.f.options());
  }
  at::Tensor strip(const SupconInputs& in, int64_t i0, int64_t r1) {
    auto sn = s.narrow(0, 0, r1);
    at::mm_out(sn, in.f.narrow(0, i0, r1), in.ft);
    if (!in.lp) {
      auto wn = w.narrow(0, 0, r1);
      at::mm_out(wn, in.w_src.narrow(0, i0, r1), in.wt);
    }
    return sn;
  }
  float* weights_of(const SupconInputs& in) { return in.lp ? nullptr : w.data_ptr<float>(); }
};

// Weight row of sample i: hard labels 0/1 (into wrow), soft targets as the strip holds them;
// the diagonal is zero either way.
void fill_weights(const SupconInputs& in, int64_t i, float* wrow) {
  if (in.lp) {
    const int64_t li = in.lp[i];
    for (int64_t j = 0; j < in.M; ++j) wrow[j] = in.lp[j] == li ? 1.f : 0.f;
  }
  wrow[i] = 0.f;
}

// Per-row statistics: logsumexp over j != i, the positive weight sum and the weighted
// similarity ([M] float32 each).
struct RowStats {
  float *lse, *wsum, *wdot;
};

// The statistics of one strip's rows [a, b).
void stats_rows(const SupconInputs& in, const RowStats& st, int64_t i0, float* sp, float* wp, int64_t a,
                int64_t b) {
  const int64_t M = in.M;
  std::vector<float> tmp(M), wl(in.lp ? M : 0);
  for (int64_t r = a; r < b; ++r) {
    const int64_t i = i0 + r;
    float* srow = sp + r * M;
    float* wrow = in.lp ? wl.data() : wp + r * M;
    fill_weights(in, i, wrow);
    for (int64_t j = 0; j < M; ++j) srow[j] *= in.inv_tau;  // logits s / tau
    const float sii = srow[i];
    srow[i] = -std::numeric_limits<float>::infinity();
    const float mx = row_max(srow, M);
    const float z = exp_row(srow, tmp.data(), M, mx, 1.0f);
    srow[i] = 0.f;
    st.lse[i] = mx + std::log(z);
    st.wsum[i] = row_sum(wrow, M);
    st.wdot[i] = row_dot(wrow, srow, M);
    srow[i] = sii;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_stats_cpu(const at::Tensor& f,
                                                                const std::optional<at::Tensor>& labels,
                                                                const std::optional<at::Tensor>& soft,
                                                                double inv_tau) {
  const SupconInputs in = supcon_inputs(f, labels, soft, inv_tau);
  at::Tensor lse = at::empty({in.M}, f.options()), wsum = at::empty_like(lse), wdot = at::empty_like(lse);
  const RowStats st{lse.data_ptr<float>(), wsum.data_ptr<float>(), wdot.data_ptr<float>()};
  Strips strips(in);
  for (int64_t i0 = 0; i0 < in.M; i0 += strips.R) {
    const int64_t r1 = std::min(strips.R, in.M - i0);
    float* sp = strips.strip(in, i0, r1).data_ptr<float>();
    float* wp = strips.weights_of(in);
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) { stats_rows(in, st, i0, sp, wp, a, b); });
  }
  return {lse, wsum, wdot};
}

// The gradient's per-row inputs: logsumexp, c_i = valid_i / n_valid and invw_i = valid_i / wsum_i.
struct GradRows {
  const float *lse, *coef, *inv_ws;
};

// One strip's rows [a, b): the strip row becomes (G_i. + G_.i) / tau, with
// G_ij = c_i (p_ij - w_ij * invw_i), p_ij = exp(s_ij - lse_i).
// s_ij = s_ji and w_ij = w_ji: both G_ij and G_ji come from this strip row.
void grad_rows(const SupconInputs& in, const GradRows& g, int64_t i0, float* sp, float* wp, int64_t a, int64_t b) {
  const int64_t M = in.M;
  const float inv_tau = in.inv_tau;
  std::vector<float> wl(in.lp ? M : 0);
  for (int64_t r = a; r < b; ++r) {
    const int64_t i = i0 + r;
    float* srow = sp + r * M;
    float* wrow = in.lp ? wl.data() : wp + r * M;
    fill_weights(in, i, wrow);
    const float ci = g.coef[i], lsei = g.lse[i], wi = g.inv_ws[i];
    const Vec vt(inv_tau), vci(ci), vl(lsei), vwi(wi);
    int64_t j = 0;
    for (; j + kW <= M; j += kW) {
      const Vec sj = Vec::loadu(srow + j) * vt;
      const Vec w = Vec::loadu(wrow + j);
      const Vec gij = vci * ((sj - vl).exp() - w * vwi);
      const Vec gji = Vec::loadu(g.coef + j) * ((sj - Vec::loadu(g.lse + j)).exp() - w * Vec::loadu(g.inv_ws + j));
      ((gij + gji) * vt).store(srow + j);
    }
    for (; j < M; ++j) {
      const float sj = srow[j] * inv_tau;
      const float gij = ci * (std::exp(sj - lsei) - wrow[j] * wi);
      const float gji = g.coef[j] * (std::exp(sj - g.lse[j]) - wrow[j] * g.inv_ws[j]);
      srow[j] = (gij + gji) * inv_tau;
    }
    srow[i] = 0.f;
  }
}

// dL/df_i = sum_j (G_ij + G_ji) f_j / tau, strip by strip (the strips recomputed).
at::Tensor supcon_grad_cpu(const at::Tensor& f, const std::optional<at::Tensor>& labels,
                           const std::optional<at::Tensor>& soft, const at::Tensor& lse, const at::Tensor& coef,
                           const at::Tensor& invw, double inv_tau) {
  const SupconInputs in = supcon_inputs(f, labels, soft, inv_tau);
  for (const at::Tensor* t : {&lse, &coef, &invw}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == in.M && t->scalar_type() == at::kFloat && t->is_contiguous(),
                      "dps_fast: supcon_grad's row statistics must be contiguous float32 [M]");
  }
  const GradRows g{lse.data_ptr<float>(), coef.data_ptr<float>(), invw.data_ptr<float>()};
  at::Tensor df = at::empty({in.M, in.D}, f.options());
  Strips strips(in);
  for (int64_t i0 = 0; i0 < in.M; i0 += strips.R) {
    const int64_t r1 = std::min(strips.R, in.M - i0);
    at::Tensor s = strips.strip(in, i0, r1);
    float* sp = s.data_ptr<float>();
    float* wp = strips.weights_of(in);
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) { grad_rows(in, g, i0, sp, wp, a, b); });
    auto dfn = df.narrow(0, i0, r1);
    at::mm_out(dfn, s, in.f);
  }
  return df;
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY_FRAGMENT(dps_fast, m) {
  // SupCon / NT-Xent over float32 rows f [M, d] (docs/method.md §4); positives from labels [M]
  // or soft weights <soft_i, soft_j>. supcon_stats: per-row (logsumexp over j != i, positive
  // weight sum, weighted similarity); supcon_grad: d loss / d f from the logsumexp and the
  // per-row coefficients c_i = valid_i / n_valid, invw_i = valid_i / wsum_i.
  m.def("supcon_stats(Tensor f, Tensor? labels, Tensor? soft, float inv_tau) -> (Tensor, Tensor, Tensor)");
  m.def("supcon_grad(Tensor f, Tensor? labels, Tensor? soft, Tensor lse, Tensor coef, Tensor invw, "
        "float inv_tau) -> Tensor");
}

TORCH_LIBRARY_IMPL(dps_fast, CPU, m) {
  m.impl("supcon_stats", &dps_fast::cpu::supcon_stats_cpu);
  m.impl("supcon_grad", &dps_fast::cpu::supcon_grad_cpu);
}
