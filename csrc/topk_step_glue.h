// Torch-side checks and epilogue of the top-k step, shared by the CPU op (csrc/cpu/topk_step.cpp)
// and the CUDA glue (csrc/cuda/topk_step_glue.cpp), so that both refuse the same tensors with the
// same messages and return the same reduction.
#pragma once

#include <ATen/ATen.h>

#include "topk_step_args.h"

namespace dps_fast {

inline void check_topk_args(const at::Tensor& z, const at::Tensor& index, const at::Tensor& ids,
                            const at::Tensor& vals, const at::Tensor& rest, const at::Tensor& bound,
                            const at::Tensor& grad) {
  TORCH_CHECK_VALUE(z.dim() == 3 && z.scalar_type() == at::kFloat && z.is_contiguous() && z.size(0) >= 1,
                    "dps_fast: topk_step takes contiguous float32 logits [V, B, C], V >= 1");
  const int64_t B = z.size(1), N = ids.size(0), k = ids.dim() == 2 ? ids.size(1) : 0;
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == B,
                    "dps_fast: topk_step's index must be contiguous int64 [B]");
  TORCH_CHECK_VALUE(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.is_contiguous() && k >= 1 && k < z.size(2),
                    "dps_fast: topk_step's ids must be contiguous int64 [N, k], 1 <= k < C");
  TORCH_CHECK_VALUE(vals.scalar_type() == at::kFloat && vals.sizes() == ids.sizes() && vals.is_contiguous(),
                    "dps_fast: topk_step's vals must be contiguous float32 [N, k]");
  TORCH_CHECK_VALUE(rest.scalar_type() == at::kFloat && rest.dim() == 1 && rest.size(0) == N && rest.is_contiguous(),
                    "dps_fast: topk_step's rest must be contiguous float32 [N]");
  TORCH_CHECK_VALUE(bound.numel() == 0 || (bound.scalar_type() == at::kFloat && bound.dim() == 1 &&
                                           bound.size(0) == N && bound.is_contiguous()),
                    "dps_fast: topk_step's bound must be contiguous float32 [N] or empty");
  TORCH_CHECK_VALUE(grad.numel() == 0 || (grad.sizes() == z.sizes() && grad.scalar_type() == at::kFloat &&
                                          grad.is_contiguous()),
                    "dps_fast: topk_step's grad must be contiguous float32 like the logits, or empty");
}

// The raw arguments of a checked call (work: nullptr, or a [B, C] float buffer).
inline TopkArgs topk_args(const at::Tensor& z, const at::Tensor& index, at::Tensor& ids, at::Tensor& vals,
                          at::Tensor& rest, at::Tensor& bound, at::Tensor& grad, at::Tensor& per_row, float* work,
                          double gamma, double tau_e, bool posterior, bool update, int64_t reduction) {
  const int64_t V = z.size(0), B = z.size(1);
  const float gscale = reduction == 1 ? 1.0f / static_cast<float>(V * B) : 1.0f;
  return TopkArgs{z.data_ptr<float>(), index.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), vals.data_ptr<float>(),
                  rest.data_ptr<float>(), bound.numel() ? bound.data_ptr<float>() : nullptr,
                  grad.numel() ? grad.data_ptr<float>() : nullptr, per_row.data_ptr<float>(), work, V, B, z.size(2),
                  ids.size(0), ids.size(1), static_cast<float>(gamma), static_cast<float>(1.0 / tau_e), gscale,
                  tau_e != 1.0, posterior, update};
}

// After the kernel: the bank's version bumped as an in-place op does, and the loss reduced.
inline at::Tensor finish_topk_step(const at::Tensor& per_row, bool update, at::Tensor& ids, at::Tensor& vals,
                                   at::Tensor& rest, at::Tensor& bound, int64_t reduction) {
  if (update && per_row.size(1)) {
    for (at::Tensor* t : {&ids, &vals, &rest, &bound}) {
      if (t->numel() && !t->is_inference()) t->unsafeGetTensorImpl()->bump_version();
    }
  }
  if (reduction == 0) return per_row;
  const at::Tensor total = per_row.to(at::kDouble).sum();
  return (reduction == 1 ? total / static_cast<double>(per_row.numel()) : total).to(at::kFloat);
}

}  // namespace dps_fast
