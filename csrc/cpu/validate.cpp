// Host-side index validation for CPU tensors: the same checks and messages as
// dps_fast/_validate.py::index_values (which CUDA tensors and extension-less
// installs use), at C++ speed. IndexError / ValueError in Python.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "validate.h"

namespace dps_fast {
namespace cpu {

void check_index_values(const at::Tensor& idx, int64_t n) {
  const int64_t* p = idx.const_data_ptr<int64_t>();
  const int64_t b = idx.numel();
  int64_t bad = 0, first_bad = 0;
  for (int64_t i = 0; i < b; ++i) {
    if (p[i] < 0 || p[i] >= n) {
      if (bad++ == 0) first_bad = p[i];
    }
  }
  TORCH_CHECK_INDEX(bad == 0, "index ", first_bad, " is out of range for a bank of ", n, " rows (", bad,
                    " id(s) outside [0, ", n, "))");
  if (b < 2) return;
  int64_t dup = std::numeric_limits<int64_t>::max();
  if (n / 64 <= 8 * b + 1024) {  // a bitmap no larger than a few copies of the index
    std::vector<uint64_t> seen(static_cast<size_t>(n / 64 + 1), 0);
    for (int64_t i = 0; i < b; ++i) {
      const uint64_t bit = uint64_t(1) << (p[i] & 63);
      uint64_t& w = seen[static_cast<size_t>(p[i] >> 6)];
      if (w & bit) dup = std::min(dup, p[i]);
      w |= bit;
    }
  } else {
    std::vector<int64_t> s(p, p + b);
    std::sort(s.begin(), s.end());
    for (int64_t i = 1; i < b; ++i) {
      if (s[i] == s[i - 1]) {
        dup = s[i];
        break;
      }
    }
  }
  TORCH_CHECK_VALUE(dup == std::numeric_limits<int64_t>::max(), "index contains duplicate id ", dup,
                    "; ids in one call must be distinct (feed several views of one sample as logits of shape "
                    "[V, B, C])");
}

namespace {

at::Tensor check_index_cpu(const at::Tensor& index, int64_t n) {
  auto idx = index.to(at::kLong).contiguous();
  if (idx.is_same(index)) idx = idx.clone();
  check_index_values(idx, n);
  return idx;
}

}  // namespace
}  // namespace cpu
}  // namespace dps_fast

TORCH_LIBRARY_IMPL(dps_fast, CPU, m) { m.impl("check_index", &dps_fast::cpu::check_index_cpu); }
