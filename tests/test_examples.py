"""The recipes in examples/ run, on tiny settings, and do what their docstrings claim.

Lightning and transformers come from requirements-examples.txt (``make test`` installs
it); without them those tests are skipped with the install command as the reason.
"""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"{module} missing: pip install -r requirements-examples.txt")


def run_example(name, *args, cwd, timeout=300) -> str:
    # cwd outside the repo: `import dps_fast` must find the installed package
    r = subprocess.run([sys.executable, os.path.join(EXAMPLES, name), *args], capture_output=True, text=True,
                       cwd=str(cwd), env=ENV, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def report(out) -> dict:
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_plain_pytorch(tmp_path):
    out = run_example("plain_pytorch.py", "--epochs", "5", cwd=tmp_path)
    m = re.search(r"test accuracy ([\d.]+)%; (\d+) of 1437 training labels flipped; label_error finds them with "
                  r"AUROC ([\d.]+)", out)
    assert m, out
    assert float(m[1]) > 85 and int(m[2]) > 200 and float(m[3]) > 0.9


@needs("lightning")
def test_lightning_one_process_checkpoints_the_bank(tmp_path):
    run_example("lightning_dps.py", "--epochs", "2", "--out", str(tmp_path / "ck"), cwd=tmp_path)
    r = report(tmp_path / "ck")
    assert r["checkpoint_has_bank"] and r["load_from_checkpoint_restores_bank"]
    assert r["test_accuracy"] > 0.7 and r["flip_auroc"] > 0.8


@needs("lightning")
def test_lightning_ddp_two_processes(tmp_path):
    run_example("lightning_dps.py", "--epochs", "2", "--ddp", "2", "--out", str(tmp_path / "ck"), cwd=tmp_path)
    r = report(tmp_path / "ck")
    assert r["ranks_agree"] and r["each_sample_once_per_epoch"] and r["checkpoint_has_bank"]
    assert r["test_accuracy"] > 0.7


@needs("transformers")
@needs("accelerate")
def test_hf_trainer(tmp_path):
    run_example("hf_trainer_dps.py", "--epochs", "2", "--out", str(tmp_path / "hf"), cwd=tmp_path)
    r = report(tmp_path / "hf")
    assert r["bank_unchanged_by_eval"] and r["checkpoint_has_bank"]
    assert r["test_accuracy"] > 0.7 and r["flip_auroc"] > 0.8
