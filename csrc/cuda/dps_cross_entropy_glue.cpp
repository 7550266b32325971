// Torch glue for the CUDA DPS-step and soft-CE kernels (dps_cross_entropy.cu): TORCH_LIBRARY_IMPL(dps_fast, CUDA).
// Built only when setup.py finds a CUDA torch and nvcc.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>

#include "dps_cross_entropy.h"

namespace dps_fast {
namespace cuda {
namespace {

int dtype_code(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      TORCH_CHECK_TYPE(false, "dps_fast (cuda): ", what, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return -1;
}

int* ticket(const at::Device& dev) {
  // One counter per device; every launch leaves it at 0 (see dps_cross_entropy.cu).
  static std::mutex mu;
  static std::map<int, at::Tensor> tickets;
  std::lock_guard<std::mutex> lock(mu);
  auto& t = tickets[dev.index()];
  if (!t.defined()) t = at::zeros({1}, at::TensorOptions().device(dev).dtype(at::kInt));
  return t.data_ptr<int>();
}

at::Tensor run_ce(const at::Tensor& logits, const at::Tensor* index, at::Tensor& a, at::Tensor& grad,
                  double gamma, double tau_e, bool posterior, bool update, int64_t reduction, bool normalize) {
  TORCH_CHECK_VALUE(logits.dim() == 2 || logits.dim() == 3, "dps_fast: logits must be [B, C] or [V, B, C]");
  TORCH_CHECK_VALUE(a.dim() == 2 && (a.size(1) <= 1 || a.stride(1) == 1),
                    "dps_fast: bank/target must be [N, C] with unit class stride");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto z = logits.contiguous();
  const int64_t V = z.dim() == 3 ? z.size(0) : 1, B = z.size(-2), C = z.size(-1);
  const bool has_grad = grad.numel() > 0;
  if (has_grad)
    TORCH_CHECK_VALUE(grad.is_contiguous() && grad.sizes() == z.sizes() && grad.scalar_type() == z.scalar_type(),
                      "dps_fast: grad buffer must be a contiguous tensor like the logits");
  at::Tensor idx;
  if (index) idx = index->to(at::kLong).contiguous();
  auto opts = z.options().dtype(at::kFloat);
  at::Tensor loss = reduction == 0 ? at::empty(z.sizes().slice(0, z.dim() - 1), opts) : at::empty({}, opts);
  CeArgs p{};
  p.z = z.data_ptr();
  p.idx = index ? idx.data_ptr<int64_t>() : nullptr;
  p.a = a.data_ptr();
  p.g = has_grad ? grad.data_ptr() : nullptr;
  p.loss = loss.data_ptr<float>();
  p.B = B; p.C = C; p.N = a.size(0); p.stride_a = a.stride(0); p.V = static_cast<int>(V);
  p.gamma = static_cast<float>(gamma);
  p.inv_tau_e = static_cast<float>(1.0 / tau_e);
  const float scale = reduction == 1 ? 1.0f / static_cast<float>(V * B) : 1.0f;
  p.gscale = scale; p.out_scale = scale;
  p.z_dtype = dtype_code(z, "logits"); p.a_dtype = dtype_code(a, index ? "alpha" : "target");
  p.posterior = posterior; p.update = update; p.temper = tau_e != 1.0; p.has_grad = has_grad;
  p.normalize = normalize; p.reduce = static_cast<int>(reduction);
  at::Tensor part = at::empty({std::max<int64_t>(1, ce_num_blocks(p))}, opts);
  p.part = part.data_ptr<float>();
  p.ticket = ticket(z.device());
  at::Tensor view_stats;  // per-view statistics of the many-views kernel
  if (V > kCeRegisterViews) {
    view_stats = at::empty({3, V, B}, opts);
    p.view_stats = view_stats.data_ptr<float>();
  }
  const cudaError_t err = launch_ce(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "dps_fast (cuda): kernel launch failed: ", cudaGetErrorString(err));
  return loss;
}

at::Tensor dps_ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& index, at::Tensor& alpha, at::Tensor& grad,
                           double gamma, double tau_e, bool posterior, bool update, int64_t reduction) {
  // The bank is written in place, behind autograd's back: bump its version as an in-place op
  // does (csrc/cpu/dps_cross_entropy.cpp::dps_ce_fwd_cpu).
  if (update && logits.dim() >= 2 && logits.size(-2) > 0 && !alpha.is_inference()) {
    alpha.unsafeGetTensorImpl()->bump_version();
  }
  return run_ce(logits, &index, alpha, grad, gamma, tau_e, posterior, update, reduction, true);
}

at::Tensor soft_ce_fwd_cuda(const at::Tensor& logits, const at::Tensor& target, at::Tensor& grad, bool normalize,
                            int64_t reduction) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && target.sizes() == logits.sizes(),
                    "dps_fast: soft_cross_entropy needs logits and target of one shape [B, C]");
  auto t = target.contiguous();
  return run_ce(logits, nullptr, t, grad, 0.0, 1.0, false, false, reduction, normalize);
}

}  // namespace
}  // namespace cuda
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CUDA, m) {
  m.impl("dps_ce_fwd", &dps_fast::cuda::dps_ce_fwd_cuda);
  m.impl("soft_ce_fwd", &dps_fast::cuda::soft_ce_fwd_cuda);
}
