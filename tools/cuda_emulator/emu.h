// A CPU emulator for the CUDA kernels of csrc/cuda/ (tools/cuda_emulator/README.md).
//
// Each thread of a block is a fiber with its own stack (started by ucontext, switched by
// _setjmp / _longjmp, which need no system call); a block runs its fibers
// in turn until every one reaches the same barrier (__syncthreads, or one half of a warp
// shuffle), then the next round starts; blocks run one after another. __shared__ variables
// are function statics (one block at a time). Barriers are block-wide: a kernel whose
// threads call them in different orders is reported (CUDA would hang or be undefined).
#pragma once

#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

typedef int cudaError_t;
typedef void* cudaStream_t;
enum : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 4 };

namespace emu {

struct Fiber {
  ucontext_t ctx;  // to start it
  jmp_buf jb;      // to resume it
  std::vector<char> stack;
  dim3 tid;
  bool done = false;
};

struct Block {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  jmp_buf sched_jb;
  int cur = 0;
  dim3 block_dim, grid_dim, block_idx;
  std::vector<float> lanes;  // warp shuffle exchange
  const std::function<void()>* body = nullptr;
  std::string error;
};

inline Block& blk() {
  static Block b;
  return b;
}
inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}
inline const dim3& thread_idx() { return blk().fibers[blk().cur].tid; }
inline int linear_tid() {
  const dim3& t = thread_idx();
  return static_cast<int>(t.x + blk().block_dim.x * (t.y + blk().block_dim.y * t.z));
}

inline void barrier() {
  Block& b = blk();
  if (!_setjmp(b.fibers[b.cur].jb)) _longjmp(b.sched_jb, 1);
}

inline void fiber_entry() {
  Block& b = blk();
  (*b.body)();
  b.fibers[b.cur].done = true;
  _longjmp(b.sched_jb, 1);
}

// Runs fiber i until its next barrier or its end.
inline void resume(int i, bool first) {
  Block& b = blk();
  b.cur = i;
  if (_setjmp(b.sched_jb)) return;
  if (first) swapcontext(&b.sched, &b.fibers[i].ctx);
  _longjmp(b.fibers[i].jb, 1);
}

// Runs one block to completion; false (and Block::error) on divergent barriers.
inline bool run_block(const std::function<void()>& body) {
  Block& b = blk();
  b.body = &body;
  const int n = static_cast<int>(b.fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  for (bool first = true;; first = false) {
    int done = 0;
    for (int i = 0; i < n; ++i) {
      if (b.fibers[i].done) {
        ++done;
        continue;
      }
      resume(i, first);
      done += b.fibers[i].done;
    }
    if (done == n) return true;
    if (done > 0) {
      b.error = "divergent barrier: some threads exited while others wait at a barrier";
      return false;
    }
  }
}

struct Config {
  dim3 grid, block;
  Config(dim3 g, dim3 bl, size_t = 0, cudaStream_t = nullptr) : grid(g), block(bl) {}

  template <typename K, typename... A>
  void run(K kernel, const A&... args) {
    Block& b = blk();
    const int n = static_cast<int>(block.x * block.y * block.z);
    if (static_cast<int>(b.fibers.size()) != n) {
      b.fibers = std::vector<Fiber>(n);
      for (auto& f : b.fibers) f.stack.resize(128 * 1024);
    }
    for (int i = 0; i < n; ++i)
      b.fibers[i].tid = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
    b.lanes.assign(n, 0.f);
    b.block_dim = block;
    b.grid_dim = grid;
    const std::function<void()> body = [&]() { kernel(args...); };
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          b.block_idx = dim3(x, y, z);
          if (!run_block(body)) {
            last_error() = cudaErrorLaunchFailure;
            return;
          }
        }
  }
};

}  // namespace emu

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define threadIdx (emu::thread_idx())
#define blockIdx (emu::blk().block_idx)
#define blockDim (emu::blk().block_dim)
#define gridDim (emu::blk().grid_dim)

inline void __syncthreads() { emu::barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::barrier(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

// All threads of the block must call it (as the kernels here do); lanes pair within a warp.
inline float __shfl_xor_sync(unsigned, float v, int mask, int width = 32) {
  emu::Block& b = emu::blk();
  const int t = emu::linear_tid(), lane = t % 32, seg = lane - lane % width;
  b.lanes[t] = v;
  emu::barrier();
  const float r = b.lanes[t - lane + seg + ((lane - seg) ^ mask)];
  emu::barrier();
  return r;
}

inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}
inline int atomicExch(int* p, int v) {
  const int old = *p;
  *p = v;
  return old;
}

// __expf is ex2.approx(x * log2(e)): the rounding of the product is its main error for large |x|.
inline float __expf(float x) { return std::exp2(x * 1.44269504088896341f); }
// __fadd_rn: an addition the CUDA compiler never contracts into an fma.
inline float __fadd_rn(float a, float b) { return a + b; }
using std::isfinite;

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }
