"""The device check (benchmarks/gpu_check.sh), exercised on the CPU so a scarce GPU session
never meets a script bug.

DRY_RUN=1 runs every stage's logic end to end on tiny shapes: CPU tensors, the cpu backend
and Triton's interpreter, the compile bound, the JSON lines, the stage records; what needs
CUDA (the build, compute-sanitizer) records itself as skipped.
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
STAGES = ["preflight", "build", "smoke", "kernel", "step", "tests", "memcheck", "racecheck"]
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _needs_cpu_ops():
    import dps_fast
    if not dps_fast._dispatch.available("cpu", "cpu"):
        pytest.skip("the cpu backend (C++ extension) is not built")


def _check(tmp_path, timeout=300, **env):
    out = tmp_path / "out"
    full = dict(os.environ, DRY_RUN="1", PYTHON=sys.executable, **env)
    t0 = time.time()
    r = subprocess.run(["bash", CHECK, str(out)], cwd=tmp_path, env=full, capture_output=True, text=True,
                       timeout=timeout)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    return r, rows, out, time.time() - t0


def _stages(rows):
    return {r["stage"]: r for r in rows if r.get("kind") == "stage"}


def test_gpu_check_dry_run_end_to_end(tmp_path):
    _needs_cpu_ops()
    r, rows, out, took = _check(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    plan = next(x for x in rows if x.get("kind") == "plan")
    assert plan["total_s"] == sum(plan["limits_s"].values()) <= 540 and list(plan["limits_s"]) == STAGES
    stages = _stages(rows)
    assert list(stages) == STAGES, "every stage records itself, in order"
    assert all(s["status"] in ("ok", "skipped") for s in stages.values()), stages
    assert {k for k, s in stages.items() if s["status"] == "skipped"} <= {"build", "memcheck", "racecheck"}
    assert stages["memcheck"]["reason"].startswith("skipped: no CUDA")
    assert len(os.listdir(out)) <= 8, "the device machine sends back at most 8 files"
    _check_measurements(rows)
    print(f"dry run of the device check: {took:.0f} s")


def _check_measurements(rows):
    from gpu_bench import KERNEL_CASES
    from common import dps_bytes, soft_ce_bytes
    smoke = [x for x in rows if x.get("kind") == "smoke"]
    assert smoke and all(x["status"] == "ok" for x in smoke), [x for x in smoke if x["status"] != "ok"]
    assert {x["backend"] for x in smoke} >= {"cpu"} and {x["op"] for x in smoke} == {"dps", "soft", "supcon"}
    kernel = [x for x in rows if x.get("kind") == "kernel"]
    assert len(kernel) == len(KERNEL_CASES) and all(x["status"] == "ok" for x in kernel)
    isz = {"float32": 4, "bfloat16": 2}
    for x in kernel:
        model = dps_bytes(x["B"], x["C"], x["V"], isz[x["logits"]], isz[x["bank"]]) if x["op"] == "dps" else \
            soft_ce_bytes(x["B"], x["C"], isz[x["logits"]], isz[x["bank"]])
        assert x["bytes"] == model and x["copy_ms"] > 0 and x["cpu_ms"] > 0 and x["cpu_of_copy"] > 0
    step = [x for x in rows if x.get("kind") == "step"]
    dps_steps = [x for x in step if x["op"] == "dps_step"]
    assert dps_steps and any(x["op"] == "supcon_step" for x in step)
    for x in dps_steps:
        assert x["cpu_ms"] > 0 and x["eager_ms"] > 0 and x["hand_ms"] > 0 and x["cpu_novalidate_ms"] > 0
        # the compiled by-hand step either ran or says why not (its warm-up is bounded)
        assert x.get("hand_compile_ms") or x["hand_compile_status"].startswith("skipped: ")


def test_gpu_check_refuses_a_plan_over_nine_minutes(tmp_path):
    r, rows, _, _ = _check(tmp_path, timeout=60, BUILD_S="400")
    assert r.returncode == 2 and "refused" in r.stdout
    plan = rows[0]
    assert plan["kind"] == "plan" and plan["total_s"] > plan["max_total_s"] == 540
    assert not _stages(rows), "no stage starts"


def test_gpu_check_reports_a_timeout_as_timeout(tmp_path):
    r, rows, _, _ = _check(tmp_path, timeout=60, STAGES="smoke", SMOKE_S="1")
    stages = _stages(rows)
    assert stages["smoke"]["status"] == "timeout" and r.returncode == 1
    assert all(stages[s]["status"] == "skipped" for s in STAGES if s != "smoke")


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", CHECK], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_compile_bound_gets_through_a_handler_that_swallows_it():
    """inductor wrapped or swallowed a first alarm (seen: 47 s past a 3 s bound); the bound
    keeps raising until the exception gets out."""
    import gpu_common as G
    t0, swallowed = time.time(), []
    with pytest.raises(RuntimeError, match="wrapped") as caught:
        with G.time_limit(0.2):
            while time.time() - t0 < 5:
                try:
                    time.sleep(0.05)
                except G.CompileTimeout as e:
                    if not swallowed:  # a library's broad except swallows the first
                        swallowed.append(e)
                        continue
                    raise RuntimeError("wrapped") from e  # and wraps the next
    assert time.time() - t0 < 2 and G.is_timeout(caught.value)
    assert G.is_timeout(RuntimeError("outer")) is False
    wrapped = RuntimeError("LoweringException")
    wrapped.__cause__ = G.CompileTimeout("compile exceeded its budget of 2 s")
    assert G.is_timeout(wrapped)


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_gpu_check_sanitizer_workloads_run_on_cpu(tmp_path, tool):
    """memcheck's and racecheck's workloads on CPU tensors with the cpu backend: a script bug
    shows here, not in a GPU session."""
    _needs_cpu_ops()
    env = dict(os.environ, DRY_RUN="1", TRITON_INTERPRET="0")  # the cpu backend only: Triton needs a GPU
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_smoke.py"), "workload", tool],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "workload done" in r.stdout, f"{tool}: {r.stdout}{r.stderr}"
