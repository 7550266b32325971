// Torch glue for the CUDA SupCon kernels (supcon.cu): TORCH_LIBRARY_IMPL(dps_fast, CUDA) of the two
// ops supcon_lse and supcon_grad (schemas in csrc/cpu/supcon.cpp). Each only checks its tensors
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

SupconArgs supcon_args(const at::Tensor& f, double inv_tau) {
  TORCH_CHECK_VALUE(f.dim() == 2 && f.scalar_type() == at::kFloat && f.is_contiguous(),
                    "dps_fast: the SupCon ops take contiguous float32 rows [M, d]");
  SupconArgs p{};
  p.f = f.data_ptr<float>();
  p.M = f.size(0); p.D = f.size(1);
  p.inv_tau = static_cast<float>(inv_tau);
  return p;
}

at::Tensor supcon_lse_cuda(const at::Tensor& f, double inv_tau) {
  const c10::cuda::CUDAGuard guard(f.device());
  SupconArgs p = supcon_args(f, inv_tau);
  auto lse = at::empty({p.M}, f.options());
  p.lse = lse.data_ptr<float>();
  const cudaError_t err = launch_supcon_lse(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): supcon kernel failed: ", cudaGetErrorString(err));
  return lse;
}

at::Tensor supcon_grad_cuda(const at::Tensor& f, const at::Tensor& lse, const at::Tensor& coef, double inv_tau) {
  const c10::cuda::CUDAGuard guard(f.device());
  SupconArgs p = supcon_args(f, inv_tau);
  for (const at::Tensor* t : {&lse, &coef}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == p.M && t->scalar_type() == at::kFloat && t->is_contiguous(),
                      "dps_fast: supcon_grad's row statistics must be contiguous float32 [M]");
  }
  auto df = at::empty_like(f);
  p.lse = lse.data_ptr<float>(); p.coef = coef.data_ptr<float>(); p.df = df.data_ptr<float>();
  const cudaError_t err = launch_supcon_grad(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): supcon gradient kernel failed: ", cudaGetErrorString(err));
  return df;
}

}  // namespace
}  // namespace cuda
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) {
  m.impl("supcon_lse", &dps_fast::cuda::supcon_lse_cuda);
  m.impl("supcon_grad", &dps_fast::cuda::supcon_grad_cuda);
}
