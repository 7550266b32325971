"""A stateful property test of the bank as training state (docs/method.md §9), over every bank
kind: random sequences of steps, eval steps, bad steps, prefetches, state-dict round trips and
corrupted loads, module casts, shard-file saves and loads (complete, interrupted, truncated, at
another world size). The invariant after every operation: the bank equals a simple model bank
(a local DPSLoss that sees the same steps, or the snapshot that was loaded), or the operation
raised and nothing changed.

``make test`` runs a short profile (a fixed number of derandomized examples per kind);
``make fuzz`` the long one (DPS_FAST_HYPOTHESIS_PROFILE=fuzz: random examples for
DPS_FAST_FUZZ_SECONDS per kind)."""
from __future__ import annotations

import copy
import os
import tempfile
import time

import pytest
import torch

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import dps_fast
from dps_fast import distributed as D
from dps_fast.banks import shard_files as SF
from _fuzz import FUZZ, FUZZ_SECONDS, PROFILE, _report
from _helpers import one_rank_gloo

N, C, GAMMA = 12, 4, 0.8
LABELS = torch.arange(N) % C
KINDS = ("local", "host", "replicated", "sharded")
# values no bank may hold; "overflow" is finite in float64 but not in any bank dtype
BAD_VALUES = (float("nan"), float("inf"), 0.0, -1.0, "overflow")


def make_loss(kind, bank_dtype=torch.float32):
    # a fixed tau_e: the machine models the rows; tau_e="auto"'s own state is tests/test_tau_e_auto.py's
    kw = dict(gamma=GAMMA, reduction="none", bank_dtype=bank_dtype, tau_e=1.0)
    if kind in ("replicated", "sharded"):
        return D.DistributedDPSLoss(LABELS, C, mode=kind, timeout_s=30, **kw)
    if kind == "host":
        return dps_fast.HostDPSLoss(LABELS, C, **kw)
    return dps_fast.DPSLoss(LABELS, C, bank=kind, **kw)


def bank_key(state: dict) -> str:
    """The state-dict key of the bank rows (``alpha`` or ``bank``, by kind)."""
    return next(k for k in ("alpha", "bank") if k in state)


class BankMachine(RuleBasedStateMachine):
    kind = "local"
    bank_dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.crit = make_loss(self.kind, self.bank_dtype)
        self.model = make_loss("local", self.bank_dtype)  # the simple model bank
        self.snapshots = []  # (state dict, model bank) pairs
        self.saves = []      # (folder, model bank) of complete shard-file saves
        self.tmp = tempfile.TemporaryDirectory()

    def teardown(self):
        self.tmp.cleanup()

    # ------------------------------------------------------------------ helpers
    def batch(self, seed: int, size: int, nonfinite: bool):
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(N, generator=g)[:size]
        z = torch.randn(size, C, generator=g) * 3
        if nonfinite and size > 0:
            z[0, 0] = float("nan")
        return idx, z

    def bank(self) -> torch.Tensor:
        return self.crit.full_bank()

    def expect_unchanged(self, action, exc=(ValueError, TypeError, IndexError, RuntimeError)):
        """``action`` must raise and leave the bank and the labels as they were."""
        bank, labels = self.bank().clone(), self.crit.given_labels.clone()
        with pytest.raises(exc):
            action()
        assert torch.equal(self.bank(), bank), "a failing operation changed the bank"
        assert torch.equal(self.crit.given_labels, labels), "a failing operation changed the labels"

    # ------------------------------------------------------------------ steps
    @rule(seed=st.integers(0, 2 ** 16), size=st.integers(1, N), nonfinite=st.booleans())
    def step(self, seed, size, nonfinite):
        idx, z = self.batch(seed, size, nonfinite)
        got = self.crit(z.clone().requires_grad_(), idx)
        want = self.model(z.clone().requires_grad_(), idx)
        torch.testing.assert_close(got, want, equal_nan=True)
        got.nansum().backward()

    @rule(seed=st.integers(0, 2 ** 16), size=st.integers(1, N))
    def eval_step(self, seed, size):
        idx, z = self.batch(seed, size, False)
        before = self.bank().clone()
        self.crit.eval()
        try:
            with torch.no_grad():
                self.crit(z, idx)
        finally:
            self.crit.train()
        assert torch.equal(self.bank(), before), "eval() wrote the bank"

    @rule(seed=st.integers(0, 2 ** 16), case=st.sampled_from(["duplicate", "out_of_range", "classes", "dtype"]))
    def bad_step(self, seed, case):
        idx, z = self.batch(seed, 3, False)
        if case == "duplicate":
            idx[1] = idx[0]
        elif case == "out_of_range":
            idx[2] = N
        elif case == "classes":
            z = torch.randn(3, C + 1)
        else:
            idx = idx.float()
        self.expect_unchanged(lambda: self.crit(z, idx))

    @precondition(lambda self: self.kind == "host")
    @rule(seed=st.integers(0, 2 ** 16), size=st.integers(1, N))
    def prefetch(self, seed, size):
        self.crit.prefetch(self.batch(seed, size, False)[0])

    # ------------------------------------------------------------------ state dicts
    @rule()
    def snapshot(self):
        self.snapshots.append((copy.deepcopy(self.crit.state_dict()), self.model.alpha.clone()))

    @precondition(lambda self: self.snapshots)
    @rule(data=st.data())
    def load_snapshot(self, data):
        state, bank = data.draw(st.sampled_from(self.snapshots))
        self.crit.load_state_dict(copy.deepcopy(state))
        self.model.alpha.copy_(bank)

    @rule(case=st.sampled_from(["value", "shape", "labels_range", "labels_length"]),
          bad=st.sampled_from(BAD_VALUES), row=st.integers(0, N - 1))
    def load_corrupt_state(self, case, bad, row):
        state = copy.deepcopy(self.crit.state_dict())
        key = bank_key(state)
        if case == "value":
            if bad == "overflow":
                state[key], bad = state[key].double(), 1e300
            state[key][row % state[key].shape[0], row % C] = bad
        elif case == "shape":
            state[key] = state[key][:, :-1]
        elif "given_labels" in state and case == "labels_range":
            state["given_labels"][row] = C
        elif "given_labels" in state:
            state["given_labels"] = state["given_labels"][:1]
        else:
            state[key][row % state[key].shape[0]] = float("nan")
        self.expect_unchanged(lambda: self.crit.load_state_dict(state))

    # ------------------------------------------------------------------ casts
    @rule(cast=st.sampled_from(["half", "double", "bfloat16", "float"]))
    def module_cast(self, cast):
        """A module cast keeps the bank's dtype and values (the bank is state, not a parameter)."""
        before = self.bank().clone()
        model = torch.nn.Sequential(torch.nn.Linear(2, 2), self.crit)
        if cast == "bfloat16":
            model.to(torch.bfloat16)
        else:
            getattr(model, cast)()
        model.float()
        assert self.crit.alpha.dtype == self.bank_dtype
        assert torch.equal(self.bank(), before)

    # ------------------------------------------------------------------ shard files (distributed kinds)
    def folder(self) -> str:
        path = os.path.join(self.tmp.name, f"save-{len(os.listdir(self.tmp.name))}")
        os.makedirs(path)
        return path

    @precondition(lambda self: self.kind in ("replicated", "sharded"))
    @rule()
    def save_bank(self):
        folder = self.folder()
        D.save_bank(self.crit, folder)
        self.saves.append((folder, self.model.alpha.clone()))

    @precondition(lambda self: self.saves)
    @rule(data=st.data())
    def load_bank(self, data):
        folder, bank = data.draw(st.sampled_from(self.saves))
        D.load_bank(self.crit, folder)
        self.model.alpha.copy_(bank)

    @precondition(lambda self: self.kind in ("replicated", "sharded"))
    @rule(world=st.integers(2, 3), seed=st.integers(0, 2 ** 16))
    def load_bank_of_another_world(self, world, seed):
        """A save made by ``world`` ranks (written here rank by rank, as they would)."""
        g = torch.Generator().manual_seed(seed)
        bank = (self.model.alpha.double() * (0.5 + torch.rand(N, C, generator=g, dtype=torch.float64)))
        bank = bank.to(self.bank_dtype)
        folder, save_id = self.folder(), SF.new_save_id()
        entries = [SF.write_shard(SF.shard_path(folder, r, world), bank[r::world],
                                  {"save_id": save_id, "world": world, "rank": r, "num_samples": N,
                                   "num_classes": C}) for r in range(world)]
        SF.write_manifest(folder, save_id, N, C, self.bank_dtype, entries)
        D.load_bank(self.crit, folder)
        self.model.alpha.copy_(bank)
        self.saves.append((folder, bank))

    @precondition(lambda self: self.saves)
    @rule(data=st.data(), damage=st.sampled_from(["truncate", "flip", "no_manifest", "no_shard", "extra"]))
    def load_damaged_save(self, data, damage):
        source, _ = data.draw(st.sampled_from(self.saves))
        folder = self.folder()
        for name in os.listdir(source):
            with open(os.path.join(source, name), "rb") as f, open(os.path.join(folder, name), "wb") as g:
                g.write(f.read())
        shard = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))[-1]
        path = os.path.join(folder, shard)
        if damage == "truncate":
            os.truncate(path, os.path.getsize(path) - 1)
        elif damage == "flip":
            with open(path, "r+b") as f:
                f.seek(-1, 2)
                last = f.read(1)
                f.seek(-1, 2)
                f.write(bytes([last[0] ^ 0x40]))
        elif damage == "extra":
            with open(path, "ab") as f:
                f.write(b"\0" * 8)
        else:
            os.remove(path if damage == "no_shard" else SF.manifest_path(folder))
        self.expect_unchanged(lambda: D.load_bank(self.crit, folder), (ValueError, FileNotFoundError))

    @precondition(lambda self: self.saves)
    @rule(data=st.data())
    def interrupted_save_over_a_save(self, data):
        """A save that dies before its manifest: the folder loads as the previous save whole (its
        files untouched, e.g. a save of another world size) or not at all, never as a mix."""
        folder, previous = data.draw(st.sampled_from(self.saves))
        commit = SF.write_manifest

        def dies(*args, **kwargs):
            raise OSError("disk full (simulated)")

        SF.write_manifest = dies
        try:
            with pytest.raises(OSError):
                D.save_bank(self.crit, folder)
        finally:
            SF.write_manifest = commit
        self.saves = [(f, b) for f, b in self.saves if f != folder]
        bank = self.bank().clone()
        try:
            D.load_bank(self.crit, folder)
        except (ValueError, FileNotFoundError):
            assert torch.equal(self.bank(), bank), "a failing load changed the bank"
            return
        self.model.alpha.copy_(previous)
        self.saves.append((folder, previous))

    # ------------------------------------------------------------------ the invariant
    @invariant()
    def bank_equals_the_model(self):
        assert torch.equal(self.bank(), self.model.alpha), f"{self.kind}: the bank left the model bank"
        assert torch.equal(self.crit.given_labels.cpu(), LABELS)


def _machine_for(kind, dtype):
    return type(f"BankMachine_{kind}", (BankMachine,), {"kind": kind, "bank_dtype": dtype})


@pytest.fixture(scope="module")
def one_rank_group():
    """A one-rank gloo group for the distributed kinds (torn down after this module)."""
    with one_rank_gloo():
        yield


def run_machine(machine, examples: int, steps: int) -> None:
    if not FUZZ:
        machine.TestCase.settings = settings(PROFILE, max_examples=examples, stateful_step_count=steps)
        machine.TestCase().runTest()
        return
    start, done = time.monotonic(), 0
    machine.TestCase.settings = settings(PROFILE, max_examples=50, stateful_step_count=steps * 2)
    try:
        while time.monotonic() - start < FUZZ_SECONDS:
            machine.TestCase().runTest()
            done += 50
    finally:
        _report(done, time.monotonic() - start)


@pytest.mark.parametrize("kind", KINDS)
def test_bank_state_machine(kind, one_rank_group):
    run_machine(_machine_for(kind, torch.float32), examples=20, steps=30)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bank_state_machine_16_bit(dtype):
    run_machine(_machine_for("host", dtype), examples=6, steps=20)
