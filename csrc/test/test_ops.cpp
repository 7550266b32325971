// C++ test of the registered CPU ops, through the dispatcher (run by ctest).
// Checks closed forms that can be computed by hand; the exhaustive comparison
// against the reference lives in tests/ (pytest).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>

static int failures = 0;

static void expect_near(double got, double want, double tol, const std::string& what) {
  if (!(std::fabs(got - want) <= tol)) {
    std::printf("FAIL %s: got %.9g want %.9g\n", what.c_str(), got, want);
    ++failures;
  }
}

using DpsStep = c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                                   double, double, bool, bool, int64_t)>;

static DpsStep dps_step() {
  return c10::Dispatcher::singleton()
      .findSchemaOrThrow("dps_fast::dps_ce_fwd", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, double, double, bool, bool,
                        int64_t)>();
}

static void fail(const char* what) {
  std::printf("FAIL %s\n", what);
  ++failures;
}

// The case-1 bank: row 1 = [c, eps, eps], the rest eps; zero logits over C = 3 give evidence
// 1/3 each, so row 1 becomes [a0, a1, a1] with mass s.
constexpr double kC = 100.0, kEps = 0.01, kGamma = 0.9;
constexpr double kA0 = kGamma * kC + 1.0 / 3, kA1 = kGamma * kEps + 1.0 / 3, kS = kA0 + 2 * kA1;

static at::Tensor case_bank() {
  at::Tensor alpha = at::full({4, 3}, kEps);
  alpha[1][0] = kC;
  return alpha;
}

// 1. The DPS step with zero logits: the update, the loss, the gradient; other rows untouched.
static void closed_form_step() {
  at::Tensor alpha = case_bank(), before = alpha.clone();
  at::Tensor logits = at::zeros({1, 3}), grad = at::empty_like(logits);
  at::Tensor loss = dps_step().call(logits, at::tensor({int64_t(1)}), alpha, grad, kGamma, 1.0, true, true, /*sum*/ 2);
  expect_near(alpha[1][0].item<double>(), kA0, 1e-4, "alpha[1,0] after update");
  expect_near(alpha[1][1].item<double>(), kA1, 1e-6, "alpha[1,1] after update");
  expect_near(loss.item<double>(), std::log(3.0), 1e-6, "loss = log C for zero logits");
  expect_near(grad[0][0].item<double>(), 1.0 / 3 - kA0 / kS, 1e-6, "grad = softmax - target");
  const at::Tensor others = at::tensor({int64_t(0), int64_t(2), int64_t(3)});
  if (!at::equal(alpha.index_select(0, others), before.index_select(0, others))) fail("untouched bank rows changed");
}

// 2. Closed form after t steps: sum_j alpha = gamma^t S0 + (1 - gamma^t) / (1 - gamma).
static void closed_form_bank_mass() {
  at::Tensor bank = at::full({2, 5}, 1.0), z = at::randn({1, 5}), nograd = at::empty({0});
  const double s0 = 5.0;
  for (int t = 1; t <= 6; ++t) {
    dps_step().call(z, at::tensor({int64_t(0)}), bank, nograd, kGamma, 1.0, true, true, 1);
    const double want = std::pow(kGamma, t) * s0 + (1 - std::pow(kGamma, t)) / (1 - kGamma);
    expect_near(bank[0].sum().item<double>(), want, 1e-4, "closed-form bank mass, step " + std::to_string(t));
  }
}

// 3. Out-of-range id (validation off): the row is skipped, loss NaN, bank untouched.
static void out_of_range_id() {
  at::Tensor bank = at::full({2, 3}, 1.0), copy = bank.clone(), nograd = at::empty({0});
  at::Tensor loss = dps_step().call(at::zeros({1, 3}), at::tensor({int64_t(7)}), bank, nograd, kGamma, 1.0, true,
                                    true, 0);
  if (!std::isnan(loss[0].item<double>()) || !at::equal(bank, copy)) fail("out-of-range id must not touch the bank");
}

// 4. NT-Xent on two identical views of two orthogonal samples, tau = 1: each anchor has
// positive sim 1 and negatives sim 0 (twice), so its logsumexp over j != i is log(e + 2) and the
// loss log(e + 2) - 1 (the positive term is the host glue's, dps_fast/ops/supcon.py).
static void ntxent_closed_form() {
  auto lse_op = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("dps_fast::supcon_lse", "")
                    .typed<at::Tensor(const at::Tensor&, double)>();
  at::Tensor f = at::zeros({4, 2});
  f[0][0] = 1; f[2][0] = 1;  // sample 0, views 0 and 1 (rows m = v * B + b)
  f[1][1] = 1; f[3][1] = 1;  // sample 1
  at::Tensor lse = lse_op.call(f, 1.0);
  for (int64_t i = 0; i < 4; ++i) {
    expect_near(lse[i].item<double>(), std::log(std::exp(1.0) + 2.0), 1e-6, "NT-Xent logsumexp, row " + std::to_string(i));
  }
}

// 5. attach_grad: the loss's value, with d loss / d x = grad * grad_output (the C++ autograd node).
static void attach_grad_node() {
  auto attach = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("dps_fast::attach_grad", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::Tensor x = at::zeros({2, 3}).set_requires_grad(true);
  at::Tensor g = at::arange(6, at::kFloat).reshape({2, 3});
  at::Tensor attached = attach.call(at::full({}, 0.5), x, g);
  expect_near(attached.item<double>(), 0.5, 0.0, "attach_grad keeps the loss");
  (attached * 3.0).backward();
  expect_near(x.grad()[1][2].item<double>(), 15.0, 0.0, "attach_grad: grad * grad_output");
}

// 6. The eager fast path (csrc/fast_path.cpp): the step of case 1 through the whole-call op
// gives the same loss and gradient; a float64 call is declined with the bank untouched.
static void eager_fast_path() {
  auto eager = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("dps_fast::dps_ce_eager", "")
                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, double, double,
                                     c10::string_view, c10::string_view, bool, bool,
                                     std::optional<c10::string_view>)>();
  const at::Tensor index = at::tensor({int64_t(1)});
  at::Tensor bank = case_bank();
  at::Tensor z = at::zeros({1, 3}).set_requires_grad(true);
  at::Tensor loss = eager.call(z, index, bank, kGamma, 1.0, "posterior", "sum", true, true, std::nullopt);
  expect_near(loss.item<double>(), std::log(3.0), 1e-6, "eager op: loss = log C for zero logits");
  loss.backward();
  expect_near(z.grad()[0][0].item<double>(), 1.0 / 3 - kA0 / kS, 1e-6, "eager op: grad = softmax - target");
  at::Tensor bank64 = case_bank().to(at::kDouble), copy64 = bank64.clone();
  bool declined = false;
  try {
    eager.call(at::zeros({1, 3}, at::kDouble), index, bank64, kGamma, 1.0, "posterior", "sum", true, true,
               std::nullopt);
  } catch (const c10::NotImplementedError&) {
    declined = true;
  }
  if (!declined || !at::equal(bank64, copy64)) fail("eager op must decline float64, bank untouched");
}

int main() {
  closed_form_step();
  closed_form_bank_mass();
  out_of_range_id();
  ntxent_closed_form();
  attach_grad_node();
  eager_fast_path();
  if (failures == 0) std::printf("dps_fast C++ op tests: all passed\n");
  return failures == 0 ? 0 : 1;
}
