// Fused CPU kernel of the top-k bank's step (docs/method.md §12; issue 26): for each row, the
// evidence p (the mean over views of softmax(z_v / tau_e)), the update of (K, val, rest) to the
// top k of the implied dense update gamma * a~ + p (ties to the smaller class id), the step's
// bound on the distance to a dense bank, and the loss and gradient against the implied target
// (t on K', u elsewhere) without a dense target. The oracle is dps_fast/topk.py::reference_step;
// this kernel follows it step by step, in float32 (the reference's own dtype for float32 input).
//
// Rows are independent: at::parallel_for over rows, with per-thread scratch of 2 C floats (the
// evidence and one view's exponentials) and C bits (the classes of K), reset after each row. A row of one view
// takes three passes over C: max, min, sum and block maxima of the logits; the exponentials (the
// next row's logits fetched into L2 meanwhile); the gradient (streamed out for large steps), with
// the bound's excess term. J comes from the few blocks whose maximum can hold it (LogitPool).
// Measured at [1024, 21,841], k = 32, 2 threads (benchmarks/topk_bench.py, 2026-12-08): the whole
// step 1.29x the dense step's time before these passes, 0.86-1.03x after (docs/performance.md).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "row_kernels.h"
#include "../topk_step_glue.h"

namespace dps_fast {
namespace cpu {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// A candidate of the new top k: its value b and class id. Ordered by b descending, then by
// the smaller id (the tie rule of dps_fast/topk.py::top_by_value).
struct Cand {
  float b;
  int64_t id;
  int64_t slot;  // its position in K, or -1 for a class of J
};
inline bool before(const Cand& x, const Cand& y) { return x.b > y.b || (x.b == y.b && x.id < y.id); }

// The tie rule's ordering key of a slot of K (dps_fast/topk.py::SNAP): its value v, or the level
// outside K when the two differ by rounding only, so that every backend keeps the same K'.
constexpr float kSnap = 1e-5f;
inline float slot_key(float v, float level) { return std::fabs(v - level) <= kSnap * level ? level : v; }

// gamma * x + evidence, for every candidate in one place: the compiler may contract a multiply-add
// into an fma at one site and not at another, and tied candidates must get bit-equal values.
__attribute__((noinline)) float cand_value(float gamma_x, float p, float scale) { return gamma_x + p * scale; }

// One view's softmax statistics: max, sum exp(z - m) (the exponentials left in `ex`), the
// tempered sum, sum z (in double where float overflows); false if a logit is not finite.
struct ViewStats {
  float m, s, se;
  double zsum;
};

// Membership of class j in a bitmap of C bits (the classes of K).
inline bool member(const uint64_t* bits, int64_t j) { return (bits[j >> 6] >> (j & 63)) & 1u; }
inline void mark(uint64_t* bits, int64_t j, bool on) {
  if (on) bits[j >> 6] |= uint64_t{1} << (j & 63);
  else bits[j >> 6] &= ~(uint64_t{1} << (j & 63));
}

// The candidates of J for one view: every class outside K whose logit is at least `floor`, a
// margin below (a floor for) the nJ-th largest logit outside K, read only from the blocks whose
// maximum reaches it (gather). The evidence is a monotone function of the logit up to rounding
// and exp's error, which the margin covers (gather), so the nJ largest p outside K are among
// these classes and J is chosen from them by the exact keys of the evidence (pool_j), without a
// pass over p. Where the pool cannot be trusted (ties that fill it, evidence below 1e-30) or is
// not used (several views, fewer blocks than nJ + k) J comes from that pass (outside_top).
// Kernel at [1024, 21,841], k = 32, 2 threads (2026-12-08, perf): the pass over p and its
// compactions were a quarter of the time.
struct LogitPool {
  std::vector<uint64_t> keys;  // ordered_key(logit, id)
  std::vector<float> block_max;  // max_min_sum's block maxima
  int64_t n = 0, nJ = 0;
  float floor = -std::numeric_limits<float>::infinity(), margin = 0.f;
  bool ok = true;  // false: ties filled the pool; J then comes from the full scan
  void reset(int64_t want) {
    nJ = want, n = 0, ok = true, floor = -std::numeric_limits<float>::infinity();
    if (static_cast<int64_t>(keys.size()) < cap()) keys.resize(cap());
  }
  int64_t cap() const { return 8 * nJ + 16; }
  void compact();
  void gather(const float* x, int64_t C, const float* bm, const uint64_t* in_k, float range, float tau_e);
  void finish() {  // the pool trimmed to the nJ largest and those within the margin of the nJ-th
    if (ok && n > nJ) compact();
  }
};

// A class of a selection as one integer: its value's bits, made to order as the floats do (any
// sign; values are finite here: non-finite rows never get this far), above the complement of its
// id (the smaller id wins a tie), so that the tie rule is one unsigned compare; key_id recovers
// the id (C <= 2^31 - 1). For the logits (LogitPool) and the evidence (J).
inline uint64_t ordered_key(float x, int64_t j) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}
inline float ordered_value(uint64_t key) {
  uint32_t bits = static_cast<uint32_t>(key >> 32);
  bits = (bits & 0x80000000u) ? (bits & 0x7fffffffu) : ~bits;
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}
inline int64_t key_id(uint64_t key) { return 0xffffffffu - static_cast<uint32_t>(key); }

// The margin below the nJ-th largest logit T, per row: what rounding can do to the order of two
// classes' evidence, twice. The exponent's argument fl(fl(z - m) / tau_e) is off by at most
// 2^-23 (m - min z) / tau_e; exp_u20 (exp_nonpos) by at most 20 ulp, 2.4e-6 relative, and the
// scaling by 1 / s by half an ulp; so classes more than 2.4e-7 (m - min z) + 5e-6 tau_e apart in
// logit keep their order wherever the evidence is a normal float (pool_j checks >= 1e-30).
inline float logit_margin(float range, float tau_e) { return 4.8e-7f * range + 1e-5f * tau_e; }

// Keeps the nJ largest logits and every other one within the margin of the nJ-th, and sets the
// floor to the nJ-th less the margin: never lower than before (the nJ-th largest of more classes
// is no smaller, and the margin is the row's).
void LogitPool::compact() {
  uint64_t* k = keys.data();
  std::nth_element(k, k + (nJ - 1), k + n, std::greater<uint64_t>());
  floor = ordered_value(k[nJ - 1]) - margin;
  int64_t kept = nJ;
  for (int64_t i = nJ; i < n; ++i)
    if (ordered_value(k[i]) >= floor) k[kept++] = k[i];
  n = kept;
  if (n > cap() / 2) ok = false, floor = std::numeric_limits<float>::infinity();  // ties: give up
}

// The largest lane of v.
inline float hmax(const Vec& v) {
#if defined(CPU_CAPABILITY_AVX2)
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
#else
  return at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
#endif
}

// Classes per block of the logits pass's block maxima (LogitPool::gather): one word of the bitmap
// of K's classes a block.
constexpr int64_t kBlock = 64;
static_assert(kBlock % kW == 0, "a block is whole vectors");
inline int64_t num_blocks(int64_t C) { return (C + kBlock - 1) / kBlock; }

// The largest x[i], i < n, whose bit in `skip` is clear (-inf if none).
inline float max_outside(const float* x, int64_t n, uint64_t skip) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i)
    if (!((skip >> i) & 1u)) m = std::max(m, x[i]);
  return m;
}

// max, min and sum of x in one pass (a NaN may or may not reach max and min: the exp pass after
// it catches NaNs), and where bm is given the max of each block of kBlock classes outside K in
// bm[0, ceil(n / kBlock)) (block b is word b of the bitmap in_k; -inf for a block all in K).
void max_min_sum(const float* x, int64_t n, float& mx, float& mn, float& sum, float* bm = nullptr,
                 const uint64_t* in_k = nullptr) {
  const float inf = std::numeric_limits<float>::infinity();
  Vec m0(-inf), n0(inf), s0(0.f), s1(0.f);
  int64_t j = 0;
  for (; j + kBlock <= n; j += kBlock) {
    Vec block(-inf);
    for (int64_t i = j; i < j + kBlock; i += 2 * kW) {
      const Vec a = Vec::loadu(x + i), b = Vec::loadu(x + i + kW);
      block = max_nonan(block, max_nonan(a, b)), n0 = min_nonan(n0, min_nonan(a, b));
      s0 = s0 + a, s1 = s1 + b;
    }
    m0 = max_nonan(m0, block);
    if (bm) bm[j / kBlock] = in_k[j / kBlock] ? max_outside(x + j, kBlock, in_k[j / kBlock]) : hmax(block);
  }
  const int64_t tail = j;
  for (; j + 2 * kW <= n; j += 2 * kW) {
    const Vec a = Vec::loadu(x + j), b = Vec::loadu(x + j + kW);
    m0 = max_nonan(m0, max_nonan(a, b)), n0 = min_nonan(n0, min_nonan(a, b));
    s0 = s0 + a, s1 = s1 + b;
  }
  const auto vmax = [](const Vec& a, const Vec& b) { return max_nonan(a, b); };
  const auto vmin = [](const Vec& a, const Vec& b) { return min_nonan(a, b); };
  mx = at::vec::vec_reduce_all<float>(vmax, m0);
  mn = at::vec::vec_reduce_all<float>(vmin, n0);
  sum = at::vec::vec_reduce_all<float>([](const Vec& a, const Vec& b) { return a + b; }, s0 + s1);
  for (; j < n; ++j) mx = std::max(mx, x[j]), mn = std::min(mn, x[j]), sum += x[j];
  if (bm && tail < n) bm[tail / kBlock] = max_outside(x + tail, n - tail, in_k[tail / kBlock]);
}

// A t with at least `need` of the nb values bm[i] >= t, as large as 12 bisections of their range
// find. Precondition: at least `need` values are finite (-inf marks a block all in K, ignored).
// Branch-free vector counts: selecting the need-th largest with std::nth_element mispredicted
// its way to a tenth of the kernel's time at [1024, 21,841] (perf, 2026-12-08).
float block_floor(const float* bm, int64_t nb, int64_t need) {
  float lo = std::numeric_limits<float>::infinity(), hi = -lo;
  for (int64_t i = 0; i < nb; ++i)  // -inf: a block all in K
    if (bm[i] > -std::numeric_limits<float>::infinity()) lo = std::min(lo, bm[i]), hi = std::max(hi, bm[i]);
  for (int it = 0; it < 12 && lo < hi; ++it) {
    const float mid = lo + 0.5f * (hi - lo);
    const Vec vm(mid);
    Vec count(0.f);
    int64_t i = 0;
    for (; i + kW <= nb; i += kW) count = count + Vec::blendv(Vec(0.f), Vec(1.f), Vec::loadu(bm + i) >= vm);
    float total = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, count);
    for (; i < nb; ++i) total += bm[i] >= mid ? 1.f : 0.f;
    if (total >= static_cast<float>(need)) lo = mid;
    else hi = mid;
  }
  return lo;
}

// Bit i set where x[i] >= t, for i < n <= 64 (NaN: not set).
inline uint64_t at_or_above(const float* x, int64_t n, float t) {
  const Vec vt(t);
  uint64_t bits = 0;
  int64_t i = 0;
  for (; i + kW <= n; i += kW)
    bits |= static_cast<uint64_t>(~(Vec::loadu(x + i) >= vt).zero_mask() & ((1 << kW) - 1)) << i;  // zero_mask: lanes 0
  for (; i < n; ++i) bits |= static_cast<uint64_t>(x[i] >= t) << i;
  return bits;
}

// Gathers the pool from the logits x and their block maxima outside K, bm: the nJ-th largest
// block maximum is a floor for the nJ-th largest logit outside K (nJ blocks hold a class outside
// K at least that large), so only blocks whose maximum reaches the floor are read. (Block maxima
// over all classes would need the (nJ + k)-th, as K's classes may lead their blocks: at
// [1024, 10,000], k = 64 that is 128 of 157 blocks, and most classes came into the pool.)
// Precondition: at least nJ + k blocks (row_stats), so that nJ of them hold a class outside K.
void LogitPool::gather(const float* x, int64_t C, const float* bm, const uint64_t* in_k, float range, float tau_e) {
  const int64_t nb = num_blocks(C);
  margin = logit_margin(range, tau_e);
  floor = block_floor(bm, nb, nJ) - margin;
  const auto take = [&](int64_t j) {
    if (x[j] < floor || member(in_k, j)) return;  // the floor may have risen within the block
    keys[n++] = ordered_key(x[j], j);
    if (n == cap()) compact();
  };
  // the blocks and then the classes at or above the floor as bit masks, walked bit by bit: a
  // branch per block and per vector mispredicted (gather was a fifth of view_stats: perf, 2026-12-08)
  for (int64_t b0 = 0; b0 < nb; b0 += 64) {
    for (uint64_t blocks = at_or_above(bm + b0, std::min<int64_t>(64, nb - b0), floor); blocks; blocks &= blocks - 1) {
      const int64_t j0 = (b0 + __builtin_ctzll(blocks)) * kBlock;
      for (uint64_t lanes = at_or_above(x + j0, std::min(kBlock, C - j0), floor); lanes; lanes &= lanes - 1)
        take(j0 + __builtin_ctzll(lanes));
    }
  }
}

// exp_row_from_max(x, out, n, mx, 1) (the same values and sum) that also starts fetching the next
// row's logits `next` (n floats, or nullptr) into L2, a line every other vector: spread over the
// compute-bound pass, the fetch overlaps it, and the next row's first pass reads L2, not DRAM.
float exp_row_prefetching(const float* x, float* out, int64_t n, float mx, const float* next) {
  const Vec neg(-mx);
  return accurate_sum(n, [=](int64_t j, int64_t k) {
    if (next && j % 16 == 0) prefetch_line(reinterpret_cast<const char*>(next + j));
    const Vec e = exp_nonpos(ldf(x + j, k) + neg);
    stf(e, out + j, k);
    return e;
  });
}

bool view_stats(const float* z, int64_t C, float inv_tau_e, bool temper, float* ex, float* tmp, ViewStats& st,
                const float* next, LogitPool* pool = nullptr, const uint64_t* in_k = nullptr) {
  float mn = 0.f, zs = 0.f;
  if (pool) pool->block_max.resize(num_blocks(C));
  max_min_sum(z, C, st.m, mn, zs, pool ? pool->block_max.data() : nullptr, in_k);
  if (!std::isfinite(st.m) || !std::isfinite(mn)) return false;
  st.s = exp_row_prefetching(z, ex, C, st.m, next);  // a NaN logit makes s NaN
  if (!std::isfinite(st.s)) return false;
  st.se = temper ? exp_row_from_max(z, tmp, C, st.m, inv_tau_e) : st.s;
  st.zsum = std::isfinite(zs) ? zs : sum_double(z, C);  // finite logits near FLT_MAX overflow a float sum
  if (pool) {
    pool->gather(z, C, pool->block_max.data(), in_k, st.m - mn, 1.0f / inv_tau_e);
    pool->finish();
  }
  return true;
}

// out[j] = x[j] * w (+ out[j] when `add`).
void scaled(const float* x, float w, float* out, int64_t n, bool add) {
  const Vec vw(w);
  for (int64_t j = 0; j < n; j += kW) {
    const int64_t cnt = std::min(kW, n - j);
    const Vec y = ldf(x + j, cnt) * vw;
    stf(add ? y + ldf(out + j, cnt) : y, out + j, cnt);
  }
}

// The evidence p [C], the mean over views of softmax(z_v / tau_e), as p = scale * buf: for one
// untempered view buf holds view_stats' exponentials and scale = 1 / s (no pass to normalise
// them: the consumers scale the few values they read and fold the scale into their passes);
// else buf holds p itself (one tempered view: view_stats' tempered exponentials, scaled).
// Returns the scale.
float evidence(const TopkArgs& a, int64_t b, const ViewStats* st, float* buf, float* tmp) {
  if (a.V == 1 && !a.temper) return 1.0f / st[0].s;
  if (a.V == 1) {  // tempered: view_stats left exp((z - m) / tau_e) in tmp
    scaled(tmp, 1.0f / st[0].se, buf, a.C, false);
    return 1.0f;
  }
  for (int64_t v = 0; v < a.V; ++v) {
    exp_row_from_max(a.z + (v * a.B + b) * a.C, tmp, a.C, st[v].m, a.temper ? a.inv_tau_e : 1.0f);
    scaled(tmp, 1.0f / (st[v].se * static_cast<float>(a.V)), buf, a.C, v > 0);
  }
  return 1.0f;
}

// The row's state after the update: K' by the tie rule with b' on K', and rest'.
struct NewRow {
  std::vector<Cand> top;  // k entries, in order
  std::vector<uint8_t> kept;  // per slot of K: whether its class stays in K'
  float rest = 0.f;
};

// Ordering for the std algorithms: a lambda, so that they inline it (a function pointer kept
// std::__adjust_heap calling `before` through memory: perf, 2026-12-07).
const auto kBefore = [](const Cand& x, const Cand& y) { return before(x, y); };

// Moves the nJ best of buf[0, n) (by the tie rule) to its front; returns the worst one's p.
inline float keep_best(uint64_t* buf, int64_t n, int64_t nJ) {
  std::nth_element(buf, buf + (nJ - 1), buf + n, std::greater<uint64_t>());
  return ordered_value(buf[nJ - 1]);
}

// J: the nJ largest p outside K (marked in in_k), by the tie rule, as candidates
// gamma * level + scale * p_j (a positive scale keeps the order). Classes above a running
// threshold are collected in `pool`; each time it holds 4 nJ + 8 of them, the best nJ are kept
// and the threshold rises to the worst of those. The filter is strict and one vector compare
// per 8 classes: a later class never wins a tie (its id is larger than every kept one's).
// Kernel alone at [1024, 1000], k = 32, 2 threads (2026-12-07): a heap of nJ with `before` as a
// function pointer and a partial_sort of the 2k candidates, 7.1 ms; this with (p, id) pairs
// compared by `before`, and a full sort of the 2k (below), 4.6 ms; with integer keys (ordered_key)
// instead of the pairs, runs alternated with the pairs: k = 8, 2.5-3.3 -> 1.6-2.5 ms; k = 32,
// 5.1-6.1 -> 3.8-5.0 ms. At [1024, 21,841] the selection is a small part (22 -> 18 ms).
void outside_top(const float* p, float scale, const uint64_t* in_k, int64_t C, int64_t nJ, float base,
                 std::vector<uint64_t>& pool, std::vector<Cand>& out) {
  const int64_t cap = 4 * nJ + 8;
  if (static_cast<int64_t>(pool.size()) < cap) pool.resize(cap);
  uint64_t* buf = pool.data();
  int64_t n = 0;
  float thr = -std::numeric_limits<float>::infinity();
  const auto take = [&](int64_t j) {
    if (member(in_k, j)) return;
    buf[n++] = ordered_key(p[j], j);
    if (n == cap) thr = keep_best(buf, n, nJ), n = nJ;
  };
  int64_t j0 = 0;
  for (; j0 + kW <= C; j0 += kW) {
    int above = ~(Vec::loadu(p + j0) > Vec(thr)).zero_mask() & ((1 << kW) - 1);  // lanes with p > thr
    while (above) {
      const int lane = __builtin_ctz(above);
      above &= above - 1;
      if (p[j0 + lane] > thr) take(j0 + lane);  // thr may have risen within the block
    }
  }
  for (; j0 < C; ++j0)
    if (p[j0] > thr) take(j0);
  keep_best(buf, n, nJ);
  std::sort(buf, buf + nJ, std::greater<uint64_t>());
  for (int64_t i = 0; i < nJ; ++i) out.push_back({cand_value(base, ordered_value(buf[i]), scale), key_id(buf[i]), -1});
}

// J from the logit pool (LogitPool): the pool's classes by the exact keys of their evidence, the
// nJ best kept, as outside_top does. False where the pool cannot be trusted (see LogitPool), or
// where an evidence value among them is below 1e-30, where exp's relative error bound fails.
bool pool_j(const float* p, float scale, const LogitPool& pl, int64_t nJ, float base, std::vector<uint64_t>& buf,
            std::vector<Cand>& out) {
  if (!pl.ok || pl.n < nJ) return false;
  if (static_cast<int64_t>(buf.size()) < pl.n) buf.resize(pl.n);
  for (int64_t i = 0; i < pl.n; ++i) {
    const int64_t j = key_id(pl.keys[i]);
    if (!(p[j] * scale >= 1e-30f)) return false;
    buf[i] = ordered_key(p[j], j);
  }
  keep_best(buf.data(), pl.n, nJ);
  std::sort(buf.begin(), buf.begin() + nJ, std::greater<uint64_t>());
  for (int64_t i = 0; i < nJ; ++i) out.push_back({cand_value(base, ordered_value(buf[i]), scale), key_id(buf[i]), -1});
  return true;
}

// A class of K' whose gradient entry loses d = (t_i - u) * gscale.
struct Fix {
  int64_t j;
  float d;
};

// The bound's excess term in the making: sum_j max(0, base + p_j - level) over all classes,
// summed in the output pass of the first view (view_outputs), which reads p anyway.
struct Excess {
  bool want = false;
  float base = 0.f, level = 0.f;
  double sum = 0.0;
};

// sum_j max(0, base + scale * p[j] - level) over all classes (the output pass sums it where a
// gradient is written: grad_row).
double excess_over(const float* p, float scale, int64_t C, float base, float level) {
  const Vec shift(base - level), vs(scale), zero(0.f);
  return accurate_sum(C, [&](int64_t j, int64_t cnt) {
    return keep_lanes(at::vec::maximum(ldf(p + j, cnt) * vs + shift, zero), cnt);
  });
}

// Per-thread scratch: p, one view's exponentials, the bitmap of K's classes, and the row's work lists.
struct Scratch {
  std::vector<float> p, tmp;  // the evidence is p_scale * p (see evidence)
  std::vector<uint64_t> in_k;  // a bit per class, set for K's (an int per class missed L2: perf)
  std::vector<Cand> cand, order;  // per-row work lists, kept to avoid allocations
  std::vector<uint64_t> pool;
  std::vector<Fix> fix;
  LogitPool logits;  // J's candidates from the logits pass (one view)
  bool use_pool = false;
  float p_scale = 1.f;
  double p_total = 0.0;  // sum_j of the evidence
  std::vector<ViewStats> st;  // per view
  NewRow nr;                  // the row's update
  std::vector<int64_t> new_ids;
  std::vector<float> new_vals, t;  // t: the target on its k classes
  // per-row vectors live here: allocated once, not 6 times a row (perf: vector growth was 4% of a
  // step at [1024, 10,000], k = 64, 2026-12-08)
  Scratch(int64_t C, int64_t V, int64_t k)
      : p(C), tmp(C), in_k((C + 63) / 64, 0), st(V), new_ids(k), new_vals(k), t(k) {
    nr.top.reserve(k), nr.kept.reserve(k), cand.reserve(2 * k), order.reserve(2 * k), fix.reserve(k);
  }
  float ev(int64_t j) const { return p[j] * p_scale; }
};

// Steps 1-4 of docs/method.md §12 for the row (K, val, rest): K' (by the tie rule), b' and rest'.
void update_row(const TopkArgs& a, const int64_t* K, const float* val, float rest, Scratch& sc, NewRow& out) {
  const int64_t k = a.k, C = a.C, nJ = std::min(k, C - k);
  const float level = rest / static_cast<float>(C - k);
  std::vector<Cand>& cand = sc.cand;
  cand.clear();
  for (int64_t i = 0; i < k; ++i)  // ordered by their keys; their values are gamma * val + p
    cand.push_back({cand_value(a.gamma * slot_key(val[i], level), sc.p[K[i]], sc.p_scale), K[i], i});
  if (!sc.use_pool || !pool_j(sc.p.data(), sc.p_scale, sc.logits, nJ, a.gamma * level, sc.pool, cand))
    outside_top(sc.p.data(), sc.p_scale, sc.in_k.data(), C, nJ, a.gamma * level, sc.pool, cand);
  std::vector<Cand>& order = sc.order;
  order.assign(cand.begin(), cand.end());
  std::sort(order.begin(), order.end(), kBefore);  // 2k items: faster than partial_sort (above)
  const auto value = [&](const Cand& c) {  // a slot of K: its value; a class of J: its key is its value
    return c.slot >= 0 ? cand_value(a.gamma * val[c.slot], sc.p[c.id], sc.p_scale) : c.b;
  };
  double p_out = sc.p_total, dropped = 0.0, admitted_p = 0.0;  // p_out: the evidence outside K
  int64_t n_adm = 0;
  out.kept.assign(k, 0);
  out.top.clear();
  for (int64_t i = 0; i < k; ++i) {
    const Cand& c = order[i];
    if (c.slot >= 0) out.kept[c.slot] = 1;
    else n_adm += 1, admitted_p += sc.ev(c.id);
    out.top.push_back({value(c), c.id, c.slot});
  }
  for (int64_t i = 0; i < k; ++i) {
    p_out -= sc.ev(K[i]);
    if (!out.kept[i]) dropped += value(cand[i]);
  }
  out.rest = static_cast<float>(static_cast<double>(a.gamma * level) * static_cast<double>(C - k - n_adm) +
                                (p_out - admitted_p) + dropped);
}

// The bound's delta (dps_fast/topk.py::step_bound): twice the evidence outside K' plus twice
// the excess over the new level of the implied dense update outside K'. `excess` is the sum as if
// every class were outside K and K' (Excess); the 2k classes of K and K' are corrected here.
float bound_delta(const TopkArgs& a, const int64_t* K, const float* val, float rest, const NewRow& nr,
                  const Scratch& sc, double excess) {
  const float level = rest / static_cast<float>(a.C - a.k), new_level = nr.rest / static_cast<float>(a.C - a.k);
  const float base = a.gamma * level;
  double outside = sc.p_total;
  const auto term = [&](float implied) { return static_cast<double>(std::max(0.f, implied - new_level)); };
  for (int64_t i = 0; i < a.k; ++i) {  // classes of K: their implied value is gamma * val + p
    const float pj = sc.ev(K[i]);
    excess += (nr.kept[i] ? 0.0 : term(a.gamma * val[i] + pj)) - term(base + pj);
  }
  for (const Cand& c : nr.top) {  // classes of K': no term at all
    const float pj = sc.ev(c.id);
    outside -= pj;
    if (c.slot < 0) excess -= term(base + pj);
  }
  return static_cast<float>(2.0 * (outside + excess));
}

// Streaming (non-temporal) stores for the gradient once the logits and the gradient exceed a
// last-level cache (32 MiB, as csrc/cpu/dps_cross_entropy.cpp::stream_grad): ordinary stores
// would first read every gradient line from DRAM. Rows are aligned by a short head (any C).
bool stream_grad(const TopkArgs& a) {
#if defined(CPU_CAPABILITY_AVX2)
  return a.grad && a.V * a.B * a.C * 8 > (int64_t{32} << 20);
#else
  return false;
#endif
}

// The gradient row g = (soft / s - u) * gscale, less the fixes. NT: in one pass, the fixes sorted
// by class (fixing streamed lines afterwards would read them back from DRAM), streaming stores
// past the head that aligns g; else the fixes afterwards, unsorted (sorting k of them per row cost
// more than the pass at [1024, 1000], k = 64). Returns sum_j max(0, base + scale * p_j - level)
// where ex.want, else 0.
template <bool NT>
double grad_row(float* g, const float* soft, float inv_s, float u, float gscale, const std::vector<Fix>& fix,
                int64_t C, const float* p, float scale, const Excess& ex) {
  const Vec vs(inv_s), vu(u), vg(gscale), vps(scale), shift(ex.base - ex.level), zero(0.f);
  size_t fi = 0;
  const auto row = [&](int64_t j, int64_t cnt, auto stream) {
    Vec gv = (ldf(soft + j, cnt) * vs - vu) * vg;
    if (NT && fi < fix.size() && fix[fi].j < j + cnt) {  // rare: at most k of C / 8 vectors
      alignas(32) float tmp[kW];
      gv.store(tmp);
      for (; fi < fix.size() && fix[fi].j < j + cnt; ++fi) tmp[fix[fi].j - j] -= fix[fi].d;
      gv = Vec::loadu(tmp);
    }
    store_as<decltype(stream)::value>(gv, g + j, cnt);
    return ex.want ? keep_lanes(at::vec::maximum(ldf(p + j, cnt) * vps + shift, zero), cnt) : zero;
  };
  // streamed: whole 64-byte lines only (a line half streamed, half stored is written twice)
  const int64_t head = NT ? std::min<int64_t>(C, ((64 - reinterpret_cast<uintptr_t>(g) % 64) % 64) / 4) : 0;
  const int64_t body = NT ? (C - head) / 16 * 16 : C;
  const auto plain = [&](int64_t j0, int64_t j1) {  // [j0, j1) with ordinary stores
    Vec acc(0.f);
    for (int64_t j = j0; j < j1; j += kW) acc = acc + row(j, std::min(kW, j1 - j), std::false_type{});
    return static_cast<double>(at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc));
  };
  double excess = plain(0, head);  // in order: the fixes are consumed by class
  excess += accurate_sum(body, [&](int64_t j, int64_t cnt) { return row(head + j, cnt, std::bool_constant<NT>{}); });
  excess += plain(head + body, C);
  if (!NT)
    for (const Fix& f : fix) g[f.j] -= f.d;
  return excess;
}

// Loss and gradient of view v of row b against the target (t on tK, u elsewhere); the first view's
// output pass also sums the bound's excess term into ex.sum.
void view_outputs(const TopkArgs& a, int64_t v, int64_t b, const ViewStats& st, const int64_t* tK, const float* t,
                  float u, Scratch& sc, Excess& ex) {
  const float* z = a.z + (v * a.B + b) * a.C;
  double on_k = 0.0;
  for (int64_t i = 0; i < a.k; ++i) on_k += static_cast<double>(t[i] - u) * (st.m - z[tK[i]]);
  const double loss = std::log(static_cast<double>(st.s)) + on_k +
                      static_cast<double>(u) * (static_cast<double>(a.C) * st.m - st.zsum);
  a.loss[v * a.B + b] = static_cast<float>(loss);
  if (!a.grad) {
    if (v == 0 && ex.want) ex.sum = excess_over(sc.p.data(), sc.p_scale, a.C, ex.base, ex.level);
    return;
  }
  // softmax(z) = exp(z - m) / s: the evidence's exponentials for one untempered view, else
  // recomputed into tmp (free once the evidence is formed)
  const bool raw = a.V == 1 && !a.temper;
  if (!raw) exp_row_from_max(z, sc.tmp.data(), a.C, st.m, 1.0f);
  std::vector<Fix>& fix = sc.fix;
  fix.clear();
  for (int64_t i = 0; i < a.k; ++i) fix.push_back({tK[i], (t[i] - u) * a.gscale});
  const bool stream = stream_grad(a);
  if (stream) std::sort(fix.begin(), fix.end(), [](const Fix& x, const Fix& y) { return x.j < y.j; });
  Excess want = v == 0 ? ex : Excess{};
  float* g = a.grad + (v * a.B + b) * a.C;
  const float* soft = raw ? sc.p.data() : sc.tmp.data();
  const double sum = stream
                         ? grad_row<true>(g, soft, 1.0f / st.s, u, a.gscale, fix, a.C, sc.p.data(), sc.p_scale, want)
                         : grad_row<false>(g, soft, 1.0f / st.s, u, a.gscale, fix, a.C, sc.p.data(), sc.p_scale, want);
  if (v == 0) ex.sum = sum;
}

void nan_row(const TopkArgs& a, int64_t b) {
  for (int64_t v = 0; v < a.V; ++v) {
    a.loss[v * a.B + b] = kNaN;
    if (a.grad) std::fill(a.grad + (v * a.B + b) * a.C, a.grad + (v * a.B + b + 1) * a.C, kNaN);
  }
}

// The target of the row: the state after the update (posterior) or before it (prior).
void targets_and_outputs(const TopkArgs& a, int64_t b, const ViewStats* st, const int64_t* tK, const float* tv,
                         float trest, Scratch& sc, Excess& ex) {
  double mass = trest;
  for (int64_t i = 0; i < a.k; ++i) mass += tv[i];
  std::vector<float>& t = sc.t;
  for (int64_t i = 0; i < a.k; ++i) t[i] = static_cast<float>(tv[i] / mass);
  const float u = static_cast<float>(trest / (static_cast<double>(a.C - a.k) * mass));
  for (int64_t v = 0; v < a.V; ++v) view_outputs(a, v, b, st[v], tK, t.data(), u, sc, ex);
}

// The statistics of every view of row b into sc.st, and the evidence p; false for a row with a
// non-finite logit. `next`: view 0 of the thread's next row's logits (fetched ahead), or nullptr.
bool row_stats(const TopkArgs& a, int64_t b, Scratch& sc, const float* next) {
  // the mean of several views' softmax is no monotone function of one logit; without nJ + k
  // blocks there is no floor, and the pool's compactions cost more than the scan (at C = 1,000,
  // k = 64: 8.2 -> 11.4 ms); requiring 2 or 4 times as many blocks was slower at C = 10,000 and
  // 21,841 (topk_bench, 2026-12-08)
  const int64_t nJ = std::min(a.k, a.C - a.k);
  sc.use_pool = a.V == 1 && num_blocks(a.C) >= nJ + a.k;
  sc.logits.reset(nJ);
  for (int64_t v = 0; v < a.V; ++v) {
    if (!view_stats(a.z + (v * a.B + b) * a.C, a.C, a.inv_tau_e, a.temper, sc.p.data(), sc.tmp.data(), sc.st[v],
                    next == nullptr ? nullptr : next + v * a.B * a.C, sc.use_pool ? &sc.logits : nullptr,
                    sc.in_k.data()))
      return false;
  }
  sc.p_scale = evidence(a, b, sc.st.data(), sc.p.data(), sc.tmp.data());
  const bool raw = a.V == 1 && !a.temper;  // sc.p holds the exponentials, not p
  sc.p_total = raw ? static_cast<double>(sc.st[0].s) * sc.p_scale : row_sum(sc.p.data(), a.C);
  return true;
}

// Row b of the step (see row_stats for `next`).
void step_row(const TopkArgs& a, int64_t b, Scratch& sc, const float* next) {
  const int64_t id = a.idx[b];
  if (id < 0 || id >= a.N) return nan_row(a, b);
  int64_t* K = a.ids + id * a.k;
  float* val = a.vals + id * a.k;
  for (int64_t i = 0; i < a.k; ++i) mark(sc.in_k.data(), K[i], true);
  const bool good = row_stats(a, b, sc, next);
  if (good) {
    NewRow& nr = sc.nr;
    update_row(a, K, val, a.rest[id], sc, nr);
    for (int64_t i = 0; i < a.k; ++i) sc.new_ids[i] = nr.top[i].id, sc.new_vals[i] = nr.top[i].b;
    Excess ex;  // the bound's excess term, summed in the output pass (bound_delta)
    if (a.update && a.bound) ex = Excess{true, a.gamma * (a.rest[id] / static_cast<float>(a.C - a.k)),
                                         nr.rest / static_cast<float>(a.C - a.k)};
    if (a.posterior) targets_and_outputs(a, b, sc.st.data(), sc.new_ids.data(), sc.new_vals.data(), nr.rest, sc, ex);
    else targets_and_outputs(a, b, sc.st.data(), K, val, a.rest[id], sc, ex);
    if (a.update && a.bound) a.bound[id] = a.gamma * a.bound[id] + bound_delta(a, K, val, a.rest[id], nr, sc, ex.sum);
  }
  for (int64_t i = 0; i < a.k; ++i) mark(sc.in_k.data(), K[i], false);
  if (!good) return nan_row(a, b);
  if (!a.update) return;
  std::copy(sc.new_ids.begin(), sc.new_ids.end(), K);
  std::copy(sc.new_vals.begin(), sc.new_vals.end(), val);
  a.rest[id] = sc.nr.rest;
}

// Bank rows are random: each thread starts fetching the bank row of the sample kPrefetchRows
// ahead (ids, values, rest, bound), as csrc/cpu/dps_cross_entropy.cpp does for dense rows. The
// first read of a row's ids was a tenth of the row's own work at [1024, 10,000], k = 64 (perf,
// 2026-12-08).
constexpr int64_t kPrefetchRows = 2;
void prefetch_bank_row(const TopkArgs& a, int64_t id) {
  if (id < 0 || id >= a.N) return;
  prefetch_span(reinterpret_cast<const char*>(a.ids + id * a.k), a.k * static_cast<int64_t>(sizeof(int64_t)));
  prefetch_span(reinterpret_cast<const char*>(a.vals + id * a.k), a.k * static_cast<int64_t>(sizeof(float)));
  prefetch_line(reinterpret_cast<const char*>(a.rest + id));
  if (a.bound) prefetch_line(reinterpret_cast<const char*>(a.bound + id));
}

// The step on float32 logits [V, B, C] and a top-k bank (ids int64, vals / rest / bound float32,
// updated in place when `update`); ids outside [0, N) and rows with a non-finite logit are
// skipped (NaN loss and gradient). Returns the loss [V, B] (reduction 0), or its mean / sum.
at::Tensor topk_step_cpu(const at::Tensor& z, const at::Tensor& index, at::Tensor& ids, at::Tensor& vals,
                         at::Tensor& rest, at::Tensor& bound, at::Tensor& grad, double gamma, double tau_e,
                         bool posterior, bool update, int64_t reduction) {
  check_topk_args(z, index, ids, vals, rest, bound, grad);
  const int64_t V = z.size(0), B = z.size(1), C = z.size(2);
  at::Tensor per_row = at::empty({V, B}, z.options());
  const TopkArgs a = topk_args(z, index, ids, vals, rest, bound, grad, per_row, nullptr, gamma, tau_e, posterior, update,
                               reduction);
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    Scratch sc(C, V, a.k);
    for (int64_t b = b0; b < b1; ++b) {
      if (b + kPrefetchRows < b1) prefetch_bank_row(a, a.idx[b + kPrefetchRows]);
      step_row(a, b, sc, b + 1 < b1 ? a.z + (b + 1) * C : nullptr);
    }
    if (stream_grad(a)) stream_fence();
  });
  return finish_topk_step(per_row, update, ids, vals, rest, bound, reduction);
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY_FRAGMENT(dps_fast, m) {
  // The top-k bank's step (docs/method.md §12): the reference is dps_fast/topk.py::reference_step;
  // the CUDA kernel is csrc/cuda/topk_step.cu, the Triton one dps_fast/kernels/topk_step.py.
  // Eager only (no fake kernel: the compiled path takes the reference).
  m.def("topk_step(Tensor logits, Tensor index, Tensor(a!) ids, Tensor(b!) vals, Tensor(c!) rest, "
        "Tensor(d!) bound, Tensor(e!) grad, float gamma, float tau_e, bool posterior, bool update, "
        "int reduction) -> Tensor");
}

TORCH_LIBRARY_IMPL(dps_fast, CPU, m) { m.impl("topk_step", &dps_fast::cpu::topk_step_cpu); }
