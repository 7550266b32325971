// The eager fast path's entry for the Python binding of csrc/module.cpp, kept apart from
// ops.h so that the binding's translation unit need not parse ATen/ATen.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <optional>

#include "fast_path_contract.h"

// Declines a call unless `cond`: a NotImplementedError whose message starts as
// dps_fast/_contract.py::DECLINES says (only that is a decline), raised before any write.
#define DPS_ACCEPT(cond, what) TORCH_CHECK_NOT_IMPLEMENTED(cond, DPS_FAST_DECLINES " ", what)

namespace dps_fast {

// The op dps_fast::dps_ce_eager (csrc/fast_path.cpp), called through the dispatcher as
// torch.ops would call it (profiler, JIT tracing and dispatch keys alike).
at::Tensor call_dps_ce_eager(const at::Tensor& logits, const at::Tensor& index, at::Tensor& alpha, double gamma,
                             double tau_e, c10::string_view target, c10::string_view reduction, bool update,
                             bool validate, std::optional<c10::string_view> backend);

}  // namespace dps_fast
