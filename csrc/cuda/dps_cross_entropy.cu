// CUDA kernels: the fused DPS step (docs/method.md §2) and soft-target cross-entropy (docs/method.md §3).
//
// A group of TPR threads owns one sample row (TPR = 8 / 32 / 256 by C); a block of
// 256 threads packs 256 / TPR rows, so small C is not launch-bound and large C is
// spread over a whole block. Two kernels, float32 arithmetic:
// - resident (C <= 16 TPR, up to 2 views: C <= 4096): each thread keeps its columns of every
//   view's logits and their exponentials in registers, four consecutive ones a group (one
//   128-bit access at fp32 where the launch is aligned); the logits and the bank row are read
//   once, the softmax is reused for the gradient, per-row reciprocals replace the divides;
// - streaming (larger C or more views), three passes over the columns:
//   1. per view, online max and softmax normalisers (and a per-element finiteness check);
//   2. the target's row sum S from the bank row alone (gamma * sum_j a_j + 1 for the updated
//      row: the evidence sums to 1), no logits read;
//   3. the bank store, the target, the loss dot products and the gradient.
// mean / sum reductions finish in the same launch: every block writes a partial,
// the last block (atomic ticket) adds them in block order and resets the ticket.
// Offsets are int64. Rows with an out-of-range id or non-finite logits never write
// the bank; their loss and gradient are NaN. The loss is mass * logsumexp - <t, z> and the
// gradient mass * softmax - t, with mass = 1 for a normalised target (the DPS step) and
// mass = sum_j t_j for a soft target taken as it is (docs/method.md §3).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "dps_cross_entropy.h"

namespace dps_fast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxViews = kCeRegisterViews;
// Loops over the views are unrolled to VMAX (1, the common case, 2, 4 or kMaxViews) with a
// uniform guard, so the per-view statistics (m, s, se, dot) are indexed by constants and
// stay in registers (a runtime index put them in local memory: ptxas -v showed spills).
// More views take ce_kernel_many_views, which keeps them in global scratch.
#define DPS_FOR_VIEWS(v) _Pragma("unroll") for (int v = 0; v < VMAX; ++v) if (v < p.V)

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

// Reductions over the TPR threads of a row group (all threads of the block call them).
template <int TPR>
__device__ __forceinline__ float group_sum(float v, float* smem) {
  if constexpr (TPR <= 32) {
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, TPR);
    return v;
  } else {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    float r = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) r += smem[w];
    return r;
  }
}

template <int TPR>
__device__ __forceinline__ float group_max(float v, float* smem) {
  if constexpr (TPR <= 32) {
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, TPR));
    return v;
  } else {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    float r = -INFINITY;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) r = fmaxf(r, smem[w]);
    return r;
  }
}

// One view's softmax statistics over a row: max, sum exp(z - max), sum exp((z - max) / tau_e),
// and whether every logit is finite, tested element by element (a running sum of the logits
// overflows for finite |z| near the float32 maximum, docs/method.md §9). All threads call it.
struct ViewStats {
  float m, s, se;
  bool finite;
};

template <typename TZ, int TPR>
__device__ __forceinline__ ViewStats view_stats(const TZ* zr, int64_t C, bool in_batch, int lane, const CeArgs& p,
                                                float* smem) {
  float mt = -INFINITY, st = 0.f, set = 0.f, n_bad = 0.f;
  for (int64_t j = lane; j < C && in_batch; j += TPR) {
    const float x = to_f32(zr[j]);
    n_bad += isfinite(x) ? 0.f : 1.f;
    if (x > mt) {
      const float sc = (mt == -INFINITY) ? 0.f : __expf(mt - x);
      st = st * sc + 1.f;
      if (p.temper) set = set * ((mt == -INFINITY) ? 0.f : __expf((mt - x) * p.inv_tau_e)) + 1.f;
      mt = x;
    } else {
      st += __expf(x - mt);
      if (p.temper) set += __expf((x - mt) * p.inv_tau_e);
    }
  }
  ViewStats r;
  r.m = group_max<TPR>(mt, smem);
  const float Ms = (r.m == -INFINITY) ? 0.f : r.m;
  const float k = (mt == -INFINITY) ? 0.f : __expf(mt - Ms);
  const float ke = (mt == -INFINITY) ? 0.f : __expf((mt - Ms) * p.inv_tau_e);
  r.s = group_sum<TPR>(st * k, smem);
  r.se = p.temper ? group_sum<TPR>(set * ke, smem) : r.s;
  r.finite = group_sum<TPR>(n_bad, smem) == 0.f && isfinite(r.s);
  return r;
}

// Pass 2: the target's row sum S from the bank row alone: the evidence, a mean of softmaxes,
// sums to 1, so the updated row sums to gamma * sum_j a_j + 1 (docs/method.md §2), with no
// re-read of the logits and no exp. All threads call it.
template <int TPR, typename TA>
__device__ __forceinline__ float target_row_sum(const TA* ar, int64_t C, int lane, bool ok, const CeArgs& p,
                                                float* smem) {
  float st = 0.f;
  for (int64_t j = lane; j < C && ok; j += TPR) st += to_f32(ar[j]);
  const float sum = group_sum<TPR>(st, smem);
  return p.posterior ? p.gamma * sum + 1.f : sum;
}

// The target is a / S of mass 1 (normalize: the DPS step, always) or a itself, of mass S
// (soft-target CE, docs/method.md §3). One register, ks, holds 1 / S or S: a separate mass
// and 1 / S made the one-view kernels spill.
__device__ __forceinline__ float target_scale(const CeArgs& p, float S) { return p.normalize ? 1.f / S : S; }
__device__ __forceinline__ float inv_of(const CeArgs& p, float ks) { return p.normalize ? ks : 1.f; }
__device__ __forceinline__ float mass_of(const CeArgs& p, float ks) { return p.normalize ? 1.f : ks; }

// Pass 3, one column: the target a_j / S (or a_j), storing the updated bank entry when `store`.
template <typename TA, typename Evidence>
__device__ __forceinline__ float target_at(TA* ar, int64_t j, const CeArgs& p, Evidence evidence, float ks,
                                           bool store) {
  float aj = to_f32(ar[j]);
  if (p.posterior || store) {
    const float an = p.gamma * aj + evidence(j);
    if (store) ar[j] = from_f32<TA>(an);
    if (p.posterior) aj = an;
  }
  return aj * inv_of(p, ks);
}

// The shared memory of a block of the ce kernels.
struct CeShared {
  float smem[kThreads / 32];
  float part_rows[kThreads];
  bool is_last;
};

// One thread's place: its lane in its row group, its sample row, the row's bank id, whether
// the row is in the batch, and ok: its id is in range (and, after pass 1, its logits finite).
template <typename TZ, typename TA, int TPR>
struct RowCtx {
  using Z = TZ;
  int lane;
  int64_t row;
  bool in_batch;
  int64_t id;
  bool ok;
  const TZ* z;
  TZ* g;
  TA* a;
  __device__ __forceinline__ explicit RowCtx(const CeArgs& p)
      : lane(threadIdx.x % TPR),
        row(static_cast<int64_t>(blockIdx.x) * (kThreads / TPR) + threadIdx.x / TPR),
        in_batch(row < p.B),
        id(!in_batch ? 0 : (p.idx ? p.idx[row] : row)),
        ok(in_batch && id >= 0 && id < p.N),
        z(static_cast<const TZ*>(p.z)),
        g(static_cast<TZ*>(p.g)),
        a(static_cast<TA*>(p.a)) {}
  // view v's logits row (row 0 for a thread past the batch, which reads none of it)
  __device__ __forceinline__ const TZ* zrow(const CeArgs& p, int v) const {
    return z + (v * p.B + (in_batch ? row : 0)) * p.C;
  }
  // view v's gradient row (as zrow)
  __device__ __forceinline__ TZ* grad_row(const CeArgs& p, int v) const {
    return g + (v * p.B + (in_batch ? row : 0)) * p.C;
  }
  __device__ __forceinline__ TA* bank_row(const CeArgs& p) const { return a + (ok ? id : 0) * p.stride_a; }
};

// Pass 3, column j of view v, given hm = m/2 (half the row max, exact): the half gap
// sum_j t_j (m/2 - z_j/2) >= 0, where m/2 - z/2 cannot overflow for finite z, so the loss overflows
// only where the exact loss does (docs/method.md §9); and the gradient (mass * softmax - t).
// Passing m/2 alone (hm + hm == m exactly) keeps one value per view live: passing m, the
// many-views kernel spilled 16 bytes on sm_90 (ptxas -v).
template <typename Row>
__device__ __forceinline__ void view_column(const Row& r, const CeArgs& p, int v, int64_t j, float t, float hm,
                                            float s, float ks, float& half_gap) {
  const int64_t off = (v * p.B + r.row) * p.C + j;
  const float x = to_f32(r.z[off]);
  half_gap += t * (hm - 0.5f * x);
  if (p.has_grad)
    r.g[off] = from_f32<typename Row::Z>(r.ok ? (mass_of(p, ks) * (__expf(x - (hm + hm)) / s) - t) * p.gscale : NAN);
}

// View v's loss mass * logsumexp - <t, z> = mass * log(s) + 2 * half gap (see view_column), from the
// row group's sums. All threads call it.
template <int TPR, typename Row>
__device__ __forceinline__ void view_loss(const Row& r, const CeArgs& p, int v, float s, float ks,
                                          float dot, float& row_total, float* smem) {
  const float d = group_sum<TPR>(dot, smem);
  const float l = r.ok ? mass_of(p, ks) * logf(s) + 2.f * d : NAN;
  if (r.in_batch && r.lane == 0) {
    if (p.reduce == 0) p.loss[v * p.B + r.row] = l;
    row_total += l;
  }
}

// mean / sum: the block's partial, then the last block (atomic ticket) adds the partials in
// block order and resets the ticket. All threads call it.
template <int TPR, typename Row>
__device__ __forceinline__ void finish_reduction(const Row& r, const CeArgs& p, float row_total, CeShared& sh) {
  sh.part_rows[threadIdx.x] = (r.in_batch && r.lane == 0) ? row_total : 0.f;
  __syncthreads();
  if (threadIdx.x == 0) {
    float acc = 0.f;
    for (int i = 0; i < kThreads; i += TPR) acc += sh.part_rows[i];
    p.part[blockIdx.x] = acc;
    __threadfence();
    const int ticket = atomicAdd(p.ticket, 1);
    sh.is_last = ticket == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!sh.is_last) return;
  __threadfence();
  float acc = 0.f;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += kThreads) acc += static_cast<volatile float*>(p.part)[b];
  acc = group_sum<kThreads>(acc, sh.smem);
  if (threadIdx.x == 0) {
    *p.loss = acc * p.out_scale;
    atomicExch(p.ticket, 0);
  }
}

// ---- resident rows: one read of the logits and the bank row
// Each thread owns EPT columns of the row, in groups of four consecutive ones: group g starts at
// column 4 (lane + g TPR), so a warp's access covers 32 x 4 consecutive elements. Where the row
// allows it (C a multiple of 4, every pointer aligned to 4 elements: `wide`), a group moves as
// one access (128 bits at fp32, 64 at 16 bits); else, and in the row's last partial group,
// element by element. Every loop over the columns is unrolled, so the registers holding them
// (x: the logits, e: exp(x - m)) are indexed by constants.
template <typename T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

template <typename T>
__device__ __forceinline__ bool quad_aligned(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % sizeof(Quad<T>) == 0;
}

// Four elements of `row` from column j0 as float (`fill` past C).
template <typename T>
__device__ __forceinline__ void load4(const T* row, int64_t j0, int64_t C, bool wide, float fill, float* out) {
  if (wide && j0 + 4 <= C) {
    const Quad<T> q = *reinterpret_cast<const Quad<T>*>(row + j0);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = to_f32(q.v[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = j0 + i < C ? to_f32(row[j0 + i]) : fill;
  }
}

// Stores four floats to `row` from column j0 (none past C).
template <typename T>
__device__ __forceinline__ void store4(T* row, int64_t j0, int64_t C, bool wide, const float* x) {
  if (wide && j0 + 4 <= C) {
    Quad<T> q;
#pragma unroll
    for (int i = 0; i < 4; ++i) q.v[i] = from_f32<T>(x[i]);
    *reinterpret_cast<Quad<T>*>(row + j0) = q;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (j0 + i < C) row[j0 + i] = from_f32<T>(x[i]);
  }
}

template <typename TZ, int TPR, int EPT, int VMAX>
struct ResidentRow {
  static constexpr int kGroups = EPT / 4;
  float x[VMAX][EPT], e[VMAX][EPT];
  float m[VMAX], s[VMAX], se[VMAX];

  // the first column of this thread's group g
  static __device__ __forceinline__ int64_t col(int lane, int g) { return 4 * (lane + static_cast<int64_t>(g) * TPR); }

  // the logits, once; per view the max, sum exp(x - m) and its tempered twin; false when a
  // logit is not finite. All threads call it.
  template <typename Row>
  __device__ __forceinline__ bool load(const Row& r, const CeArgs& p, bool wide, float* smem) {
    float n_bad = 0.f;
    DPS_FOR_VIEWS(v) {
      const TZ* zr = r.zrow(p, v);
      float mt = -INFINITY;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        const int64_t j0 = col(r.lane, g);
        load4(zr, j0, r.in_batch ? p.C : 0, wide, -INFINITY, &x[v][4 * g]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          n_bad += (r.in_batch && j0 + i < p.C && !isfinite(x[v][4 * g + i])) ? 1.f : 0.f;
          mt = fmaxf(mt, x[v][4 * g + i]);
        }
      }
      const float mv = group_max<TPR>(mt, smem);
      m[v] = isfinite(mv) ? mv : 0.f;  // a refused row's arithmetic stays quiet
    }
    DPS_FOR_VIEWS(v) {
      float st = 0.f, set = 0.f;
#pragma unroll
      for (int k = 0; k < EPT; ++k) {
        e[v][k] = __expf(x[v][k] - m[v]);
        st += e[v][k];
        if (p.temper) set += __expf((x[v][k] - m[v]) * p.inv_tau_e);
      }
      s[v] = group_sum<TPR>(st, smem);
      se[v] = p.temper ? group_sum<TPR>(set, smem) : s[v];
    }
    return group_sum<TPR>(n_bad, smem) == 0.f;
  }

  // column k's evidence: the mean over views of softmax(x / tau_e); inv_se[v] = 1 / (V se[v])
  __device__ __forceinline__ float evidence(const CeArgs& p, int k, const float (&inv_se)[VMAX]) const {
    float ev = 0.f;
    DPS_FOR_VIEWS(v) ev += (p.temper ? __expf((x[v][k] - m[v]) * p.inv_tau_e) : e[v][k]) * inv_se[v];
    return ev;
  }
};

// Whether every row of this launch may move in 4-wide accesses (see ResidentRow).
template <typename TZ, typename TA>
__device__ __forceinline__ bool rows_are_wide(const CeArgs& p) {
  return p.C % 4 == 0 && p.stride_a % 4 == 0 && quad_aligned<TZ>(p.z) && quad_aligned<TZ>(p.g) &&
         quad_aligned<TA>(p.a);
}

template <typename TZ, typename TA, int TPR, int EPT, int VMAX>
__global__ void __launch_bounds__(kThreads) ce_kernel_resident(CeArgs p) {
  __shared__ CeShared sh;
  RowCtx<TZ, TA, TPR> r(p);
  using Z = ResidentRow<TZ, TPR, EPT, VMAX>;
  Z z;
  const bool wide = rows_are_wide<TZ, TA>(p);
  r.ok = z.load(r, p, wide, sh.smem) && r.ok;

  // the bank row, once: updated, stored, and summed for S (the updated row's own sum)
  float inv_se[VMAX];
  DPS_FOR_VIEWS(v) inv_se[v] = 1.f / (static_cast<float>(p.V) * z.se[v]);
  TA* ar = r.bank_row(p);
  const int64_t c_ok = r.ok ? p.C : 0;  // a refused row reads and writes no bank column
  float a[EPT], a_sum = 0.f;
#pragma unroll
  for (int g = 0; g < Z::kGroups; ++g) {
    const int64_t j0 = Z::col(r.lane, g);
    load4(ar, j0, c_ok, wide, 0.f, &a[4 * g]);
    if (p.posterior || p.update) {
      float an[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) an[i] = j0 + i < c_ok ? p.gamma * a[4 * g + i] + z.evidence(p, 4 * g + i, inv_se) : 0.f;
      if (p.update) store4(ar, j0, c_ok, wide, an);
      if (p.posterior)
#pragma unroll
        for (int i = 0; i < 4; ++i) a[4 * g + i] = an[i];
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) a_sum += a[4 * g + i];
  }
  const float ks = target_scale(p, group_sum<TPR>(a_sum, sh.smem));

  float dot[VMAX], inv_s[VMAX];
  DPS_FOR_VIEWS(v) {
    dot[v] = 0.f;
    inv_s[v] = mass_of(p, ks) / z.s[v];
  }
  const int64_t c_row = r.in_batch ? p.C : 0;
#pragma unroll
  for (int g = 0; g < Z::kGroups; ++g) {
    const int64_t j0 = Z::col(r.lane, g);
    float t[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) t[i] = r.ok && j0 + i < c_row ? a[4 * g + i] * inv_of(p, ks) : 0.f;
    DPS_FOR_VIEWS(v) {
      float gv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int k = 4 * g + i;
        if (j0 + i < c_row) dot[v] += t[i] * (0.5f * z.m[v] - 0.5f * z.x[v][k]);  // the half gap (view_column)
        gv[i] = r.ok ? (z.e[v][k] * inv_s[v] - t[i]) * p.gscale : NAN;
      }
      if (p.has_grad) store4(r.grad_row(p, v), j0, c_row, wide, gv);
    }
  }
  float row_total = 0.f;
  DPS_FOR_VIEWS(v) view_loss<TPR>(r, p, v, z.s[v], ks, dot[v], row_total, sh.smem);
  if (p.reduce != 0) finish_reduction<TPR>(r, p, row_total, sh);
}

// ---- streaming rows: three passes
// Up to VMAX (1, 2, 4 or kMaxViews) views: the per-view statistics stay in registers.
template <typename TZ, typename TA, int TPR, int VMAX>
__global__ void __launch_bounds__(kThreads) ce_kernel(CeArgs p) {
  __shared__ CeShared sh;
  RowCtx<TZ, TA, TPR> r(p);

  // 1. per view: max, sum exp(z - max), sum exp((z - max) / tau_e), finiteness
  float m[VMAX], s[VMAX], se[VMAX];
  DPS_FOR_VIEWS(v) {
    const ViewStats st = view_stats<TZ, TPR>(r.zrow(p, v), p.C, r.in_batch, r.lane, p, sh.smem);
    m[v] = st.m;
    s[v] = st.s;
    se[v] = st.se;
    r.ok = r.ok && st.finite;
  }
  const float inv_v = 1.f / static_cast<float>(p.V);
  TA* ar = r.bank_row(p);
  auto evidence = [&](int64_t j) {
    float e = 0.f;
    DPS_FOR_VIEWS(v) e += __expf((to_f32(r.zrow(p, v)[j]) - m[v]) * p.inv_tau_e) / se[v];
    return e * inv_v;
  };

  // 2. the target's row sum S
  const float ks = target_scale(p, target_row_sum<TPR>(ar, p.C, r.lane, r.ok, p, sh.smem));

  // 3. bank store, target, dots, gradient
  float dot[VMAX];
  DPS_FOR_VIEWS(v) dot[v] = 0.f;
  for (int64_t j = r.lane; j < p.C && r.in_batch; j += TPR) {
    const float t = r.ok ? target_at(ar, j, p, evidence, ks, p.update) : 0.f;
    DPS_FOR_VIEWS(v) view_column(r, p, v, j, t, 0.5f * m[v], s[v], ks, dot[v]);
  }
  float row_total = 0.f;
  DPS_FOR_VIEWS(v) view_loss<TPR>(r, p, v, s[v], ks, dot[v], row_total, sh.smem);
  if (p.reduce != 0) finish_reduction<TPR>(r, p, row_total, sh);
}

// More than kMaxViews views: the per-view statistics go to global scratch (p.view_stats,
// [3][V][B]: max, sum, tempered sum), and pass 3 runs once per chunk of kMaxViews views,
// recomputing the target; the bank row is stored in the last chunk only, so that every chunk
// reads the row as it was before the step.
template <typename TZ, typename TA, int TPR>
__global__ void __launch_bounds__(kThreads) ce_kernel_many_views(CeArgs p) {
  __shared__ CeShared sh;
  RowCtx<TZ, TA, TPR> r(p);
  constexpr int VC = kMaxViews;
  const int64_t B = p.B;
  float* const vm = p.view_stats;
  float* const vs = vm + p.V * B;
  float* const vse = vs + p.V * B;

  for (int v = 0; v < p.V; ++v) {
    const ViewStats st = view_stats<TZ, TPR>(r.zrow(p, v), p.C, r.in_batch, r.lane, p, sh.smem);
    if (r.in_batch && r.lane == 0) {
      vm[v * B + r.row] = st.m;
      vs[v * B + r.row] = st.s;
      vse[v * B + r.row] = st.se;
    }
    r.ok = r.ok && st.finite;
  }
  __syncthreads();  // each row's statistics, written by its lane 0, are read by all its lanes
  const float inv_v = 1.f / static_cast<float>(p.V);
  TA* ar = r.bank_row(p);
  auto evidence = [&](int64_t j) {
    float e = 0.f;
    for (int v = 0; v < p.V; ++v)
      e += __expf((to_f32(r.zrow(p, v)[j]) - vm[v * B + r.row]) * p.inv_tau_e) / vse[v * B + r.row];
    return e * inv_v;
  };
  const float ks = target_scale(p, target_row_sum<TPR>(ar, p.C, r.lane, r.ok, p, sh.smem));

  float row_total = 0.f;
  for (int v0 = 0; v0 < p.V; v0 += VC) {
    const bool store = p.update && v0 + VC >= p.V;
    float hm[VC], s[VC], dot[VC];  // hm: half the row max (see view_column)
#pragma unroll
    for (int k = 0; k < VC; ++k) {
      const bool here = r.in_batch && v0 + k < p.V;
      hm[k] = here ? 0.5f * vm[(v0 + k) * B + r.row] : 0.f;
      s[k] = here ? vs[(v0 + k) * B + r.row] : 1.f;
      dot[k] = 0.f;
    }
    for (int64_t j = r.lane; j < p.C && r.in_batch; j += TPR) {
      const float t = r.ok ? target_at(ar, j, p, evidence, ks, store) : 0.f;
#pragma unroll
      for (int k = 0; k < VC && v0 + k < p.V; ++k) view_column(r, p, v0 + k, j, t, hm[k], s[k], ks, dot[k]);
    }
#pragma unroll
    for (int k = 0; k < VC && v0 + k < p.V; ++k)
      view_loss<TPR>(r, p, v0 + k, s[k], ks, dot[k], row_total, sh.smem);
  }
  if (p.reduce != 0) finish_reduction<TPR>(r, p, row_total, sh);
}

// Columns a thread keeps in registers on the resident path: 4, or 16 (x, e over 2 views and a:
// 80 floats; ptxas -v, sm_90: 39-127 registers, no spills, 2026-12-08). TPR grows with C so
// that C <= 16 TPR.
constexpr int kResidentEpt = 16;
int resident_tpr(int64_t C) { return C <= 64 ? 8 : (C <= 512 ? 32 : kThreads); }
bool resident(const CeArgs& p) { return p.V <= 2 && p.C <= static_cast<int64_t>(resident_tpr(p.C)) * kResidentEpt; }
// Threads a row: the resident kernel's, else the streaming kernels' (as before the resident one).
int tpr_for(const CeArgs& p) {
  if (resident(p)) return resident_tpr(p.C);
  return p.C <= 64 ? 8 : (p.C <= 2048 ? 32 : kThreads);
}

template <typename TZ, typename TA, int TPR>
void launch_resident_tpr(const CeArgs& p, int64_t blocks, cudaStream_t stream) {
  const bool few = p.C <= 4 * TPR;
  if (p.V == 1 && few) ce_kernel_resident<TZ, TA, TPR, 4, 1><<<blocks, kThreads, 0, stream>>>(p);
  else if (p.V == 1) ce_kernel_resident<TZ, TA, TPR, kResidentEpt, 1><<<blocks, kThreads, 0, stream>>>(p);
  else if (few) ce_kernel_resident<TZ, TA, TPR, 4, 2><<<blocks, kThreads, 0, stream>>>(p);
  else ce_kernel_resident<TZ, TA, TPR, kResidentEpt, 2><<<blocks, kThreads, 0, stream>>>(p);
}

template <typename TZ, typename TA>
void launch_resident(const CeArgs& p, int64_t blocks, cudaStream_t stream) {
  const int tpr = tpr_for(p);
  if (tpr == 8) launch_resident_tpr<TZ, TA, 8>(p, blocks, stream);
  else if (tpr == 32) launch_resident_tpr<TZ, TA, 32>(p, blocks, stream);
  else launch_resident_tpr<TZ, TA, kThreads>(p, blocks, stream);
}

template <typename TZ, typename TA, int VMAX>
void launch_views(const CeArgs& p, int64_t blocks, cudaStream_t stream) {
  const int tpr = tpr_for(p);
  if (tpr == 8) ce_kernel<TZ, TA, 8, VMAX><<<blocks, kThreads, 0, stream>>>(p);
  else if (tpr == 32) ce_kernel<TZ, TA, 32, VMAX><<<blocks, kThreads, 0, stream>>>(p);
  else ce_kernel<TZ, TA, kThreads, VMAX><<<blocks, kThreads, 0, stream>>>(p);
}

template <typename TZ, typename TA>
void launch_many_views(const CeArgs& p, int64_t blocks, cudaStream_t stream) {
  const int tpr = tpr_for(p);
  if (tpr == 8) ce_kernel_many_views<TZ, TA, 8><<<blocks, kThreads, 0, stream>>>(p);
  else if (tpr == 32) ce_kernel_many_views<TZ, TA, 32><<<blocks, kThreads, 0, stream>>>(p);
  else ce_kernel_many_views<TZ, TA, kThreads><<<blocks, kThreads, 0, stream>>>(p);
}

template <typename TZ, typename TA>
cudaError_t launch_typed(const CeArgs& p, cudaStream_t stream) {
  const int64_t blocks = ce_num_blocks(p);
  if (blocks == 0) return cudaSuccess;
  // VMAX sized to V: two views (the usual augmented pair) on the 8-view instantiation carried
  // 8-entry statistics arrays and their guards for nothing.
  if (resident(p)) launch_resident<TZ, TA>(p, blocks, stream);
  else if (p.V == 1) launch_views<TZ, TA, 1>(p, blocks, stream);
  else if (p.V == 2) launch_views<TZ, TA, 2>(p, blocks, stream);
  else if (p.V <= 4) launch_views<TZ, TA, 4>(p, blocks, stream);
  else if (p.V <= kMaxViews) launch_views<TZ, TA, kMaxViews>(p, blocks, stream);
  else launch_many_views<TZ, TA>(p, blocks, stream);
  return cudaGetLastError();
}

template <typename TZ>
cudaError_t launch_bank(const CeArgs& p, cudaStream_t stream) {
  switch (p.a_dtype) {
    case kF32: return launch_typed<TZ, float>(p, stream);
    case kBF16: return launch_typed<TZ, __nv_bfloat16>(p, stream);
    case kF16: return launch_typed<TZ, __half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int64_t ce_num_blocks(const CeArgs& p) {
  const int64_t rows_per_block = kThreads / tpr_for(p);
  return (p.B + rows_per_block - 1) / rows_per_block;
}

cudaError_t launch_ce(const CeArgs& p, cudaStream_t stream) {
  if (p.V < 1 || (p.V > kMaxViews && p.view_stats == nullptr)) return cudaErrorInvalidValue;
  switch (p.z_dtype) {
    case kF32: return launch_bank<float>(p, stream);
    case kBF16: return launch_bank<__nv_bfloat16>(p, stream);
    case kF16: return launch_bank<__half>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace dps_fast
