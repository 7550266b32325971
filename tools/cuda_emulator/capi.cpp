// C entry points of the emulated CUDA kernels, for ctypes (tests/_cuda_emu.py mirrors the torch
// glue of csrc/cuda/*_glue.cpp on top of them).
#include "attach_grad.h"
#include "dps_cross_entropy.h"
#include "supcon.h"
#include "topk_step.h"

using namespace dps_fast::cuda;

extern "C" {

int64_t emu_ce_num_blocks(int64_t B, int64_t C, int V) {
  CeArgs p{};
  p.B = B;
  p.C = C;
  p.V = V;
  return ce_num_blocks(p);
}

int emu_ce_register_views() { return kCeRegisterViews; }

int emu_launch_ce(const void* z, const int64_t* idx, void* a, void* g, float* loss, float* part, int* ticket,
                  float* view_stats, int64_t B, int64_t C, int64_t N, int64_t stride_a, int V, float gamma,
                  float inv_tau_e, float gscale, float out_scale, int z_dtype, int a_dtype, int posterior,
                  int update, int temper, int has_grad, int normalize, int reduce) {
  CeArgs p{};
  p.z = z; p.idx = idx; p.a = a; p.g = g; p.loss = loss; p.part = part; p.ticket = ticket;
  p.view_stats = view_stats;
  p.B = B; p.C = C; p.N = N; p.stride_a = stride_a; p.V = V;
  p.gamma = gamma; p.inv_tau_e = inv_tau_e; p.gscale = gscale; p.out_scale = out_scale;
  p.z_dtype = z_dtype; p.a_dtype = a_dtype;
  p.posterior = posterior; p.update = update; p.temper = temper; p.has_grad = has_grad; p.normalize = normalize;
  p.reduce = reduce;
  return launch_ce(p, nullptr);
}

int emu_launch_supcon(int grad, const float* f, float* lse, const float* coef, float* df, int64_t M, int64_t D,
                      float inv_tau) {
  SupconArgs p{};
  p.f = f; p.lse = lse; p.coef = coef; p.df = df; p.M = M; p.D = D; p.inv_tau = inv_tau;
  return grad ? launch_supcon_grad(p, nullptr) : launch_supcon_lse(p, nullptr);
}

int emu_launch_topk(const float* z, const int64_t* idx, int64_t* ids, float* vals, float* rest, float* bound,
                    float* grad, float* loss, float* work, int64_t V, int64_t B, int64_t C, int64_t N, int64_t k,
                    float gamma, float inv_tau_e, float gscale, int posterior, int update) {
  dps_fast::TopkArgs p{};
  p.z = z; p.idx = idx; p.ids = ids; p.vals = vals; p.rest = rest; p.bound = bound; p.grad = grad;
  p.loss = loss; p.work = work;
  p.V = V; p.B = B; p.C = C; p.N = N; p.k = k;
  p.gamma = gamma; p.inv_tau_e = inv_tau_e; p.gscale = gscale;
  p.posterior = posterior; p.update = update;
  return launch_topk_step(p, nullptr);
}

int emu_scale_unless_one(void* g, int64_t n, int dtype, const float* s) {
  return launch_scale_unless_one(g, n, dtype, s, nullptr);
}

}  // extern "C"
