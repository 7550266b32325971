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

// The checked float32 inputs of one call: features (normalised if asked), and the positive
// weights' source, hard labels (lp) or soft targets (w_src).
struct SupconInputs {
  at::Tensor x, norm, f, ft, lab, w_src, wt;
  const int64_t* lp = nullptr;
  int64_t M = 0, D = 0;
  float inv_tau = 1.f;
};

SupconInputs supcon_inputs(const at::Tensor& features, const std::optional<at::Tensor>& labels,
                           const std::optional<at::Tensor>& soft, double tau, bool normalize) {
  TORCH_CHECK_VALUE(features.dim() == 2, "dps_fast: supcon_fwd takes features [M, d]");
  TORCH_CHECK_VALUE(labels.has_value() != soft.has_value(),
                    "dps_fast: supcon_fwd needs exactly one of labels and soft");
  TORCH_CHECK_TYPE(features.scalar_type() != at::kDouble,
                   "dps_fast: the fused CPU kernel takes float32/bfloat16/float16");
  SupconInputs in;
  in.M = features.size(0);
  in.D = features.size(1);
  in.inv_tau = static_cast<float>(1.0 / tau);
  in.x = features.to(at::kFloat).contiguous();
  in.f = in.x;
  if (normalize) {
    in.norm = in.x.norm(2, 1, true).clamp_min(1e-12);  // as F.normalize
    in.f = in.x / in.norm;
  }
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
    s = at::empty({R, in.M}, in.x.options());
    if (!in.lp) w = at::empty({R, in.M}, in.x.options());
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

// Per-row statistics of the forward pass: logsumexp over j != i, the positive weight sum and
// the weighted similarity.
struct RowStats {
  std::vector<float> lse, wsum, wdot;
  explicit RowStats(int64_t M) : lse(M), wsum(M), wdot(M) {}
};

// Pass 1 over one strip's rows [a, b).
void stats_rows(const SupconInputs& in, RowStats& st, int64_t i0, float* sp, float* wp, int64_t a, int64_t b) {
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

RowStats row_stats(const SupconInputs& in, Strips& strips) {
  RowStats st(in.M);
  for (int64_t i0 = 0; i0 < in.M; i0 += strips.R) {
    const int64_t r1 = std::min(strips.R, in.M - i0);
    float* sp = strips.strip(in, i0, r1).data_ptr<float>();
    float* wp = strips.weights_of(in);
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) { stats_rows(in, st, i0, sp, wp, a, b); });
  }
  return st;
}

// The mean over anchors with a positive of lse_i - wdot_i / wsum_i, and their count.
std::pair<double, int64_t> mean_loss(const RowStats& st) {
  double total = 0.0;
  int64_t n_valid = 0;
  for (size_t i = 0; i < st.lse.size(); ++i) {
    if (st.wsum[i] > 0.f) {
      total += static_cast<double>(st.lse[i]) - static_cast<double>(st.wdot[i]) / st.wsum[i];
      ++n_valid;
    }
  }
  return {n_valid ? total / static_cast<double>(n_valid) : 0.0, n_valid};
}

// Pass 2 over one strip's rows [a, b): the strip row becomes (G_i. + G_.i) / tau, with
// G_ij = c_i (p_ij - w_ij / wsum_i), c_i = valid_i / n_valid, p_ij = exp(s_ij - lse_i).
// s_ij = s_ji and w_ij = w_ji: both G_ij and G_ji come from this strip row.
void grad_rows(const SupconInputs& in, const RowStats& st, const std::vector<float>& coef,
               const std::vector<float>& inv_ws, int64_t i0, float* sp, float* wp, int64_t a, int64_t b) {
  const int64_t M = in.M;
  const float inv_tau = in.inv_tau;
  std::vector<float> wl(in.lp ? M : 0);
  for (int64_t r = a; r < b; ++r) {
    const int64_t i = i0 + r;
    float* srow = sp + r * M;
    float* wrow = in.lp ? wl.data() : wp + r * M;
    fill_weights(in, i, wrow);
    const float ci = coef[i], lsei = st.lse[i], wi = inv_ws[i];
    const Vec vt(inv_tau), vci(ci), vl(lsei), vwi(wi);
    int64_t j = 0;
    for (; j + kW <= M; j += kW) {
      const Vec sj = Vec::loadu(srow + j) * vt;
      const Vec w = Vec::loadu(wrow + j);
      const Vec gij = vci * ((sj - vl).exp() - w * vwi);
      const Vec gji = Vec::loadu(coef.data() + j) *
                      ((sj - Vec::loadu(st.lse.data() + j)).exp() - w * Vec::loadu(inv_ws.data() + j));
      ((gij + gji) * vt).store(srow + j);
    }
    for (; j < M; ++j) {
      const float sj = srow[j] * inv_tau;
      const float gij = ci * (std::exp(sj - lsei) - wrow[j] * wi);
      const float gji = coef[j] * (std::exp(sj - st.lse[j]) - wrow[j] * inv_ws[j]);
      srow[j] = (gij + gji) * inv_tau;
    }
    srow[i] = 0.f;
  }
}

// dL/df_i = sum_j (G_ij + G_ji) f_j / tau, strip by strip (the strips recomputed), then
// through the normalisation if any.
at::Tensor supcon_grad(const SupconInputs& in, const RowStats& st, int64_t n_valid, Strips& strips) {
  const float inv_nv = n_valid ? 1.0f / static_cast<float>(n_valid) : 0.f;
  std::vector<float> coef(in.M), inv_ws(in.M);
  for (int64_t i = 0; i < in.M; ++i) {
    const bool valid = st.wsum[i] > 0.f;
    coef[i] = valid ? inv_nv : 0.f;
    inv_ws[i] = valid ? 1.0f / st.wsum[i] : 0.f;
  }
  at::Tensor df = at::empty({in.M, in.D}, in.x.options());
  for (int64_t i0 = 0; i0 < in.M; i0 += strips.R) {
    const int64_t r1 = std::min(strips.R, in.M - i0);
    at::Tensor s = strips.strip(in, i0, r1);
    float* sp = s.data_ptr<float>();
    float* wp = strips.weights_of(in);
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) { grad_rows(in, st, coef, inv_ws, i0, sp, wp, a, b); });
    auto dfn = df.narrow(0, i0, r1);
    at::mm_out(dfn, s, in.f);
  }
  if (in.norm.defined()) {
    // f = x / |x|: dx = (df - f * <f, df>) / |x|
    df = (df - in.f * (in.f * df).sum(1, true)) / in.norm;
  }
  return df;
}

std::tuple<at::Tensor, at::Tensor> supcon_fwd_cpu(const at::Tensor& features,
                                                  const std::optional<at::Tensor>& labels,
                                                  const std::optional<at::Tensor>& soft, double tau,
                                                  bool normalize, bool need_grad) {
  const SupconInputs in = supcon_inputs(features, labels, soft, tau, normalize);
  Strips strips(in);
  const RowStats st = row_stats(in, strips);
  const auto [mean, n_valid] = mean_loss(st);
  at::Tensor loss = at::empty({}, in.x.options());
  loss.fill_(mean);
  if (!need_grad) return {loss, features.new_empty({0})};
  return {loss, supcon_grad(in, st, n_valid, strips).to(features.scalar_type())};
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
