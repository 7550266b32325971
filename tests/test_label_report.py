"""dps-train --label-issues: label_issues.csv and the detection metrics in final.json."""
import csv
import json
import subprocess
import sys

import pytest

BASE = [sys.executable, "-m", "dps_fast.train", "--dataset", "digits", "--model", "mlp", "--width", "64",
        "--batch-size", "64", "--threads", "1", "--no-plots", "--no-augment", "--noise", "sym-exclusive",
        "--noise-rate", "0.3", "--label-issues", "--ood", "none"]


def _issues(folder):
    with open(folder / "label_issues.csv") as f:
        return list(csv.DictReader(f))


def test_label_issues_csv_and_metrics(tmp_path):
    r = subprocess.run(BASE + ["--compare", "ce,dps", "--epochs", "12", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=str(tmp_path), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "ce" / "label_issues.csv").exists()
    rows = _issues(tmp_path / "dps")
    final = json.loads((tmp_path / "dps" / "final.json").read_text())
    li = final["label_issues"]
    assert li["num_issues"] == len(rows) > 0 and li["selection"] == "estimated rate"
    assert [int(x["rank"]) for x in rows] == list(range(1, len(rows) + 1))
    scores = [float(x["score"]) for x in rows]
    assert scores == sorted(scores, reverse=True)
    assert all(x["given_label"] != x["suggested_label"] for x in rows)
    m = li["against_flip_mask"]
    assert set(m) >= {"precision", "recall", "f1", "auroc", "precision_at_k"}
    assert m["auroc"] > 0.8 and m["precision"] > 0.5, m  # 30% flips, a 12-epoch MLP on digits
    assert li["realised_rate"] == pytest.approx(0.3, abs=0.01)
    assert "label issues:" in r.stdout and "AUROC" in r.stdout
    assert "label_issues" not in json.loads((tmp_path / "ce" / "final.json").read_text())


def test_label_issues_on_a_sharded_bank(tmp_path):
    r = subprocess.run(BASE + ["--method", "dps", "--epochs", "2", "--nproc", "2", "--bank", "sharded",
                               "--out", str(tmp_path)], capture_output=True, text=True, cwd=str(tmp_path),
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = _issues(tmp_path / "dps")
    li = json.loads((tmp_path / "dps" / "final.json").read_text())["label_issues"]
    assert li["num_issues"] == len(rows) and li["num_samples"] == 1437
    assert len({x["index"] for x in rows}) == len(rows)
