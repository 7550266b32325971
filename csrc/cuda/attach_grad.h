// Plain-C++ interface between the torch glue (attach_grad_glue.cpp) and the raw CUDA kernel
// (attach_grad.cu) of attach_grad's backward. No torch headers here.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dps_fast {
namespace cuda {

// g[0, n) *= *s unless *s == 1.0f, on `stream`, with no host synchronisation: every block
// reads *s and returns at once when it is 1 (loss.backward()), so that case moves 4 bytes a
// block instead of a read and a write of the gradient. g is contiguous, of dtype `dtype`
// (dps_cross_entropy.h::DType); s is one float32 on the same device.
cudaError_t launch_scale_unless_one(void* g, int64_t n, int dtype, const float* s, cudaStream_t stream);

}  // namespace cuda
}  // namespace dps_fast
