// Torch glue for the CUDA SupCon kernels (supcon.cu): TORCH_LIBRARY_IMPL(dps_fast, CUDA).
// Built only when setup.py finds a CUDA torch and nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "supcon.h"

namespace dps_fast {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> supcon_fwd_cuda(const at::Tensor& features, const std::optional<at::Tensor>& labels,
                                                   const std::optional<at::Tensor>& soft, double tau, bool normalize,
                                                   bool need_grad) {
  TORCH_CHECK_VALUE(features.dim() == 2, "dps_fast: supcon_fwd takes features [M, d]");
  TORCH_CHECK_VALUE(labels.has_value() != soft.has_value(), "dps_fast: supcon_fwd needs exactly one of labels and soft");
  const c10::cuda::CUDAGuard guard(features.device());
  at::Tensor x = features.to(at::kFloat).contiguous();
  at::Tensor norm, f = x;
  if (normalize) {
    norm = x.norm(2, 1, true).clamp_min(1e-12);
    f = (x / norm).contiguous();
  }
  at::Tensor lab, sft;
  if (labels.has_value()) lab = labels->to(at::kLong).contiguous();
  else sft = soft->to(at::kFloat).contiguous();
  const int64_t M = f.size(0), D = f.size(1);
  auto lse = at::empty({M}, f.options()), wsum = at::empty({M}, f.options()), wdot = at::empty({M}, f.options());
  SupconArgs p{};
  p.f = f.data_ptr<float>();
  p.labels = lab.defined() ? lab.data_ptr<int64_t>() : nullptr;
  p.soft = sft.defined() ? sft.data_ptr<float>() : nullptr;
  p.lse = lse.data_ptr<float>(); p.wsum = wsum.data_ptr<float>(); p.wdot = wdot.data_ptr<float>();
  p.M = M; p.D = D; p.K = sft.defined() ? sft.size(1) : 0;
  p.inv_tau = static_cast<float>(1.0 / tau);
  auto stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err = launch_supcon_stats(p, stream);
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): supcon kernel failed: ", cudaGetErrorString(err));
  auto valid = wsum > 0;
  auto n_valid = valid.sum().clamp_min(1).to(at::kFloat);
  auto safe = at::where(valid, wsum, at::ones_like(wsum));
  auto per = at::where(valid, lse - wdot / safe, at::zeros_like(lse));
  at::Tensor loss = per.sum() / n_valid;
  if (!need_grad) return {loss, features.new_empty({0})};
  auto coef = valid.to(at::kFloat) / n_valid;
  auto invw = at::where(valid, safe.reciprocal(), at::zeros_like(safe));
  auto df = at::empty_like(f);
  p.coef = coef.data_ptr<float>(); p.invw = invw.data_ptr<float>(); p.df = df.data_ptr<float>();
  err = launch_supcon_grad(p, stream);
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): supcon gradient kernel failed: ", cudaGetErrorString(err));
  if (normalize) df = (df - f * (f * df).sum(1, true)) / norm;
  return {loss, df.to(features.scalar_type())};
}

}  // namespace
}  // namespace cuda
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) { m.impl("supcon_fwd", &dps_fast::cuda::supcon_fwd_cuda); }
