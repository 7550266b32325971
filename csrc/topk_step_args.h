// The top-k step's arguments as raw pointers (docs/method.md §12), shared by the CPU kernel
// (csrc/cpu/topk_step.cpp) and the CUDA kernel (csrc/cuda/topk_step.h). Plain C++: no torch.
#pragma once

#include <cstdint>

namespace dps_fast {

struct TopkArgs {
  const float* z;      // [V, B, C]
  const int64_t* idx;  // [B]
  int64_t* ids;        // [N, k]
  float* vals;         // [N, k]
  float* rest;         // [N]
  float* bound;        // [N] or nullptr
  float* grad;         // [V, B, C] or nullptr
  float* loss;         // [V, B] per row
  float* work;         // [B, C] scratch for the evidence (the CUDA kernel; nullptr on CPU)
  int64_t V, B, C, N, k;
  float gamma, inv_tau_e, gscale;
  bool temper, posterior, update;
};

}  // namespace dps_fast
