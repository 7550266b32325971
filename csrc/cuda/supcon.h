// Plain-C++ interface between the torch glue (supcon_glue.cpp) and the raw CUDA kernels
// (supcon.cu). No torch headers here, so the kernels compile in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dps_fast {
namespace cuda {

// SupCon statistics and gradient over normalised float32 rows f [M, D].
struct SupconArgs {
  const float* f;        // [M, D]
  const int64_t* labels; // [M] or nullptr
  const float* soft;     // [M, K] or nullptr
  float* lse;            // [M]
  float* wsum;           // [M]
  float* wdot;           // [M]
  const float* coef;     // [M] (gradient pass)
  const float* invw;     // [M] (gradient pass)
  float* df;             // [M, D] (gradient pass)
  int64_t M, D, K;
  float inv_tau;
};

cudaError_t launch_supcon_stats(const SupconArgs& p, cudaStream_t stream);
cudaError_t launch_supcon_grad(const SupconArgs& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dps_fast
