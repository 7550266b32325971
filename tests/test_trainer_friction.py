"""dps-train's first-week friction (issue 28, item 6), one test each: ids are the user's own
.npz rows, dependencies are checked before the start, soft labels are exported (and the
example that uses them runs), --nproc writes valid JSON, SIGTERM saves like Ctrl-C, and
--noise sym says how many labels end up wrong.
"""
import csv
import importlib.util
import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dps_fast import load_soft_labels

from _trainer_helpers import cli, error_of, keep_threads  # noqa: F401 (keep_threads: autouse fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = ["--model", "mlp", "--width", "64", "--batch-size", "64", "--threads", "1", "--no-plots", "--no-progress",
        "--no-augment", "--weight-decay", "0"]


def noisy_digits_npz(path, rate=0.15):
    """digits with ``rate`` of the labels changed in the file itself; returns (y as written, changed rows)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    y = d.target.copy()
    changed = rng.choice(len(y), int(rate * len(y)), replace=False)
    y[changed] = (y[changed] + rng.integers(1, 10, len(changed))) % 10
    np.savez(path, x=(d.images / 16).astype(np.float32), y=y)
    return y, set(changed.tolist())


# ---------------------------------------------------------------- ids are the user's rows
def test_npz_without_test_split_reports_the_files_rows(tmp_path, capsys):
    y, changed = noisy_digits_npz(tmp_path / "d.npz")
    code, out, err = cli(capsys, "--dataset", f"npz:{tmp_path / 'd.npz'}", *FAST, "--epochs", "12",
                         "--label-issues", "--noise", "sym", "--noise-rate", "0.05", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "has no x_test: 360 rows (a stratified 20%) are held out for testing" in out
    split = json.loads((tmp_path / "r" / "dps" / "data_split.json").read_text())
    train, test = split["train_rows"], split["test_rows"]
    assert sorted(train + test) == list(range(len(y)))  # the held-out split is written down
    noisy = torch.load(tmp_path / "r" / "dps" / "noisy_labels.pt", weights_only=True)
    assert noisy["rows"].tolist() == train and torch.equal(noisy["clean"], torch.from_numpy(y[train]))
    with open(tmp_path / "r" / "dps" / "label_issues.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "no label issue flagged"
    for r in rows:  # 'index' is the file's row: its label is the file's (or the injected noise's)
        assert int(r["index"]) == train[int(r["sample"])]
        assert int(r["given_label"]) == int(noisy["noisy"][int(r["sample"])])
    injected = {train[k] for k in torch.nonzero(noisy["noisy"] != noisy["clean"]).flatten().tolist()}
    wrong = changed | injected
    hits = sum(int(r["index"]) in wrong for r in rows)
    assert hits / len(rows) > 0.7, (hits, len(rows))  # the flagged rows are the file's wrong rows


# ---------------------------------------------------------------- dependencies before the start
@pytest.mark.parametrize("module, argv, msg", [
    ("sklearn", ["--demo"], "--dataset digits needs the package scikit-learn, which is not installed "
                            "(pip install scikit-learn)"),
    ("matplotlib", ["--epochs", "1"], "the plots (reliability.png, curves.png) needs the package matplotlib, "
                                      "which is not installed (pip install matplotlib); or pass --no-plots"),
    ("torchvision", ["--model", "torchvision:resnet18"], "--model torchvision:resnet18 needs the package "
                                                         "torchvision, which is not installed (pip install "
                                                         "torchvision)"),
])
def test_missing_packages_are_one_line_before_anything_starts(module, argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # absent, as after `pip install .` alone
    assert error_of(capsys, *argv, "--out", str(tmp_path / "r")) == msg
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- soft labels and the example
def test_export_soft_labels(tmp_path, capsys):
    code, out, err = cli(capsys, "--dataset", "digits", *FAST, "--epochs", "2", "--compare", "ce,dps",
                         "--export-soft-labels", "--out", str(tmp_path))
    assert code == 0, err
    assert "[ce] --export-soft-labels: no posterior bank in this method, nothing written" in out
    soft = load_soft_labels(str(tmp_path / "dps" / "soft_labels.safetensors")).targets().float()
    assert soft.shape == (1437, 10) and torch.allclose(soft.sum(1), torch.ones(1437), atol=1e-2)
    final = json.loads((tmp_path / "dps" / "final.json").read_text())
    assert final["soft_labels"]["path"] == "soft_labels.safetensors"


def test_example_train_flag_export_student(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("label_issues_to_student",
                                                  ROOT / "examples" / "label_issues_to_student.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    res = ex.main(["--out", str(tmp_path), "--epochs", "8"])
    assert res["flagged_and_changed"] / res["flagged"] > 0.7, res
    assert res["kept_training_samples"] < res["training_samples"]
    assert res["student_test_accuracy"] > 0.85, res


# ---------------------------------------------------------------- valid JSON, signals, noise
def test_nproc_writes_valid_json(tmp_path, capsys):
    code, _, err = cli(capsys, "--dataset", "digits", *FAST, "--epochs", "1", "--nproc", "2",
                       "--out", str(tmp_path))
    assert code == 0, err

    def no_constants(name):
        raise ValueError(f"{name} is not JSON")

    final = json.loads((tmp_path / "dps" / "final.json").read_text(), parse_constant=no_constants)
    assert final["timing"]["loss_ms"] is None and final["timing"]["batch"] == 32


def test_sigterm_saves_and_prints_the_resume_command(tmp_path):
    argv = [sys.executable, "-m", "dps_fast.train", "--dataset", "digits", *FAST, "--epochs", "200",
            "--batch-size", "8", "--out", str(tmp_path)]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    ckpt = tmp_path / "dps" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists() and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "SIGTERM: stopping after this batch to save a checkpoint" in out
    assert "Traceback" not in err and "checkpoint saved" in err
    assert f" -m dps_fast.train {' '.join(argv[3:])} --resume" in err.split("resume with:\n")[1]


def test_sym_noise_says_the_true_class_may_be_redrawn(tmp_path, capsys):
    code, out, err = cli(capsys, "--dataset", "digits", *FAST, "--epochs", "1", "--noise", "sym",
                         "--noise-rate", "0.3", "--out", str(tmp_path))
    assert code == 0, err
    realised = torch.load(tmp_path / "dps" / "noisy_labels.pt", weights_only=True)["info"]["realised"]
    assert (f"note: --noise sym 0.3 redraws 30% of the labels uniformly from all 10 classes, the true one "
            f"included, so about 27.0% end up wrong; realised: {100 * realised:.1f}% wrong labels "
            f"(--noise sym-exclusive makes exactly 30% wrong)") in out
