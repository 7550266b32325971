// Host-side index validation for CPU tensors (csrc/cpu/validate.cpp).
#pragma once
#include <ATen/ATen.h>

namespace dps_fast {
namespace cpu {

// Range and duplicate checks of a contiguous int64 index against a bank of n rows, with the
// messages of dps_fast/_validate.py::index_values (IndexError / ValueError in Python).
void check_index_values(const at::Tensor& idx, int64_t n);

}  // namespace cpu
}  // namespace dps_fast
