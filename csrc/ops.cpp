// Schemas of the dps_fast ops. Keep in step with dps_fast/_ops.py::SCHEMAS
// (tests/test_registration.py compares them).
#include <ATen/ATen.h>
#include <torch/library.h>

TORCH_LIBRARY(dps_fast, m) {
  // One DPS step (SPEC §2): updates alpha[index] in place (when update), writes the
  // gradient of the loss (softmax - target, scaled for the reduction) into grad
  // (skipped when grad is empty; grad may be the logits' own storage), returns the loss.
  m.def(
      "dps_ce_fwd(Tensor logits, Tensor index, Tensor(a!) alpha, Tensor(b!) grad, float gamma, "
      "float tau_e, bool posterior, bool update, int reduction) -> Tensor");
  // Soft-target cross-entropy (SPEC §3), same conventions without the bank.
  m.def("soft_ce_fwd(Tensor logits, Tensor target, Tensor(a!) grad, bool normalize, int reduction) -> Tensor");
  // SupCon / NT-Xent over rows [M, d] (SPEC §4): positives from labels [M] or soft
  // weights <soft_i, soft_j>; returns (mean loss, d loss / d features or empty).
  m.def(
      "supcon_fwd(Tensor features, Tensor? labels, Tensor? soft, float tau, bool normalize, "
      "bool need_grad) -> (Tensor, Tensor)");
  // Host-side index validation (range, duplicates), raising IndexError / ValueError.
  m.def("check_index(Tensor index, int n) -> ()");
}
