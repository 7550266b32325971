// Plain-C++ interface between the torch glue (dps_cross_entropy_glue.cpp) and the raw CUDA
// kernels (dps_cross_entropy.cu). No torch headers here, so the kernels compile in seconds.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dps_fast {
namespace cuda {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Up to this many views the kernel keeps the per-view statistics in registers; more views
// need CeArgs::view_stats, float scratch of 3 * V * B.
constexpr int kCeRegisterViews = 8;

// One DPS step (docs/method.md §2) or a soft-target cross-entropy (docs/method.md §3, has_idx = false,
// a = the target matrix, update = posterior = false).
struct CeArgs {
  const void* z;         // logits [V, B, C], contiguous
  const int64_t* idx;    // [B] sample ids (nullptr: row b uses row b of a)
  void* a;               // bank [N, stride_a] (or targets [B, C])
  void* g;               // gradient [V, B, C] like z, or nullptr
  float* loss;           // [V, B] (reduce == 0) or a scalar
  float* part;           // one float per block (reduce != 0)
  int* ticket;           // device counter, left at 0
  float* view_stats;     // [3, V, B] scratch when V > kCeRegisterViews, else nullptr
  int64_t B, C, N, stride_a;
  int V;
  float gamma, inv_tau_e, gscale, out_scale;
  int z_dtype, a_dtype;
  bool posterior, update, temper, has_grad, normalize;
  int reduce;            // 0 none, 1 mean, 2 sum
};

// Returns the number of blocks to allocate `part` for (from B, C and V: the kernel's threads a row).
int64_t ce_num_blocks(const CeArgs& p);
cudaError_t launch_ce(const CeArgs& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace dps_fast
