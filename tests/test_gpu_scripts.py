"""The GPU check scripts, exercised on the CPU so a scarce GPU session never meets a script bug.

`gpu_bench.py --cpu-dry-run` runs the same case list, timing, byte model, budget
and incremental JSON logic on tiny shapes with the cpu backend.
"""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
BENCH = os.path.join(ROOT, "benchmarks", "gpu_bench.py")


def _run(tmp_path, *extra):
    out = tmp_path / "bench.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, BENCH, "--cpu-dry-run", "--out", str(out), *extra], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(out.read_text())


def test_gpu_bench_dry_run_writes_every_row(tmp_path):
    import dps_fast
    if not dps_fast._dispatch.available("cpu", "cpu"):
        pytest.skip("the cpu backend (C++ extension) is not built")
    res = _run(tmp_path, "--quick")
    assert res["complete"] and not res["skipped"]
    assert res["copy_gbps"] > 0 and res["backends"] == ["cpu"]
    # quick: 2 shapes x 4 dtype pairs, and the first SupCon size
    assert len(res["dps"]) == 8 and len(res["supcon"]) == 1
    for row in res["dps"]:
        isz = {"torch.float32": 4, "torch.bfloat16": 2}
        assert row["bytes"] == 2 * row["B"] * row["C"] * (isz[row["logits"]] + isz[row["bank"]]) + 8 * row["B"]
        assert row["cpu_ms"] > 0 and row["eager_ms"] > 0 and row["cpu_vs_eager"] > 0
        assert "cpu_error" not in row and "eager_error" not in row
    assert res["supcon"][0]["cpu_ms"] > 0 and res["supcon"][0]["eager_ms"] > 0


def test_gpu_bench_budget_skips_and_keeps_finished_rows(tmp_path):
    import dps_fast
    if not dps_fast._dispatch.available("cpu", "cpu"):
        pytest.skip("the cpu backend (C++ extension) is not built")
    res = _run(tmp_path, "--quick", "--budget-s", "0")
    # the first case always starts (budget checked before each later one)
    assert len(res["dps"]) == 1 and not res["complete"]
    assert len(res["skipped"]) == 8


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def _sanitizer_workloads():
    """The Python workloads gpu_check.sh feeds to compute-sanitizer (heredocs after the command)."""
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        text = f.read()
    blocks = re.findall(r"compute-sanitizer --tool (\w+)(?:[^\n]*\n)?[^\n]*<<'PYEOF'\n(.*?)\nPYEOF", text, re.S)
    return dict(blocks)


def test_gpu_check_sanitizer_workloads_run_on_cpu(tmp_path):
    """memcheck's and racecheck's workloads, on CPU tensors with the cpu backend: a script bug
    shows here, not in a GPU session."""
    import dps_fast
    if not dps_fast._dispatch.available("cpu", "cpu"):
        pytest.skip("the cpu backend (C++ extension) is not built")
    workloads = _sanitizer_workloads()
    assert set(workloads) == {"memcheck", "racecheck"}
    env = dict(os.environ, TRITON_INTERPRET="0")  # the cpu backend only: Triton needs a GPU then
    for tool, code in workloads.items():
        code = code.replace('"cuda"', '"cpu"').replace("torch.cuda.synchronize()", "None")
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0 and "workload done" in r.stdout, f"{tool}: {r.stdout}{r.stderr}"
