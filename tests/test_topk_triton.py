"""The Triton kernel of the top-k step (dps_fast/kernels/topk_step.py; docs/method.md §12, issue
26) against the reference step, as tests/test_topk_kernel.py checks the CPU kernel: the same new
ids, values, rest and bound, loss and gradient by the tolerance rule against the float64
reference, over C (2 to 32,768), k, views, tau_e, targets, reductions, update, non-finite rows,
ids outside the bank, a non-unit upstream gradient and untouched rows; K' identical to the
reference's and the CPU kernel's on tie-heavy inputs. Here in Triton's interpreter (CPU
tensors); on a machine with a GPU, on CUDA tensors too."""
import functools

import pytest
import torch

import dps_fast
from dps_fast import topk as T
from _helpers import FUSED, HAS_CPU, case_id
from _topk_cases import SETTINGS, bank_state, check_ids_outside_are_skipped, check_wide_row, compare_step, on

TRITON = [c for c in FUSED if c[0] == "triton"]
pytestmark = pytest.mark.skipif(not TRITON, reason="Triton is not available (nor its interpreter)")

CASES = [(2, 1, 1), (5, 2, 3), (7, 6, 2), (33, 20, 1), (100, 8, 3), (1000, 32, 1), (3000, 64, 1)]


@pytest.mark.parametrize("case", TRITON, ids=case_id)
@pytest.mark.parametrize("c,k,views", CASES, ids=[f"C{c}-k{k}-V{v}" for c, k, v in CASES])
@pytest.mark.parametrize("target,reduction,update,tau_e", SETTINGS)
def test_triton_step_matches_the_reference(case, c, k, views, target, reduction, update, tau_e):
    step = functools.partial(T.fused_step, backend="triton")
    compare_step(step, c, k, views, target, reduction, update, tau_e, device=case[1])


@pytest.mark.parametrize("case", TRITON, ids=case_id)
def test_the_widest_row_on_chip(case):
    """C = 32,768, the kernel's MAX_C (int32 ids in a bank of more than 32,767 classes)."""
    from dps_fast.kernels import topk_step as kernel

    check_wide_row(functools.partial(T.fused_step, backend="triton"), kernel.MAX_C, device=case[1])


@pytest.mark.parametrize("case", TRITON, ids=case_id)
def test_ids_outside_the_bank_are_skipped(case):
    check_ids_outside_are_skipped(torch.ops.dps_fast_triton.topk_step, device=case[1])


@pytest.mark.parametrize("case", TRITON, ids=case_id)
@pytest.mark.parametrize("c,k", [(10, 3), (100, 8), (33, 20), (7, 4)])
def test_tie_heavy_inputs_keep_the_same_classes_in_the_same_order(case, c, k):
    """Equal logits, step after step, from a fresh prior (the slots at eps tie with every class
    outside K, and after each step the slots' values and the level are equal in exact arithmetic
    but rounded along different paths): the Triton kernel, the CPU kernel and the float32 and
    float64 references keep the same K', in the same order (docs/method.md §12's tie rule)."""
    labels = torch.tensor([0, c - 1, c // 2, 1])
    for z in (torch.zeros(1, 4, c), torch.full((2, 4, c), 3.0)):
        banks = {}
        for name, dtype in (("ref32", torch.float32), ("ref64", torch.float64), ("cpu", torch.float32),
                            ("triton", torch.float32)):
            bank = T.topk_prior(labels, c, k, c=2.0, eps=0.25, dtype=dtype)
            bank.ids = bank.ids.to(torch.int64)
            banks[name] = on(case[1], bank) if name == "triton" else bank
        for _ in range(4):
            T.reference_step(z, torch.arange(4), banks["ref32"], gamma=0.9)
            T.reference_step(z.double(), torch.arange(4), banks["ref64"], gamma=0.9)
            if HAS_CPU:
                T.fused_step(z, torch.arange(4), banks["cpu"], gamma=0.9, backend="cpu")
            T.fused_step(z.to(case[1]), torch.arange(4, device=case[1]), banks["triton"], gamma=0.9, backend="triton")
            for name in ("ref64", "triton") + (("cpu",) if HAS_CPU else ()):
                assert torch.equal(banks[name].ids.cpu(), banks["ref32"].ids), name


@pytest.mark.parametrize("case", TRITON, ids=case_id)
def test_the_loss_runs_the_triton_kernel_when_it_is_the_backend(case, monkeypatch):
    """DPSLoss(top_k=k, backend="triton") steps on the Triton kernel, to the reference's bank by
    the tolerance of a float32 step; rows too large to compile without spills take the reference."""
    device = case[1]
    calls = []
    real = T.fused_step
    monkeypatch.setattr(T, "fused_step", lambda *a, **kw: calls.append(kw["backend"]) or real(*a, **kw))
    labels = torch.randint(0, 60, (24,), generator=torch.Generator().manual_seed(2))
    crits = {b: dps_fast.DPSLoss(labels, 60, top_k=5, backend=b, device=device) for b in ("triton", "reference")}
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        z, idx = torch.randn(6, 60, generator=gen) * 2, torch.randperm(24, generator=gen)[:6]
        for crit in crits.values():
            crit(z.to(device).requires_grad_(), idx.to(device)).backward()
    assert calls == ["triton"] * 3
    torch.testing.assert_close(crits["triton"].targets().cpu(), crits["reference"].targets().cpu(),
                               rtol=1e-4, atol=1e-6)
    for c, k, want in [(1024, 8, "triton"), (1025, 8, None), (512, 16, "triton"), (512, 17, None)]:
        bank = T.topk_prior(torch.tensor([0]), c, k)  # T.TRITON_MAX_CELLS = 8192 cells of [C, k] rounded up
        assert T.fused_backend(torch.zeros(1, c, device=device), bank, "triton") == want, (c, k)
    if device == "cuda":  # never the automatic choice before a GPU run
        assert T.fused_backend(torch.zeros(1, 60, device=device), T.topk_prior(torch.tensor([0]), 60, 5), None) is None


@pytest.mark.parametrize("case", TRITON, ids=case_id)
def test_the_op_refuses_what_would_read_or_write_outside_its_tensors(case):
    device = case[1]
    bank = on(device, bank_state(6, 20, 3, torch.Generator().manual_seed(8)))
    z = torch.randn(1, 4, 20).to(device)
    good = dict(logits=z, index=torch.tensor([5, 0, 3, 1], device=device), ids=bank.ids, vals=bank.vals,
                rest=bank.rest, bound=bank.bound, grad=torch.empty_like(z))
    bad = [("index", good["index"][:3], "index must be int64 \\[B\\]"),
           ("grad", torch.empty(1, 3, 20, device=device), "grad must be float32 like the logits"),
           ("rest", bank.rest[:5], "rest must be float32 \\[N\\]"),
           ("ids", bank.ids[:, :0], "1 <= k < C"),
           ("vals", bank.vals.double(), "vals must be float32")]
    for name, value, match in bad:
        args = dict(good, **{name: value})
        with pytest.raises(ValueError, match=match):
            torch.ops.dps_fast_triton.topk_step(*args.values(), 0.9, 1.0, True, True, 0)


@pytest.mark.parametrize("case", TRITON, ids=case_id)
def test_the_schema_declares_what_the_kernel_writes(case):
    device = case[1]
    gen = torch.Generator().manual_seed(4)
    bank = on(device, bank_state(6, 20, 3, gen))
    z = torch.randn(2, 4, 20, generator=gen).to(device)
    args = (z, torch.tensor([5, 0, 3, 1], device=device), bank.ids, bank.vals, bank.rest, bank.bound,
            torch.empty_like(z), 0.9, 1.0, True, True, 1)
    torch.library.opcheck(torch.ops.dps_fast_triton.topk_step.default, args, test_utils=("test_schema",))
