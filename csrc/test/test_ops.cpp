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

int main() {
  auto dps = c10::Dispatcher::singleton()
                 .findSchemaOrThrow("dps_fast::dps_ce_fwd", "")
                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, double,
                                   double, bool, bool, int64_t)>();
  auto supcon = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("dps_fast::supcon_stats", "")
                    .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                        const at::Tensor&, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double)>();

  // 1. DPS step with zero logits over C = 3: evidence 1/3 each; bank row 1 = [c, eps, eps].
  const double c = 100.0, eps = 0.01, gamma = 0.9;
  at::Tensor alpha = at::full({4, 3}, eps);
  alpha[1][0] = c;
  at::Tensor before = alpha.clone();
  at::Tensor logits = at::zeros({1, 3});
  at::Tensor index = at::tensor({int64_t(1)});
  at::Tensor grad = at::empty_like(logits);
  at::Tensor loss = dps.call(logits, index, alpha, grad, gamma, 1.0, true, true, /*sum*/ 2);
  const double a0 = gamma * c + 1.0 / 3, a1 = gamma * eps + 1.0 / 3, s = a0 + 2 * a1;
  expect_near(alpha[1][0].item<double>(), a0, 1e-4, "alpha[1,0] after update");
  expect_near(alpha[1][1].item<double>(), a1, 1e-6, "alpha[1,1] after update");
  expect_near(loss.item<double>(), std::log(3.0), 1e-6, "loss = log C for zero logits");
  expect_near(grad[0][0].item<double>(), 1.0 / 3 - a0 / s, 1e-6, "grad = softmax - target");
  if (!at::equal(alpha.index_select(0, at::tensor({int64_t(0), int64_t(2), int64_t(3)})),
                 before.index_select(0, at::tensor({int64_t(0), int64_t(2), int64_t(3)})))) {
    std::printf("FAIL untouched bank rows changed\n");
    ++failures;
  }

  // 2. Closed form after t steps: sum_j alpha = gamma^t S0 + (1 - gamma^t) / (1 - gamma).
  at::Tensor bank = at::full({2, 5}, 1.0);
  const double s0 = 5.0;
  at::Tensor z = at::randn({1, 5});
  at::Tensor nograd = at::empty({0});
  for (int t = 1; t <= 6; ++t) {
    dps.call(z, at::tensor({int64_t(0)}), bank, nograd, gamma, 1.0, true, true, 1);
    const double want = std::pow(gamma, t) * s0 + (1 - std::pow(gamma, t)) / (1 - gamma);
    expect_near(bank[0].sum().item<double>(), want, 1e-4, "closed-form bank mass, step " + std::to_string(t));
  }

  // 3. Out-of-range id (validation off): the row is skipped, loss NaN, bank untouched.
  at::Tensor bank2 = at::full({2, 3}, 1.0), copy2 = bank2.clone();
  at::Tensor l3 = dps.call(at::zeros({1, 3}), at::tensor({int64_t(7)}), bank2, nograd, gamma, 1.0, true, true, 0);
  if (!std::isnan(l3[0].item<double>()) || !at::equal(bank2, copy2)) {
    std::printf("FAIL out-of-range id must not touch the bank\n");
    ++failures;
  }

  // 4. NT-Xent on two identical views of two orthogonal samples, tau = 1:
  // each anchor: positive sim 1, negatives sim 0 (twice) -> loss = log(e + 2) - 1.
  at::Tensor f = at::zeros({4, 2});
  f[0][0] = 1; f[2][0] = 1;  // sample 0, views 0 and 1 (rows m = v * B + b)
  f[1][1] = 1; f[3][1] = 1;  // sample 1
  at::Tensor lab = at::tensor({int64_t(0), int64_t(1), int64_t(0), int64_t(1)});
  // supcon_stats gives each anchor's logsumexp, positive weight sum and weighted similarity.
  auto [lse, wsum, wdot] = supcon.call(f, std::optional<at::Tensor>(lab), std::optional<at::Tensor>(), 1.0);
  const double per_anchor = (lse - wdot / wsum).mean().item<double>();
  expect_near(per_anchor, std::log(std::exp(1.0) + 2.0) - 1.0, 1e-6, "NT-Xent closed form");

  // 5. attach_grad: the loss's value, with d loss / d x = grad * grad_output (the C++ autograd node).
  auto attach = c10::Dispatcher::singleton()
                    .findSchemaOrThrow("dps_fast::attach_grad", "")
                    .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  at::Tensor x = at::zeros({2, 3}).set_requires_grad(true);
  at::Tensor g = at::arange(6, at::kFloat).reshape({2, 3});
  at::Tensor attached = attach.call(at::full({}, 0.5), x, g);
  expect_near(attached.item<double>(), 0.5, 0.0, "attach_grad keeps the loss");
  (attached * 3.0).backward();
  expect_near(x.grad()[1][2].item<double>(), 15.0, 0.0, "attach_grad: grad * grad_output");

  // 6. The eager fast path (csrc/fast_path.cpp): the step of case 1 through the whole-call op
  // gives the same loss and gradient; a float64 call is declined with the bank untouched.
  auto eager = c10::Dispatcher::singleton()
                   .findSchemaOrThrow("dps_fast::dps_ce_eager", "")
                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::Tensor&, double, double,
                                     c10::string_view, c10::string_view, bool, bool,
                                     std::optional<c10::string_view>)>();
  at::Tensor bank6 = before.clone();
  at::Tensor z6 = at::zeros({1, 3}).set_requires_grad(true);
  at::Tensor l6 = eager.call(z6, index, bank6, gamma, 1.0, "posterior", "sum", true, true, std::nullopt);
  expect_near(l6.item<double>(), std::log(3.0), 1e-6, "eager op: loss = log C for zero logits");
  l6.backward();
  expect_near(z6.grad()[0][0].item<double>(), 1.0 / 3 - a0 / s, 1e-6, "eager op: grad = softmax - target");
  at::Tensor bank64 = before.to(at::kDouble), copy64 = bank64.clone();
  bool declined = false;
  try {
    eager.call(at::zeros({1, 3}, at::kDouble), index, bank64, gamma, 1.0, "posterior", "sum", true, true,
               std::nullopt);
  } catch (const c10::NotImplementedError&) {
    declined = true;
  }
  if (!declined || !at::equal(bank64, copy64)) {
    std::printf("FAIL eager op must decline float64, bank untouched\n");
    ++failures;
  }

  if (failures == 0) std::printf("dps_fast C++ op tests: all passed\n");
  return failures == 0 ? 0 : 1;
}
