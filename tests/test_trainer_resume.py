"""dps-train never loses work and never lies: run-folder refusals, resume checks, Ctrl-C.

Each refusal is checked for its exact message and for leaving every file as it was.
Runs call ``main`` in-process on digits with a tiny MLP (about a second each).
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dps_fast.train import cli as Tr
from dps_fast.train import loop as Lp
from dps_fast.train import rundir as Rd

from _trainer_helpers import cli, error_of, keep_threads  # noqa: F401 (keep_threads: autouse fixture)

BASE = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--batch-size", "64", "--threads", "1",
        "--no-plots", "--no-progress", "--method", "dps", "--noise", "sym", "--noise-rate", "0.2"]


def snapshot(folder) -> dict:
    """path -> sha256 of every file under folder."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def comparable(final: dict) -> tuple:
    hist = [{k: v for k, v in h.items() if k not in ("epoch_s", "img_per_s")} for h in final["history"]]
    return final["model_sha"], final["final"], hist


@pytest.fixture
def done_run(tmp_path, capsys):
    """A finished 2-epoch run in tmp_path/r, and a snapshot of its files."""
    out = tmp_path / "r"
    code, _, err = cli(capsys, *BASE, "--epochs", "2", "--out", str(out))
    assert code == 0, err
    return out, snapshot(out)


# ---------------------------------------------------------------- the run folder
def test_existing_run_is_refused_and_kept(done_run, capsys):
    out, before = done_run
    assert error_of(capsys, *BASE, "--epochs", "2", "--out", str(out)) == (
        f"{out}/dps already holds a run; continue it with --resume, replace it with --overwrite, or choose "
        f"another --out")
    assert snapshot(out) == before


def test_overwrite_replaces_only_the_trainers_files(done_run, capsys):
    out, before = done_run
    (out / "dps" / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *BASE, "--epochs", "1", "--out", str(out), "--overwrite")
    assert code == 0, err
    assert (out / "dps" / "notes.txt").read_text() == "mine"
    assert torch.load(out / "dps" / "checkpoint.pt", weights_only=True)["epoch"] == 0
    assert len(json.loads((out / "dps" / "final.json").read_text())["history"]) == 1


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    out = tmp_path / "typo"
    assert error_of(capsys, *BASE, "--epochs", "2", "--out", str(out), "--resume") == (
        f"--resume: no checkpoint.pt in {out}/dps (is --out right?); to start a new run, leave out --resume")
    assert not out.exists()


@pytest.mark.parametrize("change, diff", [
    (["--lr", "0.1"], "lr: 0.05 -> 0.1"),
    (["--noise-rate", "0.3"], "noise_rate: 0.2 -> 0.3"),
    (["--noise", "none", "--noise-rate", "0"], "noise: 'sym' -> 'none'; noise_rate: 0.2 -> 0.0"),
    (["--width", "32"], "width: 16 -> 32"),
    (["--model", "cnn"], "model: 'mlp' -> 'cnn'"),
    (["--epochs", "4"], "epochs: 2 -> 4"),
    (["--seed", "1"], "seed: 0 -> 1"),
    (["--gamma", "0.9"], "gamma: 0.95 -> 0.9"),
    (["--tau-e-adapt", "2"], "tau_e: 'auto' -> 1.0; tau_e_adapt: 0.0 -> 2.0"),
    (["--tau-e", "1"], "tau_e: 'auto' -> 1.0"),
    (["--no-augment"], "augment: True -> False"),
])
def test_resume_refuses_a_changed_setting_and_writes_nothing(done_run, capsys, change, diff):
    out, before = done_run
    argv = BASE + ["--epochs", "2", "--out", str(out), "--resume"]
    for flag in change[::2]:  # replace the flag's base value
        if flag in argv and flag != "--no-augment":
            k = argv.index(flag)
            del argv[k:k + 2]
    msg = error_of(capsys, *argv, *change)
    assert msg == (f"--resume: {out}/dps/checkpoint.pt was trained with other settings ({diff}); resume with the "
                   f"saved settings, or start a new run with --overwrite or another --out")
    assert snapshot(out) == before


def test_settings_of_other_methods_do_not_block_resume(done_run, capsys):
    out, _ = done_run  # ls_eps means nothing to a dps run
    code, stdout, err = cli(capsys, *BASE, "--epochs", "2", "--out", str(out), "--resume", "--ls-eps", "0.3")
    assert code == 0, err
    assert "already complete (2/2 epochs)" in stdout


def test_every_argument_is_classified():
    dests = {a.dest for a in Tr.build_parser()._actions if a.dest != "help"}
    method_keys = {k for keys in Rd.METHOD_KEYS.values() for k in keys}
    groups = [set(Rd.RESULT_KEYS), method_keys, set(Rd.RUNTIME_KEYS) - {"world"}, set(Rd.NOT_SAVED)]
    assert set().union(*groups) == dests, "classify a new argument in rundir.py: result-changing or runtime"
    assert sum(len(g) for g in groups) == len(dests), "an argument is in two classes"


def test_unreadable_checkpoint(done_run, capsys):
    out, _ = done_run
    (out / "dps" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    msg = error_of(capsys, *BASE, "--epochs", "2", "--out", str(out), "--resume")
    assert msg.startswith(f"{out}/dps/checkpoint.pt cannot be read as a dps-train checkpoint (")
    assert msg.endswith("); move it away or use --overwrite")


def test_bank_placement_must_match_on_resume(tmp_path, capsys):
    out = tmp_path / "r"
    code, _, err = cli(capsys, *BASE, "--epochs", "2", "--stop-after", "1", "--bank", "host", "--out", str(out))
    assert code == 0, err
    assert error_of(capsys, *BASE, "--epochs", "2", "--out", str(out), "--resume") == (
        f"--resume: {out}/dps/checkpoint.pt keeps its DPS bank in host memory (--bank host), this run would use "
        f"checkpoint.pt (one process); resume with the saved --nproc/--bank")


@pytest.mark.parametrize("damage", ["nan", "labels"])
def test_a_checkpoint_whose_bank_fails_its_checks_is_one_line_and_changes_nothing(tmp_path, capsys, damage):
    """The bank loads first and verifies before it writes (docs/method.md §8.1): a NaN mass or a
    label out of range is a one-line error naming the file, every file as it was."""
    out = tmp_path / "r"
    assert cli(capsys, *BASE, "--epochs", "2", "--stop-after", "1", "--out", str(out))[0] == 0
    ckpt = out / "dps" / "checkpoint.pt"
    st = torch.load(ckpt, weights_only=True)
    if damage == "nan":
        st["method"]["alpha"][3, 2] = float("nan")
    else:
        st["method"]["given_labels"][5] = 10  # digits: classes 0..9
    torch.save(st, ckpt)
    before = snapshot(out)
    msg = error_of(capsys, *BASE, "--epochs", "2", "--out", str(out), "--resume")
    assert msg.startswith(f"{ckpt}: the saved bank does not load (")
    assert ("holds nan" if damage == "nan" else "label 10 is out of range for 10 classes") in msg
    assert msg.endswith("; start a new run with --overwrite")
    assert snapshot(out) == before


def test_changed_data_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x=rng.random((80, 6, 6)).astype(np.float32), y=np.arange(80) % 4)
    argv = ["--dataset", f"npz:{p}", "--model", "mlp", "--width", "8", "--epochs", "2", "--batch-size", "16",
            "--threads", "1", "--no-plots", "--out", str(tmp_path / "r")]
    code, _, err = cli(capsys, *argv, "--stop-after", "1")
    assert code == 0, err
    digest = torch.load(tmp_path / "r" / "dps" / "checkpoint.pt", weights_only=True)["config"]["data_sha"]
    np.savez(p, x=rng.random((80, 6, 6)).astype(np.float32), y=np.arange(80) % 4)
    msg = error_of(capsys, *argv, "--resume")
    assert msg.startswith(f"--resume: the data differ from those {tmp_path}/r/dps was trained on (fingerprint "
                          f"{digest} -> ")
    assert msg.endswith(": a changed file, --data-root or subset); resume with the same data, or start a new run "
                        "with --overwrite")


# ---------------------------------------------------------------- resuming is exact, and recorded
def test_stop_after_and_resume_equal_one_run(tmp_path, capsys):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert cli(capsys, *BASE, "--epochs", "3", "--out", str(ref))[0] == 0
    code, out, _ = cli(capsys, *BASE, "--epochs", "3", "--out", str(cut), "--stop-after", "1")
    assert code == 0 and "paused (--stop-after): dps; continue with:" in out
    assert not (cut / "dps" / "final.json").exists()
    code, out, err = cli(capsys, *BASE, "--epochs", "3", "--out", str(cut), "--stop-after", "1", "--resume",
                         "--eval-batch", "100")
    assert code == 0, err
    a = json.loads((ref / "dps" / "final.json").read_text())
    b = json.loads((cut / "dps" / "final.json").read_text())
    assert comparable(a) == comparable(b)
    assert [s["start_epoch"] for s in b["segments"]] == [0, 1]
    assert b["config"]["eval_batch"] == 100 and b["config"]["lr"] == a["config"]["lr"]


def _interrupt_at_step(monkeypatch, step: int, times: int = 1):
    """Sends SIGINT to this process at training step ``step`` (``times`` signals)."""
    real, calls = Lp.train_step, {"n": 0}

    def step_and_signal(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
        return real(*a, **k)

    monkeypatch.setattr(Lp, "train_step", step_and_signal)


@pytest.mark.parametrize("extra", [["--tau-e", "1"], ["--tau-e-adapt", "2"], []],
                         ids=["fixed-tau_e", "adaptive-tau_e", "auto-tau_e (the default)"])
def test_ctrl_c_mid_epoch_saves_and_resumes_bit_for_bit(tmp_path, capsys, monkeypatch, extra):
    """With --tau-e-adapt, the resumed epoch must keep the tau_e it started with, not one
    recomputed from the half-updated bank."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert cli(capsys, *BASE, *extra, "--epochs", "2", "--out", str(ref))[0] == 0
    _interrupt_at_step(monkeypatch, 30)  # epoch 2 (23 steps an epoch), batch 7
    argv = [*BASE, *extra, "--epochs", "2", "--out", str(cut)]
    code, out, err = cli(capsys, *argv)
    assert code == 130
    assert (f"dps-train: [dps] interrupted after 7 batches into epoch 2 of 2; checkpoint saved: "
            f"{cut}/dps/checkpoint.pt\nresume with:\n  ") in err
    assert err.strip().endswith(Rd.resume_command(argv).split(" -m dps_fast.train ")[-1])
    st = torch.load(cut / "dps" / "checkpoint.pt", weights_only=True)
    assert st["epoch"] == 0 and st["partial"]["done"] == 7
    monkeypatch.undo()
    code, out, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert "after 1/2 epochs, 7 batches into epoch 2" in out
    a = json.loads((ref / "dps" / "final.json").read_text())
    b = json.loads((cut / "dps" / "final.json").read_text())
    assert comparable(a) == comparable(b)
    assert b["segments"][1] == {"start_epoch": 1, "start_batch": 7, "device": "cpu", "backend": None, "world": 1,
                                "bank": "auto", "threads": 1}


def test_second_ctrl_c_quits_at_once_keeping_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    _interrupt_at_step(monkeypatch, 30, times=2)
    argv = [*BASE, "--epochs", "2", "--out", str(tmp_path)]
    code, out, err = cli(capsys, *argv)
    assert code == 130 and "Traceback" not in err
    assert "dps-train: interrupted; resume from the last checkpoint with:\n" in err
    st = torch.load(tmp_path / "dps" / "checkpoint.pt", weights_only=True)
    assert st["epoch"] == 0 and "partial" not in st


def test_sigint_to_the_console_script(tmp_path):
    argv = [sys.executable, "-m", "dps_fast.train", *BASE, "--epochs", "200", "--batch-size", "8",
            "--out", str(tmp_path)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    ckpt = tmp_path / "dps" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and "checkpoint saved" in err
    assert f" -m dps_fast.train {' '.join(argv[3:])} --resume" in err.split("resume with:\n")[1]


def test_compare_resumes_every_method(tmp_path, capsys):
    argv = [*BASE, "--compare", "ce,dps", "--epochs", "2", "--out", str(tmp_path)]
    code, out, _ = cli(capsys, *argv, "--stop-after", "1")
    assert code == 0 and "paused (--stop-after): ce, dps" in out
    assert error_of(capsys, *argv).startswith(f"{tmp_path}/ce, {tmp_path}/dps already hold a run;")
    code, out, err = cli(capsys, *argv, "--resume")
    assert code == 0, err
    assert "| ce |" in out and "| dps |" in out
    assert [r["method"] for r in json.loads((tmp_path / "compare.json").read_text())["results"]] == ["ce", "dps"]
    assert error_of(capsys, *argv).startswith(f"{tmp_path}/ce, {tmp_path}/dps, {tmp_path}/compare.json already")


def test_resume_command():
    cmd = Rd.resume_command(["--out", "runs/a b", "--overwrite", "--lr", "0.1"])
    assert cmd.endswith("-m dps_fast.train --out 'runs/a b' --lr 0.1 --resume")


def test_adaptive_tau_e_is_set_from_the_bank_each_epoch(tmp_path, capsys, monkeypatch):
    """--tau-e-adapt K: each epoch's tau_e is max(0.1, 1 - K * the bank's mean label-error
    score at its start) (docs/results.md section 5); it is logged and checkpointed."""
    from dps_fast.train import methods as Me

    seen = []
    real = Me.DPS.start_epoch

    def spy(self, epoch):
        expected = max(0.1, 1.0 - 2.0 * self.dps.mean_label_error()) if self.adapted_epoch != epoch else None
        real(self, epoch)
        seen.append((expected, self.dps.tau_e))

    monkeypatch.setattr(Me.DPS, "start_epoch", spy)
    code, out, err = cli(capsys, *BASE, "--tau-e-adapt", "2", "--epochs", "3", "--out", str(tmp_path))
    assert code == 0, err
    assert len(seen) == 3 and all(e == pytest.approx(t) for e, t in seen)
    assert seen[0][1] == pytest.approx(1.0, abs=0.05) and seen[2][1] < seen[0][1]  # 20% noise lowers it
    hist = json.loads((tmp_path / "dps" / "final.json").read_text())["history"]
    assert [h["tau_e"] for h in hist] == pytest.approx([t for _, t in seen])
    assert f"tau_e {seen[2][1]:.3f}" in out
    st = torch.load(tmp_path / "dps" / "checkpoint.pt", weights_only=True)
    assert st["method_scalars"] == {"tau_e": pytest.approx(seen[2][1]), "adapted_epoch": 2, "tau_e_auto": []}
