// Test hooks for the row primitives of row_kernels.h (tests/test_cpu_row_kernels.py).
// Not part of the API: the namespace dps_fast_testing holds no op a user needs.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "row_kernels.h"

namespace dps_fast {
namespace cpu {
namespace {

// (exp_nonpos(x), x.exp_u20()) elementwise, for float32 x.
std::tuple<at::Tensor, at::Tensor> exp_nonpos_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat, "dps_fast_testing: exp_nonpos takes float32");
  auto xc = x.contiguous();
  auto ours = at::empty_like(xc), aten = at::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  float *po = ours.data_ptr<float>(), *pa = aten.data_ptr<float>();
  const int64_t n = xc.numel();
  for (int64_t j = 0; j < n; j += kW) {
    const int64_t k = std::min<int64_t>(kW, n - j);
    const Vec v = Vec::loadu(px + j, k);
    exp_nonpos(v).store(po + j, k);
    v.exp_u20().store(pa + j, k);
  }
  return {ours, aten};
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY(dps_fast_testing, m) { m.def("exp_nonpos(Tensor x) -> (Tensor, Tensor)"); }

TORCH_LIBRARY_IMPL(dps_fast_testing, CPU, m) { m.impl("exp_nonpos", &dps_fast::cpu::exp_nonpos_cpu); }
