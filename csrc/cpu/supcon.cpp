// Fused CPU kernels: supervised contrastive / NT-Xent loss (docs/method.md §4), as two ops
// over float32 rows f [M, d] (normalised by the caller) and s_ij = <f_i, f_j> / tau:
// supcon_lse, each row's logsumexp over j != i, and supcon_grad, the softmax part of the
// gradient, sum_j (c_i p_ij + c_j p_ji) f_j / tau with p_ij = exp(s_ij - lse_i). These are
// the only O(M^2) parts of the loss: the positive term is linear in the features (per-class
// feature sums for hard labels, F^T T for soft ones), so dps_fast/ops/supcon.py computes it in
// closed form, in float64, once for every backend, with the rest of the host glue.
//
// The M x M similarity matrix is never held: rows are processed in strips of R rows
// (R * M floats, about 8 MB), each strip formed by one GEMM, reduced on the fly, and dropped.
// The gradient op recomputes the strips.
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

void check_rows(const at::Tensor& f) {
  TORCH_CHECK_VALUE(f.dim() == 2 && f.scalar_type() == at::kFloat && f.is_contiguous(),
                    "dps_fast: the SupCon ops take contiguous float32 rows [M, d]");
}

void check_row_stats(const at::Tensor& t, int64_t M) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == M && t.scalar_type() == at::kFloat && t.is_contiguous(),
                    "dps_fast: supcon_grad's row statistics must be contiguous float32 [M]");
}

// The similarity strips of rows [i0, i0 + r1): s = f_rows f^T, one GEMM into a reused buffer.
struct Strips {
  const at::Tensor& f;
  at::Tensor ft, s;
  int64_t M, R;
  explicit Strips(const at::Tensor& rows) : f(rows), ft(rows.t()), M(rows.size(0)), R(strip_rows(rows.size(0))) {
    s = at::empty({R, M}, rows.options());
  }
  float* strip(int64_t i0, int64_t r1) {
    auto sn = s.narrow(0, 0, r1);
    at::mm_out(sn, f.narrow(0, i0, r1), ft);
    return sn.data_ptr<float>();
  }
};

// Rows [a, b) of one strip: lse_i over j != i of s_ij / tau.
void lse_rows(float* sp, int64_t M, float inv_tau, int64_t i0, float* lse, int64_t a, int64_t b) {
  std::vector<float> tmp(M);
  for (int64_t r = a; r < b; ++r) {
    const int64_t i = i0 + r;
    float* srow = sp + r * M;
    for (int64_t j = 0; j < M; ++j) srow[j] *= inv_tau;
    srow[i] = -std::numeric_limits<float>::infinity();
    const float mx = row_max(srow, M);
    lse[i] = mx == -std::numeric_limits<float>::infinity() ? 0.f : mx + std::log(exp_row(srow, tmp.data(), M, mx, 1.0f));
  }
}

at::Tensor supcon_lse_cpu(const at::Tensor& f, double inv_tau) {
  check_rows(f);
  Strips strips(f);
  at::Tensor lse = at::empty({strips.M}, f.options());
  float* out = lse.data_ptr<float>();
  const float it = static_cast<float>(inv_tau);
  for (int64_t i0 = 0; i0 < strips.M; i0 += strips.R) {
    const int64_t r1 = std::min(strips.R, strips.M - i0);
    float* sp = strips.strip(i0, r1);
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) { lse_rows(sp, strips.M, it, i0, out, a, b); });
  }
  return lse;
}

// Rows [a, b) of one strip become (G_i. + G_.i) / tau with G_ij = c_i p_ij, p_ij = exp(s_ij -
// lse_i), j != i. s_ij = s_ji: both G_ij and G_ji come from this strip row.
void grad_rows(float* sp, int64_t M, float inv_tau, int64_t i0, const float* lse, const float* coef, int64_t a,
               int64_t b) {
  for (int64_t r = a; r < b; ++r) {
    const int64_t i = i0 + r;
    float* srow = sp + r * M;
    const Vec vt(inv_tau), vci(coef[i]), vl(lse[i]);
    int64_t j = 0;
    for (; j + kW <= M; j += kW) {
      const Vec sj = Vec::loadu(srow + j) * vt;
      const Vec g = vci * (sj - vl).exp() + Vec::loadu(coef + j) * (sj - Vec::loadu(lse + j)).exp();
      (g * vt).store(srow + j);
    }
    for (; j < M; ++j) {
      const float sj = srow[j] * inv_tau;
      srow[j] = (coef[i] * std::exp(sj - lse[i]) + coef[j] * std::exp(sj - lse[j])) * inv_tau;
    }
    srow[i] = 0.f;
  }
}

// The softmax part of d loss / d f_i = sum_j (G_ij + G_ji) f_j / tau, strip by strip.
at::Tensor supcon_grad_cpu(const at::Tensor& f, const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  check_rows(f);
  check_row_stats(lse, f.size(0));
  check_row_stats(coef, f.size(0));
  Strips strips(f);
  const float* l = lse.data_ptr<float>();
  const float* c = coef.data_ptr<float>();
  const float it = static_cast<float>(inv_tau);
  at::Tensor df = at::empty_like(f);
  for (int64_t i0 = 0; i0 < strips.M; i0 += strips.R) {
    const int64_t r1 = std::min(strips.R, strips.M - i0);
    float* sp = strips.strip(i0, r1);
    at::parallel_for(0, r1, 1, [&](int64_t a, int64_t b) { grad_rows(sp, strips.M, it, i0, l, c, a, b); });
    auto dfn = df.narrow(0, i0, r1);
    at::mm_out(dfn, strips.s.narrow(0, 0, r1), f);
  }
  return df;
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY_FRAGMENT(dps_fast, m) {
  // SupCon / NT-Xent over float32 rows f [M, d], s_ij = <f_i, f_j> * inv_tau (docs/method.md §4):
  // supcon_lse, each row's logsumexp over j != i; supcon_grad, the softmax part of d loss / d f
  // from the logsumexp and the per-row coefficients c_i = valid_i / n_valid. The positive term is
  // the host glue's (dps_fast/ops/supcon.py).
  m.def("supcon_lse(Tensor f, float inv_tau) -> Tensor");
  m.def("supcon_grad(Tensor f, Tensor lse, Tensor coef, float inv_tau) -> Tensor");
}

TORCH_LIBRARY_IMPL(dps_fast, CPU, m) {
  m.impl("supcon_lse", &dps_fast::cpu::supcon_lse_cpu);
  m.impl("supcon_grad", &dps_fast::cpu::supcon_grad_cpu);
}
