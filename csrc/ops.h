// What csrc/ops.cpp shares with the other translation units of the op library.
#pragma once
#include <ATen/ATen.h>

namespace dps_fast {

// True for a tensor whose data may be read on the host as it is: a CPU tensor that is not a
// FakeTensor/functional/functorch wrapper (torch.compile tracing, torch.func), a lazy
// negated/conjugated view, the zero tensor or a nested tensor.
bool plain_cpu(const at::Tensor& t);

// `loss`, with d loss / d x = grad * grad_output for autograd (the op dps_fast::attach_grad
// in eager mode; csrc/ops.cpp).
at::Tensor attach_grad(const at::Tensor& loss, const at::Tensor& x, const at::Tensor& grad);

// The same for a `loss` the caller has just made, holds alone and computed from x without
// autograd (x requires grad; grad mode is on): `loss` itself, not a copy (eager only).
at::Tensor attach_grad_to_new(at::Tensor loss, const at::Tensor& x, const at::Tensor& grad);

}  // namespace dps_fast
