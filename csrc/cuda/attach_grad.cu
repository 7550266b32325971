// attach_grad's backward on the device (csrc/ops.cpp::scale_grad): the gradient buffer the
// forward computed, scaled in place by the upstream gradient unless that is exactly 1.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attach_grad.h"
#include "dps_cross_entropy.h"

namespace dps_fast {
namespace cuda {
namespace {

constexpr int kScaleThreads = 256;
// Grid-stride blocks: enough to fill an H100 (132 SMs x 8 blocks of 256 threads) and few
// enough that the s == 1 early return costs one short launch.
constexpr int64_t kScaleMaxBlocks = 1024;

__device__ __forceinline__ float load_f32(const float* p) { return *p; }
__device__ __forceinline__ float load_f32(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_f32(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store_f32(float* p, float x) { *p = x; }
__device__ __forceinline__ void store_f32(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_f32(__half* p, float x) { *p = __float2half_rn(x); }

// The product in float32, rounded once to T: what torch's mul_ of a 16-bit tensor by a float
// scalar computes, bit for bit.
template <typename T>
__global__ void scale_unless_one_kernel(T* __restrict__ g, int64_t n, const float* __restrict__ s) {
  const float k = *s;
  if (k == 1.0f) return;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    store_f32(g + i, load_f32(g + i) * k);
  }
}

template <typename T>
cudaError_t launch_typed(void* g, int64_t n, const float* s, cudaStream_t stream) {
  int64_t blocks = (n + kScaleThreads - 1) / kScaleThreads;
  if (blocks > kScaleMaxBlocks) blocks = kScaleMaxBlocks;
  scale_unless_one_kernel<T><<<static_cast<unsigned>(blocks), kScaleThreads, 0, stream>>>(static_cast<T*>(g), n, s);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_scale_unless_one(void* g, int64_t n, int dtype, const float* s, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  switch (dtype) {
    case kF32: return launch_typed<float>(g, n, s, stream);
    case kBF16: return launch_typed<__nv_bfloat16>(g, n, s, stream);
    case kF16: return launch_typed<__half>(g, n, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace cuda
}  // namespace dps_fast
