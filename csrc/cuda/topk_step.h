// Plain-C++ interface between the torch glue (topk_step_glue.cpp) and the raw CUDA kernel of the
// top-k bank's step (topk_step.cu; docs/method.md §12). No torch headers here.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "../topk_step_args.h"

namespace dps_fast {
namespace cuda {

constexpr int kTopkMaxC = 32768;  // a row's class bitmasks live in shared memory (4 KB each)
constexpr int kTopkMaxK = 256;    // K, J and K' live in shared memory
constexpr int kTopkMaxViews = 8;

cudaError_t launch_topk_step(const TopkArgs& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dps_fast
