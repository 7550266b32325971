// Torch glue for the CUDA SupCon kernels (supcon.cu): TORCH_LIBRARY_IMPL(dps_fast, CUDA) of the two
// ops supcon_stats and supcon_grad (schemas in csrc/cpu/supcon.cpp). Each only checks its tensors
// and launches one kernel: the host glue around them is dps_fast/ops/supcon.py, for every backend.
// Built only when setup.py finds a CUDA torch and nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "supcon.h"

namespace dps_fast {
namespace cuda {
namespace {

// The launch arguments shared by both kernels; the tensors of the positives stay alive in `keep`.
SupconArgs supcon_args(const at::Tensor& f, const std::optional<at::Tensor>& labels,
                       const std::optional<at::Tensor>& soft, double inv_tau, at::Tensor (&keep)[2]) {
  TORCH_CHECK_VALUE(f.dim() == 2 && f.scalar_type() == at::kFloat && f.is_contiguous(),
                    "dps_fast: the SupCon ops take contiguous float32 rows [M, d]");
  TORCH_CHECK_VALUE(labels.has_value() != soft.has_value(), "dps_fast: the SupCon ops need exactly one of labels and soft");
  if (labels.has_value()) keep[0] = labels->to(at::kLong).contiguous();
  else keep[1] = soft->to(at::kFloat).contiguous();
  SupconArgs p{};
  p.f = f.data_ptr<float>();
  p.labels = keep[0].defined() ? keep[0].data_ptr<int64_t>() : nullptr;
  p.soft = keep[1].defined() ? keep[1].data_ptr<float>() : nullptr;
  p.M = f.size(0); p.D = f.size(1); p.K = keep[1].defined() ? keep[1].size(1) : 0;
  p.inv_tau = static_cast<float>(inv_tau);
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> supcon_stats_cuda(const at::Tensor& f,
                                                                 const std::optional<at::Tensor>& labels,
                                                                 const std::optional<at::Tensor>& soft,
                                                                 double inv_tau) {
  const c10::cuda::CUDAGuard guard(f.device());
  at::Tensor keep[2];
  SupconArgs p = supcon_args(f, labels, soft, inv_tau, keep);
  auto lse = at::empty({p.M}, f.options()), wsum = at::empty_like(lse), wdot = at::empty_like(lse);
  p.lse = lse.data_ptr<float>(); p.wsum = wsum.data_ptr<float>(); p.wdot = wdot.data_ptr<float>();
  const cudaError_t err = launch_supcon_stats(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): supcon kernel failed: ", cudaGetErrorString(err));
  return {lse, wsum, wdot};
}

at::Tensor supcon_grad_cuda(const at::Tensor& f, const std::optional<at::Tensor>& labels,
                            const std::optional<at::Tensor>& soft, const at::Tensor& lse, const at::Tensor& coef,
                            const at::Tensor& invw, double inv_tau) {
  const c10::cuda::CUDAGuard guard(f.device());
  at::Tensor keep[2];
  SupconArgs p = supcon_args(f, labels, soft, inv_tau, keep);
  for (const at::Tensor* t : {&lse, &coef, &invw}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == p.M && t->scalar_type() == at::kFloat && t->is_contiguous(),
                      "dps_fast: supcon_grad's row statistics must be contiguous float32 [M]");
  }
  auto df = at::empty_like(f);
  p.lse = lse.data_ptr<float>();
  p.coef = coef.data_ptr<float>(); p.invw = invw.data_ptr<float>(); p.df = df.data_ptr<float>();
  const cudaError_t err = launch_supcon_grad(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): supcon gradient kernel failed: ", cudaGetErrorString(err));
  return df;
}

}  // namespace
}  // namespace cuda
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) {
  m.impl("supcon_stats", &dps_fast::cuda::supcon_stats_cuda);
  m.impl("supcon_grad", &dps_fast::cuda::supcon_grad_cuda);
}
