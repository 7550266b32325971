// The dps_fast op library. Each fused op defines its schema once, next to its CPU kernel
// (csrc/cpu/<op>.cpp, TORCH_LIBRARY_FRAGMENT); Python and the Triton kernels read the
// schemas from the dispatcher. This file only opens the namespace.
#include <ATen/ATen.h>
#include <torch/library.h>

TORCH_LIBRARY(dps_fast, m) {
  // Host-side index validation (range, duplicates), raising IndexError / ValueError; returns
  // the index as a new contiguous int64 tensor (an op output, so torch.compile keeps the check).
  m.def("check_index(Tensor index, int n) -> Tensor");
}
