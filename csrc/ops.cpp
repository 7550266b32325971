// The dps_fast op library. Each fused op defines its schema once, next to its CPU kernel
// (csrc/cpu/<op>.cpp, TORCH_LIBRARY_FRAGMENT); Python and the Triton kernels read the
// schemas from the dispatcher. This file opens the namespace and defines attach_grad, the
// autograd glue every fused op shares (dps_fast/_ops.py explains why it is a separate op),
// and the bare autograd node of the eager fast path (csrc/fast_path.cpp), with one backward.
#include <ATen/ATen.h>
#include <ATen/SavedTensorHooks.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "ops.h"

#include <atomic>

namespace dps_fast {

bool plain_cpu(const at::Tensor& t) {
  constexpr auto wrappers = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                                 c10::DispatchKey::Functionalize,
                                                 c10::DispatchKey::FuncTorchBatched,
                                                 c10::DispatchKey::FuncTorchGradWrapper});
  // lazy views (negated, conjugated, the zero tensor) and nested tensors hold other data than they show
  return t.device().is_cpu() && !t.key_set().has_any(wrappers) && !t.is_neg() && !t.is_conj() &&
         !t._is_zerotensor() && !t.is_nested();
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// dps_fast::scale_unless_one_(grad, s): grad *= s unless s is exactly 1, decided where s lives.
// The generic kernel (CPU, and CUDA without the CUDA kernels, e.g. a Triton-only install)
// reads a CPU s in place; on another device it multiplies (no host synchronisation). The CUDA
// kernel (csrc/cuda/attach_grad.cu) reads s on the device: every block returns at once when
// s == 1, so loss.backward() moves no B x C pass and the CPU never waits.
void scale_unless_one_generic(at::Tensor& grad, const at::Tensor& s) {
  // (read in place: item() would be a dispatcher call, ~1 us of a ~100 us small step)
  if (plain_cpu(s) && s.scalar_type() == at::kFloat && s.numel() == 1 && *s.const_data_ptr<float>() == 1.0f) return;
  grad.mul_(s);
}

void scale_unless_one(at::Tensor& grad, const at::Tensor& s) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("dps_fast::scale_unless_one_", "")
                             .typed<void(at::Tensor&, const at::Tensor&)>();
  op.call(grad, s);
}

// May backward scale the forward's buffer in place and hand it over? Only when autograd frees
// the graph after this backward (no later backward reads the buffer; torch's engine keeps
// the graph by default outside a backward) and on plain eager tensors (tracing wrappers,
// fakes and functional tensors carry one of these keys).
bool may_scale_in_place(const at::Tensor& grad, const at::Tensor& g) {
  constexpr auto traced = c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                               c10::DispatchKey::Functionalize,
                                               c10::DispatchKey::FuncTorchBatched,
                                               c10::DispatchKey::FuncTorchGradWrapper});
  return !torch::autograd::get_current_graph_task_keep_graph() && !grad.key_set().has_any(traced) &&
         !g.key_set().has_any(traced) && !grad.is_inference() && grad.device() == g.device();
}

// The forward's gradient times grad_output (a scalar, or one value per loss entry for
// reduction="none"). When the graph is freed after this backward (loss.backward()), the
// buffer itself is scaled in place and handed over: autograd moves it into .grad without a
// copy, and an upstream gradient of exactly 1 costs no pass at all, on the device too
// (scale_unless_one). When the graph is kept, a new tensor (the buffer must stay as it was),
// except for a CPU upstream gradient of exactly 1: the buffer itself, under the version
// check, and `handed_out` (the node's) set: the caller holds it, so a later backward must
// not scale it in place either.
at::Tensor scale_grad(const at::Tensor& grad, const at::Tensor& g, bool& handed_out) {
  at::Tensor factor = g;
  if (g.dim() > 0) {
    TORCH_CHECK(g.dim() <= grad.dim(), "dps_fast: attach_grad: grad_output has more dimensions than the gradient");
    while (factor.dim() < grad.dim()) factor = factor.unsqueeze(-1);  // not sizes(): symbolic under compile
  }
  if (!handed_out && may_scale_in_place(grad, g)) {
    at::Tensor out = grad;
    if (g.dim() > 0) {
      out.mul_(factor);
    } else {
      scale_unless_one(out, g);
    }
    return out;
  }
  if (g.dim() == 0 && plain_cpu(g) && g.scalar_type() == at::kFloat && *g.const_data_ptr<float>() == 1.0f) {
    handed_out = true;
    return grad;
  }
  return (grad * factor).to(grad.scalar_type());
}

// The saved gradient has no derivative of its own: a second derivative through it
// (create_graph=True) would be silently wrong, so it is an error.
void check_first_order() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "dps_fast: the fused backends have no second derivative (backward with create_graph=True, a "
              "gradient penalty, torch.func.hessian...); use backend='reference' for higher-order gradients");
}

// A gradient buffer kept outside autograd's saved variables gets the version check a saved
// variable would make: with retain_graph, autograd.grad hands the buffer itself to the caller
// (and to tensor hooks), who may change it in place before the next backward reads it.
void check_buffer_version(const at::Tensor& grad, int64_t version) {
  TORCH_CHECK(grad._version() == version,
              "one of the variables needed for gradient computation has been modified by an inplace operation: "
              "the gradient buffer of a dps_fast loss is at version ", grad._version(), "; expected version ",
              version, " instead (it was handed out by an earlier backward with retain_graph=True)");
}

// A C++ autograd node: a Python autograd.Function cost about 25 us forward and 30 us
// backward per call at [128, 10] (2-core VM, 2026-11-30), several times the kernel.
struct AttachGrad : public torch::autograd::Function<AttachGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& loss, const at::Tensor& x,
                            const at::Tensor& grad) {
    // A saved variable is released before .grad is filled, so the buffer moves into .grad
    // without a copy, and its version check catches an in-place overwrite. Under saved-tensor
    // hooks (non-reentrant activation checkpointing, save_on_cpu) a saved variable would come
    // back from the hook: for checkpointing, from a recomputation that reads the bank after
    // this step wrote it (rounded, in a bf16 bank); the forward's own buffer is kept instead,
    // with its version, as AttachGradBackward keeps it.
    if (at::SavedTensorDefaultHooks::get_tls_state().stack.empty()) {
      ctx->save_for_backward({grad});
    } else {
      ctx->saved_data["grad"] = grad;
      ctx->saved_data["version"] = grad._version();
    }
    return loss.clone();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    check_first_order();
    // Raises autograd's "backward through the graph a second time" once a backward without
    // retain_graph has freed the graph: also when the buffer is kept outside the saved variables.
    const variable_list saved = ctx->get_saved_variables();
    const auto kept = ctx->saved_data.find("grad");
    at::Tensor grad = kept == ctx->saved_data.end() ? saved[0] : kept->second.toTensor();
    if (kept != ctx->saved_data.end()) check_buffer_version(grad, ctx->saved_data.at("version").toInt());
    bool handed_out = ctx->saved_data.count("handed_out") > 0;
    at::Tensor out = scale_grad(grad, grad_outputs[0], handed_out);
    if (handed_out) ctx->saved_data["handed_out"] = true;
    return {at::Tensor(), out, at::Tensor()};
  }
};

// The same backward as a bare autograd Node, for the eager fast path (csrc/fast_path.cpp),
// which attaches it to the loss it has just made. AttachGrad's context, saved-variable and
// output-wrapping machinery and its copy of the loss cost about 10 us of a ~30 us forward at
// [128, 10] (2-core VM, benchmarks/overhead_probe.py, 2026-11-30). What the bare node gives
// up: compiled autograd cannot trace it (it says so; dps_fast/_dispatch.py::eager_op
// declines while compiled autograd is on), and forward-mode AD (fast_path.cpp declines).
struct AttachGradBackward : public torch::autograd::Node {
  // The buffer is kept as it is, as AttachGrad keeps it under saved-tensor hooks, with the
  // version check a saved variable would make (check_buffer_version).
  explicit AttachGradBackward(at::Tensor grad) : grad_(std::move(grad)), version_(grad_._version()) {}

  std::string name() const override { return "dps_fast::AttachGradBackward"; }

  // The engine calls this after apply() unless the graph is kept: the buffer is then held
  // only by the gradient apply() returned, and autograd moves it into .grad without a copy.
  // (The lock: two threads may run backward through one graph, note [Thread Safety on
  // Autograd Node] in torch/csrc/autograd/node.h.)
  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    grad_.reset();
  }

  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const override {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "dps_fast: compiled autograd cannot trace a loss computed by the eager fast path; "
                                "compute the loss with compiled autograd already enabled, or under torch.compile");
  }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    check_first_order();
    at::Tensor grad;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      grad = grad_;
    }
    TORCH_CHECK(grad.defined(),
                "Trying to backward through the graph a second time (or directly access saved tensors after they "
                "have already been freed). Saved intermediate values of the graph are freed when you call "
                ".backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the "
                "graph a second time or if you need to access saved tensors after calling backward.");
    check_buffer_version(grad, version_);
    torch::autograd::variable_list out(1);
    if (!should_compute_output(0)) return out;
    // an undefined upstream gradient counts as zeros, as in AttachGrad (materialize_grads)
    bool handed_out = handed_out_.load();
    out[0] = scale_grad(grad, grads[0].defined() ? grads[0] : input_metadata(0).zeros_like(), handed_out);
    if (handed_out) handed_out_ = true;
    return out;
  }

  at::Tensor grad_;
  int64_t version_;
  std::atomic<bool> handed_out_{false};  // scale_grad
};

// A new node, held the way this torch holds autograd nodes: an intrusive_ptr in torch 2.13,
// a shared_ptr (with deleteNode, found by argument-dependent lookup) in 2.11, which the CUDA
// image runs.
template <typename N>
auto make_node(at::Tensor grad) {
  using NodePtr = std::decay_t<decltype(std::declval<const at::TensorBase&>().grad_fn())>;
  if constexpr (std::is_same_v<NodePtr, std::shared_ptr<torch::autograd::Node>>) {
    return std::shared_ptr<N>(new N(std::move(grad)), [](N* p) { deleteNode(p); });
  } else {
    return c10::make_intrusive<N>(std::move(grad));
  }
}

at::Tensor attach_grad_value(const at::Tensor& loss, const at::Tensor& x, const at::Tensor& grad) {
  return loss.clone();
}

}  // namespace

at::Tensor attach_grad(const at::Tensor& loss, const at::Tensor& x, const at::Tensor& grad) {
  return AttachGrad::apply(loss, x, grad);
}

at::Tensor attach_grad_to_new(at::Tensor loss, const at::Tensor& x, const at::Tensor& grad) {
  auto node = make_node<AttachGradBackward>(grad);
  node->set_next_edges(torch::autograd::collect_next_edges(x));
  torch::autograd::set_history(loss, node);
  return loss;
}

}  // namespace dps_fast

TORCH_LIBRARY(dps_fast, m) {
  // Host-side index validation (range, duplicates), raising IndexError / ValueError; returns
  // the index as a new contiguous int64 tensor (an op output, so torch.compile keeps the check).
  m.def("check_index(Tensor index, int n) -> Tensor");
  // A copy of `loss` whose gradient with respect to x is grad * grad_output: the fused
  // forwards compute d loss / d x with the loss, so backward only scales.
  m.def("attach_grad(Tensor loss, Tensor x, Tensor grad) -> Tensor");
  // attach_grad's backward on a graph that is freed: grad *= scale unless scale == 1, decided
  // on scale's device (csrc/ops.cpp::scale_grad). CUDA kernel: csrc/cuda/attach_grad.cu.
  m.def("scale_unless_one_(Tensor(a!) grad, Tensor scale) -> ()");
}

TORCH_LIBRARY_IMPL(dps_fast, CompositeExplicitAutograd, m) {
  m.impl("attach_grad", &dps_fast::attach_grad_value);
  m.impl("scale_unless_one_", &dps_fast::scale_unless_one_generic);
}

TORCH_LIBRARY_IMPL(dps_fast, Autograd, m) {
  m.impl("attach_grad", &dps_fast::attach_grad);
}
