// Torch glue for the CUDA kernel of the top-k bank's step (topk_step.cu): TORCH_LIBRARY_IMPL(dps_fast,
// CUDA) of topk_step (schema in csrc/cpu/topk_step.cpp). It checks the tensors as the CPU kernel
// does, plus the kernel's shared-memory limits, allocates the [B, C] work buffer, launches, and
// reduces the loss. Built only when setup.py finds a CUDA torch and nvcc; dps_fast/topk.py calls
// it only where backend="cuda" is named (it has never run on a GPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../topk_step_glue.h"
#include "topk_step.h"

namespace dps_fast {
namespace cuda {
namespace {

void check_topk_cuda(const at::Tensor& z, const at::Tensor& index, const at::Tensor& ids, const at::Tensor& vals,
                     const at::Tensor& rest, const at::Tensor& bound, const at::Tensor& grad) {
  check_topk_args(z, index, ids, vals, rest, bound, grad);
  const int64_t V = z.size(0), C = z.size(2), k = ids.size(1);
  TORCH_CHECK_VALUE(C <= kTopkMaxC && k <= kTopkMaxK && V <= kTopkMaxViews,
                    "dps_fast: the CUDA top-k step takes C <= ", kTopkMaxC, ", k <= ", kTopkMaxK, " and at most ",
                    kTopkMaxViews, " views; got C = ", C, ", k = ", k, ", ", V, " views");
  TORCH_CHECK_VALUE(z.is_cuda(), "dps_fast: the CUDA top-k step takes CUDA logits");
  for (const at::Tensor* t : {&index, &ids, &vals, &rest, &bound, &grad}) {
    TORCH_CHECK_VALUE(t->numel() == 0 || t->device() == z.device(),
                      "dps_fast: topk_step's tensors must be on the logits' device");
  }
}

at::Tensor topk_step_cuda(const at::Tensor& z, const at::Tensor& index, at::Tensor& ids, at::Tensor& vals,
                          at::Tensor& rest, at::Tensor& bound, at::Tensor& grad, double gamma, double tau_e,
                          bool posterior, bool update, int64_t reduction) {
  check_topk_cuda(z, index, ids, vals, rest, bound, grad);
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t V = z.size(0), B = z.size(1), C = z.size(2);
  at::Tensor per_row = at::empty({V, B}, z.options());
  at::Tensor work = at::empty({B, C}, z.options());
  const TopkArgs p = topk_args(z, index, ids, vals, rest, bound, grad, per_row, work.data_ptr<float>(), gamma, tau_e,
                               posterior, update, reduction);
  const cudaError_t err = launch_topk_step(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): topk_step kernel failed: ", cudaGetErrorString(err));
  return finish_topk_step(per_row, update, ids, vals, rest, bound, reduction);
}

}  // namespace
}  // namespace cuda
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) { m.impl("topk_step", &dps_fast::cuda::topk_step_cuda); }
