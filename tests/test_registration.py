"""torch.library registration: schemas, opcheck, torch.compile, update-once semantics."""
import pytest
import torch
import torch.utils.checkpoint as cp

import dps_fast
from dps_fast import _registration
from _helpers import FUSED, case_id


def _namespace(backend):
    return "dps_fast_triton" if backend == "triton" else "dps_fast"


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_every_op_is_registered_with_one_schema(case):
    ns = _namespace(case[0])
    for kernel in _registration.kernels():
        op = getattr(getattr(torch.ops, ns), kernel.name).default
        assert str(op._schema) == f"{ns}::{_registration.schema(kernel.name)}", kernel.name


@pytest.mark.parametrize("case", FUSED, ids=case_id)
def test_opcheck_all_ops(case):
    """torch.library.opcheck of every op, on the samples its module declares."""
    backend, device = case
    ops = getattr(torch.ops, _namespace(backend))
    for kernel in _registration.kernels():
        for args in kernel.samples(device):
            torch.library.opcheck(getattr(ops, kernel.name).default, args)
    loss = torch.randn(3, device=device)
    x = torch.randn(3, 4, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.dps_fast.attach_grad.default, (loss, x, torch.randn(3, 4, device=device)))


@pytest.mark.parametrize("case", [c for c in FUSED if c != ("triton", "cpu")] or FUSED, ids=case_id)
def test_compile_fullgraph_training_step_updates_once(case):
    backend, device = case
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5).to(device)
    alpha0 = dps_fast.init_prior(torch.randint(0, 5, (40,)), 5).to(device)
    x = torch.randn(2, 16, 8, device=device)
    idx = torch.randperm(40)[:16].to(device)
    feats = torch.randn(2, 16, 4, device=device)

    def step(model, alpha):
        logits = model(x)
        loss = dps_fast.dps_cross_entropy(logits, idx, alpha, backend=backend, validate=False)
        loss = loss + 0.1 * dps_fast.supcon_loss(feats + logits[..., :4], backend=backend)
        loss = loss + dps_fast.soft_cross_entropy(logits[0], torch.softmax(logits[1].detach(), -1),
                                                  backend=backend)
        return loss

    a_eager, a_comp = alpha0.clone(), alpha0.clone()
    l_eager = step(model, a_eager)
    l_eager.backward()
    g_eager = model.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    l_comp = compiled(model, a_comp)
    l_comp.backward()
    torch.testing.assert_close(l_comp, l_eager)
    torch.testing.assert_close(model.weight.grad, g_eager)
    torch.testing.assert_close(a_comp, a_eager)  # updated exactly once, like eager
    # a second compiled call applies the second update
    compiled(model, a_comp)
    step(model, a_eager)
    torch.testing.assert_close(a_comp, a_eager)


@pytest.mark.parametrize("case", [("reference", "cpu")] + FUSED, ids=case_id)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_activation_checkpoint_recompute_does_not_update_twice(case, bank_dtype):
    """Same bank and same gradient as without checkpointing; with a bf16 bank the gradient
    must still be the forward's (targets from the unrounded posterior), not a recomputed one."""
    backend, device = case
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 4).to(device)
    x = torch.randn(5, 6, device=device)
    idx = torch.tensor([3, 1, 8, 0, 6], device=device)
    alpha0 = dps_fast.init_prior(torch.randint(0, 4, (10,)), 4, dtype=bank_dtype).to(device)

    # The bank is module state (as in DPSLoss), not a checkpoint input: PyTorch's
    # checkpoint forbids in-place changes to its inputs.
    bank = {}

    def region(inp):
        return dps_fast.dps_cross_entropy(lin(inp), idx, bank["alpha"], backend=backend)

    a_plain = bank["alpha"] = alpha0.clone()
    region(x).backward()
    g_plain = lin.weight.grad.clone()
    lin.zero_grad()
    a_ckpt = bank["alpha"] = alpha0.clone()
    cp.checkpoint(region, x, use_reentrant=False).backward()
    assert torch.equal(a_ckpt, a_plain)
    if backend == "reference" and bank_dtype != torch.float32:
        # docs/method.md §9: the reference's recomputed target reads the rounded bank; each
        # target entry is within the bank dtype's unit roundoff u of the forward's, twice over
        # (numerator and row sum)
        u = torch.finfo(bank_dtype).eps / 2
        torch.testing.assert_close(lin.weight.grad, g_plain, rtol=2 * u, atol=2 * u * float(g_plain.abs().max()))
    else:
        assert torch.equal(lin.weight.grad, g_plain)


@pytest.mark.parametrize("case", [c for c in FUSED if c != ("triton", "cpu")] or FUSED, ids=case_id)
def test_compile_dynamic_shapes_with_per_row_losses(case):
    """reduction='none' under torch.compile(dynamic=True): the backward scales the gradient by a
    grad_output of symbolic shape [B]; two batch sizes, one graph, eager's gradients."""
    backend, device = case

    def step(z, idx, alpha, w):
        return (dps_fast.dps_cross_entropy(z, idx, alpha, reduction="none", backend=backend, validate=False) * w).sum()

    compiled = torch.compile(step, dynamic=True, fullgraph=True, backend="aot_eager")
    for b in (6, 9):
        z = torch.randn(b, 5, device=device, requires_grad=True)
        idx, w = torch.randperm(20)[:b].to(device), torch.rand(b, device=device)
        alpha = dps_fast.init_prior(torch.randint(0, 5, (20,)), 5).to(device)
        a_eager, z_eager = alpha.clone(), z.detach().clone().requires_grad_(True)
        step(z_eager, idx, a_eager, w).backward()
        compiled(z, idx, alpha, w).backward()
        torch.testing.assert_close(z.grad, z_eager.grad)
        assert torch.equal(alpha, a_eager)
