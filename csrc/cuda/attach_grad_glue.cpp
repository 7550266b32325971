// Torch glue for attach_grad's backward on the device (attach_grad.cu):
// TORCH_LIBRARY_IMPL(dps_fast, CUDA) of dps_fast::scale_unless_one_ (schema: csrc/ops.cpp).
// Built only when setup.py finds a CUDA torch and nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attach_grad.h"
#include "dps_cross_entropy.h"

namespace dps_fast {
namespace cuda {
namespace {

int code_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return -1;
  }
}

void scale_unless_one_cuda(at::Tensor& grad, const at::Tensor& s) {
  const int code = code_of(grad.scalar_type());
  const bool kernel_fits = code >= 0 && grad.is_contiguous() && s.numel() == 1 && s.scalar_type() == at::kFloat &&
                           s.device() == grad.device();
  if (!kernel_fits) {  // any other layout: multiply (correct for s == 1 too), still without a sync
    grad.mul_(s);
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor scale = s.contiguous();
  const cudaError_t err = launch_scale_unless_one(grad.data_ptr(), grad.numel(), code, scale.const_data_ptr<float>(),
                                                  c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace cuda
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) {
  m.impl("scale_unless_one_", &dps_fast::cuda::scale_unless_one_cuda);
}
