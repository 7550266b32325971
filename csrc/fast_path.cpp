// The eager fast path of dps_fast.dps_cross_entropy on CPU tensors (docs/contributing.md,
// "The eager fast path"): the whole public call as one op, so that a small step pays one
// Python-to-C++ crossing instead of a dozen. It runs the same kernel (dps_fast::dps_ce_fwd)
// and the same backward formula (ops.cpp, scale_grad) as the Python path, so results are
// bit-identical; its autograd node is a bare one (ops.cpp, AttachGradBackward).
//
// What it accepts (dtypes, names, bounds, its schema) is declared once, in dps_fast/_contract.py,
// and reaches this file as the generated header fast_path_contract.h. It only *accepts* calls: anything it does not take on (float64, an empty batch, a view of
// another layout, bad input of any kind) it declines with NotImplementedError before
// touching anything, and the Python path (dps_fast/ops/dps_cross_entropy.py) then runs the
// call or raises the one error message for it (dps_fast/_validate.py). The index check is
// the exception: it raises with the Python path's messages (csrc/cpu/validate.cpp).
//
// Measured on the 2-core VM (benchmarks/overhead_probe.py, [128, 10], 2026-11-30): the Python
// path's forward cost ~70 us, of which the kernel ~10.
#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <utility>

#include "cpu/validate.h"
#include "fast_path.h"
#include "fast_path_contract.h"
#include "ops.h"

namespace dps_fast {
namespace {

using contract::fused_dtype;
using contract::index_dtype;

bool plain_strided_cpu(const at::Tensor& t) { return plain_cpu(t) && t.layout() == at::kStrided; }

// The backend the call asks for: the argument, else the environment (read with getenv, ~50 ns,
// where Python's os.environ.get costs ~2 us), as dps_fast/_dispatch.py::resolve reads them.
// (os.environ writes through to the C environment; glibc never frees an old environment
// array, so a concurrent setenv cannot pull it from under getenv.)
bool asks_for_cpu(const std::optional<c10::string_view>& backend) {
  if (backend.has_value()) return contract::eager_backend_position(*backend) >= 0;
  const char* env = std::getenv(contract::kBackendEnv);
  return env == nullptr || *env == '\0' || contract::eager_backend_position(env) >= 0;
}

// [first byte, one past the last byte] of t's elements (strides are >= 0):
// dps_fast/_validate.py::memory_span.
std::pair<uintptr_t, uintptr_t> memory_span(const at::Tensor& t) {
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  const auto start = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {start, start + static_cast<uintptr_t>((last + 1) * t.element_size())};
}

// dps_fast/_validate.py::shares_memory: one storage, or overlapping address ranges (two
// storages over one buffer, e.g. torch.from_numpy of two views of one array).
bool shares_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  if (a.storage().data() == b.storage().data()) return true;
  const auto [a0, a1] = memory_span(a);
  const auto [b0, b1] = memory_span(b);
  return a0 < b1 && b0 < a1;
}

// The tensor checks of dps_fast/ops/dps_cross_entropy.py::check, as a filter.
void accept_tensors(const at::Tensor& logits, const at::Tensor& index, const at::Tensor& alpha) {
  DPS_ACCEPT(plain_strided_cpu(logits) && plain_strided_cpu(index) && plain_strided_cpu(alpha),
             "tensors that are not plain strided CPU tensors");
  DPS_ACCEPT(fused_dtype(logits.scalar_type()) && fused_dtype(alpha.scalar_type()), "dtypes without a fused kernel");
  // (the Python path gives such a loss autograd's warning-only grad_fn)
  DPS_ACCEPT(!alpha.requires_grad(), "a bank that requires grad");
  // (the Python path sends dual tensors to the reference, or says why it cannot)
  DPS_ACCEPT(!logits._fw_grad(/*level=*/0).defined(), "forward-mode AD (dual tensors)");
  DPS_ACCEPT(logits.dim() == 2 || (logits.dim() == 3 && logits.size(0) >= 1), "logits of another shape");
  const int64_t b = logits.size(-2), c = logits.size(-1);
  DPS_ACCEPT(b >= 1 && c >= 1, "an empty batch");
  DPS_ACCEPT(index_dtype(index.scalar_type()) && index.dim() == 1 && index.size(0) == b, "this index");
  DPS_ACCEPT(alpha.dim() == 2 && alpha.size(1) == c && (c == 1 || alpha.stride(1) == 1), "this bank shape");
  // the bank is written in place: rows must own their memory and share none with what the step reads
  const bool rows_overlap = alpha.size(0) > 1 && alpha.stride(0) < c;
  DPS_ACCEPT(!rows_overlap && at::has_internal_overlap(alpha) != at::MemOverlap::Yes, "an overlapping bank");
  DPS_ACCEPT(!shares_memory(alpha, logits) && !shares_memory(alpha, index), "a bank sharing the logits or index");
}

at::Tensor dps_ce_eager(const at::Tensor& logits, const at::Tensor& index, at::Tensor& alpha, double gamma,
                        double tau_e, c10::string_view target, c10::string_view reduction, bool update,
                        bool validate, std::optional<c10::string_view> backend) {
  DPS_ACCEPT(asks_for_cpu(backend), "another backend");
  // a dispatch mode sees the ops a call runs: selective activation checkpointing replays the
  // Python path's list in backward, FlopCounterMode and debug modes report it; keep it the same
  DPS_ACCEPT(!c10::impl::dispatch_mode_enabled(), "calls under a torch dispatch mode");
  accept_tensors(logits, index, alpha);
  DPS_ACCEPT(gamma > contract::kGammaLow && gamma <= contract::kGammaHigh, "this gamma");
  DPS_ACCEPT(tau_e >= contract::kTauEMin && tau_e < std::numeric_limits<double>::infinity(), "this tau_e");
  const int target_position = contract::target_position(target);
  DPS_ACCEPT(target_position >= 0, "this target");
  const int64_t red = contract::reduction_code(reduction);
  DPS_ACCEPT(red >= 0, "this reduction");

  static auto step = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("dps_fast::dps_ce_fwd", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, double,
                                           double, bool, bool, int64_t)>();
  const bool need_grad = logits.requires_grad() && at::GradMode::is_enabled();
  at::Tensor loss, grad;
  {
    // straight to the CPU kernels: no autograd key for ops on detached inputs
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor idx = index.to(at::kLong).contiguous();
    // index errors raise here, before any write, with the messages of _validate.index_values
    if (validate) cpu::check_index_values(idx, alpha.size(0));
    const at::Tensor z = logits.detach();
    grad = need_grad ? at::empty_like(z, at::MemoryFormat::Contiguous) : at::empty({0}, z.options());
    loss = step.call(z, idx, alpha, grad, gamma, tau_e, /*posterior=*/target_position == 0, update, red);
  }
  return need_grad ? attach_grad_to_new(std::move(loss), logits, grad) : loss;
}

}  // namespace

at::Tensor call_dps_ce_eager(const at::Tensor& logits, const at::Tensor& index, at::Tensor& alpha, double gamma,
                             double tau_e, c10::string_view target, c10::string_view reduction, bool update,
                             bool validate, std::optional<c10::string_view> backend) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dps_fast::dps_ce_eager", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, double, double,
                                         c10::string_view, c10::string_view, bool, bool,
                                         std::optional<c10::string_view>)>();
  return op.call(logits, index, alpha, gamma, tau_e, target, reduction, update, validate, backend);
}

}  // namespace dps_fast

TORCH_LIBRARY_FRAGMENT(dps_fast, m) {
  // Eager only (it reads data on the host): the Python path runs under torch.compile and torch.func.
  m.def(dps_fast::contract::kEagerSchema, &dps_fast::dps_ce_eager);
}
