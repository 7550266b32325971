// CUDA kernel of the top-k bank's step (docs/method.md §12; issue 26): one block of 256 threads per
// sample. It follows dps_fast/topk.py::reference_step step by step, in float32, as the CPU kernel
// (csrc/cpu/topk_step.cpp) and the Triton kernel (dps_fast/kernels/topk_step.py) do: the evidence
// p (kept in a [B, C] work buffer), J picked one class at a time by a block-wide argmax (ties to
// the smaller class id), K' from the 2k candidates by the tie rule (thread 0), rest', the bound's
// delta, then the loss and gradient against the implied target. Membership of a class in K, J or
// K' is a bitmask in shared memory (C <= 32,768), K and J are shared arrays (k <= 256).
// Written for correctness, like the Triton kernel: it reads the row several times and selects J
// in nJ block-wide passes; issue 25's design (one read, a running top-k) is still to come, and it
// has run only in the CPU emulator (tools/cuda_emulator), never on a GPU.
#include <cmath>
#include <cstdint>

#include "topk_step.h"

namespace dps_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr float kSnap = 1e-5f;  // dps_fast/topk.py::SNAP, the tie rule's rounding margin

struct Shared {
  float red_v[kThreads];
  int red_i[kThreads];
  unsigned excl[kTopkMaxC / 32];  // K, then J as it is picked
  unsigned kept[kTopkMaxC / 32];  // K'
  int K[kTopkMaxK], J[kTopkMaxK], NK[kTopkMaxK];
  float val[kTopkMaxK], pK[kTopkMaxK], pJ[kTopkMaxK], nb[kTopkMaxK], t[kTopkMaxK];
  unsigned char chosen[2 * kTopkMaxK];
  float m[kTopkMaxViews], s[kTopkMaxViews], se[kTopkMaxViews], gap[kTopkMaxViews];  // gap: sum_j (m - z_j)
  float key[2 * kTopkMaxK];
  float new_rest, u;
};

__device__ bool has(const unsigned* mask, int64_t j) { return (mask[j >> 5] >> (j & 31)) & 1u; }
__device__ void set(unsigned* mask, int64_t j) { mask[j >> 5] |= 1u << (j & 31); }

// Block-wide sum / max / (value, id) argmax: every thread calls them and gets the result.
__device__ float block_sum(float v, Shared& sh) {
  const int t = threadIdx.x;
  sh.red_v[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh.red_v[t] += sh.red_v[t + s];
    __syncthreads();
  }
  const float r = sh.red_v[0];
  __syncthreads();
  return r;
}

__device__ float block_max(float v, Shared& sh) {
  const int t = threadIdx.x;
  sh.red_v[t] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s) sh.red_v[t] = fmaxf(sh.red_v[t], sh.red_v[t + s]);
    __syncthreads();
  }
  const float r = sh.red_v[0];
  __syncthreads();
  return r;
}

__device__ bool better(float v, int i, float bv, int bi) { return v > bv || (v == bv && i < bi); }

__device__ void block_argmax(float& v, int& i, Shared& sh) {
  const int t = threadIdx.x;
  sh.red_v[t] = v, sh.red_i[t] = i;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (t < s && better(sh.red_v[t + s], sh.red_i[t + s], sh.red_v[t], sh.red_i[t]))
      sh.red_v[t] = sh.red_v[t + s], sh.red_i[t] = sh.red_i[t + s];
    __syncthreads();
  }
  v = sh.red_v[0], i = sh.red_i[0];
  __syncthreads();
}

// Per view: max, sum exp(z - m), sum exp((z - m) / tau_e), sum (m - z) into shared (terms >= 0: no
// inf - inf for huge finite logits, docs/method.md §9); false if a logit is not finite.
__device__ bool view_stats(const TopkArgs& p, int64_t b, Shared& sh) {
  float bad = 0.f;
  for (int64_t v = 0; v < p.V; ++v) {
    const float* z = p.z + (v * p.B + b) * p.C;
    float mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < p.C; j += kThreads) {
      if (!isfinite(z[j])) bad = 1.f;
      mx = fmaxf(mx, z[j]);
    }
    mx = block_max(mx, sh);
    float s = 0.f, se = 0.f, gap = 0.f;
    for (int64_t j = threadIdx.x; j < p.C; j += kThreads)
      s += expf(z[j] - mx), se += expf((z[j] - mx) * p.inv_tau_e), gap += mx - z[j];
    s = block_sum(s, sh), se = block_sum(se, sh), gap = block_sum(gap, sh);
    if (threadIdx.x == 0) sh.m[v] = mx, sh.s[v] = s, sh.se[v] = se, sh.gap[v] = gap;
  }
  return block_sum(bad, sh) == 0.f;
}

// The evidence p into the work row; K (ids, values, their p) into shared memory and the masks.
// Returns the evidence mass outside K.
__device__ float evidence_and_k(const TopkArgs& p, int64_t b, int64_t row, float* w, Shared& sh) {
  float total = 0.f;
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads) {
    float pj = 0.f;
    for (int64_t v = 0; v < p.V; ++v) pj += expf((p.z[(v * p.B + b) * p.C + j] - sh.m[v]) * p.inv_tau_e) / sh.se[v];
    w[j] = pj / static_cast<float>(p.V);
    total += w[j];
  }
  for (int64_t i = threadIdx.x; i < (p.C + 31) / 32; i += kThreads) sh.excl[i] = 0u, sh.kept[i] = 0u;
  total = block_sum(total, sh);  // its barriers make the work row and the cleared masks visible
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < p.k; ++i) {
      sh.K[i] = static_cast<int>(p.ids[row * p.k + i]), sh.val[i] = p.vals[row * p.k + i];
      sh.pK[i] = w[sh.K[i]];
      set(sh.excl, sh.K[i]);
    }
  }
  __syncthreads();
  float in_k = 0.f;
  for (int64_t i = 0; i < p.k; ++i) in_k += sh.pK[i];
  return total - in_k;
}

// J: the nJ classes outside K with the largest p, one block-wide argmax each.
__device__ void pick_j(const TopkArgs& p, const float* w, int64_t nJ, Shared& sh) {
  for (int64_t i = 0; i < nJ; ++i) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int64_t j = threadIdx.x; j < p.C; j += kThreads)
      if (!has(sh.excl, j) && better(w[j], static_cast<int>(j), bv, bi)) bv = w[j], bi = static_cast<int>(j);
    block_argmax(bv, bi, sh);
    if (threadIdx.x == 0) sh.J[i] = bi, sh.pJ[i] = bv, set(sh.excl, bi);
    __syncthreads();
  }
}

// K' (thread 0): the k best of the 2k candidates by the tie rule's key, and rest'.
__device__ void pick_new_k(const TopkArgs& p, int64_t nJ, float level, float p_out, Shared& sh) {
  const float base = p.gamma * level;
  const int64_t n = p.k + nJ;
  for (int64_t c = 0; c < n; ++c) {  // each key once; tied keys bit-equal: __fadd_rn is never an fma
    if (c >= p.k) sh.key[c] = __fadd_rn(base, sh.pJ[c - p.k]);
    else if (fabsf(sh.val[c] - level) <= kSnap * level) sh.key[c] = __fadd_rn(base, sh.pK[c]);
    else sh.key[c] = p.gamma * sh.val[c] + sh.pK[c];
    sh.chosen[c] = 0;
  }
  const auto cid = [&](int64_t c) { return c < p.k ? sh.K[c] : sh.J[c - p.k]; };
  for (int64_t s = 0; s < p.k; ++s) {
    int64_t best = -1;
    for (int64_t c = 0; c < n; ++c)
      if (!sh.chosen[c] && (best < 0 || better(sh.key[c], cid(c), sh.key[best], cid(best)))) best = c;
    sh.chosen[best] = 1;
    sh.NK[s] = cid(best);
    sh.nb[s] = best < p.k ? p.gamma * sh.val[best] + sh.pK[best] : sh.key[best];
    set(sh.kept, sh.NK[s]);
  }
  float dropped = 0.f, admitted_p = 0.f;
  int64_t n_adm = 0;
  for (int64_t c = 0; c < p.k; ++c)
    if (!sh.chosen[c]) dropped += p.gamma * sh.val[c] + sh.pK[c];
  for (int64_t c = p.k; c < n; ++c)
    if (sh.chosen[c]) n_adm += 1, admitted_p += sh.pJ[c - p.k];
  sh.new_rest = base * static_cast<float>(p.C - p.k - n_adm) + (p_out - admitted_p) + dropped;
}

// The bound's delta: twice the evidence outside K' and the excess over the new level of the
// implied update outside K' (the classes of K corrected by thread 0).
__device__ float bound_delta(const TopkArgs& p, const float* w, float level, Shared& sh) {
  const float base = p.gamma * level, new_level = sh.new_rest / static_cast<float>(p.C - p.k);
  float acc = 0.f;
  for (int64_t j = threadIdx.x; j < p.C; j += kThreads)
    if (!has(sh.kept, j)) acc += w[j] + fmaxf(0.f, base + w[j] - new_level);
  if (threadIdx.x == 0) {
    for (int64_t i = 0; i < p.k; ++i)
      if (!has(sh.kept, sh.K[i]))
        acc += fmaxf(0.f, p.gamma * sh.val[i] + sh.pK[i] - new_level) - fmaxf(0.f, base + sh.pK[i] - new_level);
  }
  return 2.f * block_sum(acc, sh);
}

// Loss and gradient of every view against the target (t on tK, u elsewhere).
__device__ void outputs(const TopkArgs& p, int64_t b, const int* tK, Shared& sh) {
  for (int64_t v = 0; v < p.V; ++v) {
    const float* z = p.z + (v * p.B + b) * p.C;
    if (threadIdx.x == 0) {
      float on_k = 0.f;
      for (int64_t i = 0; i < p.k; ++i) on_k += (sh.t[i] - sh.u) * (sh.m[v] - z[tK[i]]);
      p.loss[v * p.B + b] = logf(sh.s[v]) + on_k + sh.u * sh.gap[v];
    }
    if (!p.grad) continue;
    float* g = p.grad + (v * p.B + b) * p.C;
    for (int64_t j = threadIdx.x; j < p.C; j += kThreads) g[j] = (expf(z[j] - sh.m[v]) / sh.s[v] - sh.u) * p.gscale;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < p.k; i += kThreads) g[tK[i]] -= (sh.t[i] - sh.u) * p.gscale;
    __syncthreads();
  }
}

__device__ void nan_row(const TopkArgs& p, int64_t b) {
  for (int64_t v = 0; v < p.V; ++v) {
    if (threadIdx.x == 0) p.loss[v * p.B + b] = NAN;
    if (p.grad)
      for (int64_t j = threadIdx.x; j < p.C; j += kThreads) p.grad[(v * p.B + b) * p.C + j] = NAN;
  }
}

__global__ void topk_step_kernel(TopkArgs p) {
  __shared__ Shared sh;
  const int64_t b = blockIdx.x, id = p.idx[b];
  const bool inside = id >= 0 && id < p.N;
  const int64_t row = inside ? id : 0;
  if (!view_stats(p, b, sh) || !inside) return nan_row(p, b);  // uniform across the block
  float* w = p.work + b * p.C;
  const float p_out = evidence_and_k(p, b, row, w, sh);
  const float level = p.rest[row] / static_cast<float>(p.C - p.k);
  const int64_t nJ = p.k < p.C - p.k ? p.k : p.C - p.k;
  pick_j(p, w, nJ, sh);
  if (threadIdx.x == 0) pick_new_k(p, nJ, level, p_out, sh);
  __syncthreads();
  const float delta = p.update && p.bound ? bound_delta(p, w, level, sh) : 0.f;
  if (threadIdx.x == 0) {  // the target: t on tK, u elsewhere
    const float* tv = p.posterior ? sh.nb : sh.val;
    const float tr = p.posterior ? sh.new_rest : p.rest[row];
    float mass = tr;
    for (int64_t i = 0; i < p.k; ++i) mass += tv[i];
    for (int64_t i = 0; i < p.k; ++i) sh.t[i] = tv[i] / mass;
    sh.u = tr / (static_cast<float>(p.C - p.k) * mass);
  }
  __syncthreads();
  outputs(p, b, p.posterior ? sh.NK : sh.K, sh);
  if (!p.update) return;
  for (int64_t i = threadIdx.x; i < p.k; i += kThreads) p.ids[row * p.k + i] = sh.NK[i], p.vals[row * p.k + i] = sh.nb[i];
  if (threadIdx.x == 0) {
    p.rest[row] = sh.new_rest;
    if (p.bound) p.bound[row] = p.gamma * p.bound[row] + delta;
  }
}

}  // namespace

cudaError_t launch_topk_step(const TopkArgs& p, cudaStream_t stream) {
  if (p.B == 0) return cudaSuccess;
  topk_step_kernel<<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace dps_fast
