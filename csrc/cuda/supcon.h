// Plain-C++ interface between the torch glue (supcon_glue.cpp) and the raw CUDA kernels
// (supcon.cu). No torch headers here, so the kernels compile in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dps_fast {
namespace cuda {

// The O(M^2) parts of SupCon over normalised float32 rows f [M, D], s_ij = <f_i, f_j> * inv_tau:
// each row's logsumexp over j != i, and the softmax part of the gradient (the positive term is
// linear in f: dps_fast/ops/supcon.py computes it in closed form for every backend).
struct SupconArgs {
  const float* f;        // [M, D]
  float* lse;            // [M] (written by the lse kernel, read by the gradient kernel)
  const float* coef;     // [M] (gradient pass)
  float* df;             // [M, D] (gradient pass)
  int64_t M, D;
  float inv_tau;
};

cudaError_t launch_supcon_lse(const SupconArgs& p, cudaStream_t stream);
cudaError_t launch_supcon_grad(const SupconArgs& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dps_fast
