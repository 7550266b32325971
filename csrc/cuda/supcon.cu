// CUDA kernels: tiled SupCon / NT-Xent logsumexp and gradient (docs/method.md §4), the O(M^2)
// parts of the loss (the positive term is linear in the features: dps_fast/ops/supcon.py).
//
// Blocks of 16 x 16 threads own 16 anchor rows and sweep the candidate rows in
// tiles of 16; thread (r, c) computes s = <f_i, f_j> / tau for its pair, reading
// both tiles from shared memory in chunks of 128 feature dimensions. Each thread
// keeps an online logsumexp over its own candidates; the 16 threads of a row merge
// them at the end. The gradient kernel recomputes the same tiles, forms
// G_ij + G_ji = c_i p_ij + c_j p_ji in shared memory and accumulates dF_i = (1/tau) G F_j; a thread
// keeps MAXACC accumulators (feature dimensions c, c + 16, ...), so one block covers 1024
// dimensions: wider features take more blocks along y (gridDim.y = ceil(D / 1024)), each
// recomputing the similarity tiles for its own slice of dimensions.
// The M x M matrix never exists; memory is O(M D).
#include <algorithm>
#include <cmath>

#include "supcon.h"

namespace dps_fast {
namespace cuda {
namespace {

constexpr int T = 16;       // tile rows / cols
constexpr int DC = 128;     // feature chunk
constexpr int MAXACC = 64;  // per-thread accumulators: 16 * 64 = 1024 dimensions per block
constexpr int DSLICE = T * MAXACC;

// s_ij for the thread's pair, from shared tiles loaded chunk by chunk.
__device__ float tile_dot(const SupconArgs& p, int64_t i0, int64_t j0, float (*fi)[DC + 1],
                          float (*fj)[DC + 1]) {
  const int r = threadIdx.y, c = threadIdx.x, t = r * T + c;
  float acc = 0.f;
  for (int64_t d0 = 0; d0 < p.D; d0 += DC) {
    for (int e = t; e < T * DC; e += T * T) {
      const int rr = e / DC, dd = e % DC;
      const int64_t gi = i0 + rr, gj = j0 + rr, gd = d0 + dd;
      fi[rr][dd] = (gi < p.M && gd < p.D) ? p.f[gi * p.D + gd] : 0.f;
      fj[rr][dd] = (gj < p.M && gd < p.D) ? p.f[gj * p.D + gd] : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int dd = 0; dd < DC; ++dd) acc += fi[r][dd] * fj[c][dd];
    __syncthreads();
  }
  return acc * p.inv_tau;
}

__global__ void __launch_bounds__(T * T) lse_kernel(SupconArgs p) {
  __shared__ float fi[T][DC + 1], fj[T][DC + 1];
  const int r = threadIdx.y, c = threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * T, i = i0 + r;
  float m = -INFINITY, l = 0.f;
  for (int64_t j0 = 0; j0 < p.M; j0 += T) {
    const float s = tile_dot(p, i0, j0, fi, fj);
    const int64_t j = j0 + c;
    if (i < p.M && j < p.M && j != i) {
      if (s > m) {
        l = l * ((m == -INFINITY) ? 0.f : expf(m - s)) + 1.f;
        m = s;
      } else {
        l += expf(s - m);
      }
    }
  }
  // merge the 16 threads of the row (consecutive lanes of one half-warp)
  float M = m;
#pragma unroll
  for (int o = T / 2; o > 0; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffffu, M, o, T));
  float L = (m == -INFINITY) ? 0.f : l * expf(m - M);
#pragma unroll
  for (int o = T / 2; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o, T);
  if (c == 0 && i < p.M) p.lse[i] = L > 0.f ? M + logf(L) : 0.f;
}

__global__ void __launch_bounds__(T * T) grad_kernel(SupconArgs p) {
  __shared__ float fi[T][DC + 1], fj[T][DC + 1];
  __shared__ float gt[T][T + 1];
  const int r = threadIdx.y, c = threadIdx.x;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * T, i = i0 + r;
  const float lse_i = i < p.M ? p.lse[i] : 0.f, c_i = i < p.M ? p.coef[i] : 0.f;
  const int64_t dslice = static_cast<int64_t>(blockIdx.y) * DSLICE;  // this block's dimensions
  float acc[MAXACC];
#pragma unroll
  for (int k = 0; k < MAXACC; ++k) acc[k] = 0.f;
  for (int64_t j0 = 0; j0 < p.M; j0 += T) {
    const float s = tile_dot(p, i0, j0, fi, fj);
    const int64_t j = j0 + c;
    float gv = 0.f;
    if (i < p.M && j < p.M && j != i) gv = c_i * expf(s - lse_i) + p.coef[j] * expf(s - p.lse[j]);
    gt[r][c] = gv;
    __syncthreads();
    // acc[r, d] += sum_c G[r][c] * f[j0 + c, d] for d = dslice + c + 16 k
    for (int k = 0; k < MAXACC; ++k) {
      const int64_t d = dslice + c + static_cast<int64_t>(T) * k;
      if (d >= p.D) break;
      float sum = 0.f;
#pragma unroll
      for (int cc = 0; cc < T; ++cc) {
        const int64_t jj = j0 + cc;
        sum += gt[r][cc] * (jj < p.M ? p.f[jj * p.D + d] : 0.f);
      }
      acc[k] += sum;
    }
    __syncthreads();
  }
  if (i < p.M) {
    for (int k = 0; k < MAXACC; ++k) {
      const int64_t d = dslice + c + static_cast<int64_t>(T) * k;
      if (d >= p.D) break;
      p.df[i * p.D + d] = acc[k] * p.inv_tau;
    }
  }
}

}  // namespace

cudaError_t launch_supcon_lse(const SupconArgs& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  lse_kernel<<<(p.M + T - 1) / T, dim3(T, T), 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_supcon_grad(const SupconArgs& p, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  const int64_t slices = (p.D + DSLICE - 1) / DSLICE;
  if (slices > 65535) return cudaErrorInvalidValue;  // gridDim.y: D up to 65535 * 1024
  grad_kernel<<<dim3((p.M + T - 1) / T, static_cast<unsigned>(std::max<int64_t>(slices, 1))), dim3(T, T), 0,
                stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dps_fast
