"""Compile every Triton kernel ahead of time for a real GPU (sm_90), without a GPU.

The test suite runs the Triton kernels only in the interpreter here, which accepts
programs that the real compiler rejects (layout/type errors, unsupported ops) and
says nothing about registers or spills. This check runs Triton's full pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin, with the ptxas that ships in the triton
wheel) for the configurations the GPU launchers actually pick, and reports
registers, spills and shared memory per kernel from `ptxas -v`.

    python tools/triton_aot_check.py [--json benchmarks/results/triton-aot-sm90.json]

Exit status 1 when any kernel fails to compile or spills.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"  # the real compiler, and the launchers' GPU configs

ARCH = 90


def all_cases():
    """Every kernel module's AOT cases (``aot_cases()``): the configs its GPU launcher picks."""
    import importlib
    import pkgutil

    import dps_fast.kernels as K
    out = []
    for m in sorted(pkgutil.iter_modules(K.__path__), key=lambda m: m.name):
        mod = importlib.import_module(f"dps_fast.kernels.{m.name}")
        out += [dict(case, module=mod.__name__) for case in getattr(mod, "aot_cases", lambda: [])()]
    return out


def _ptxas_stats(ptx: str):
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([get_ptxas(ARCH).path, f"-arch=sm_{ARCH}a", "-v", p, "-o", os.path.join(d, "k.cubin")],
                           capture_output=True, text=True)
    out = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    stack = re.search(r"(\d+) bytes stack frame", out)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else None,
                spill_load_bytes=int(spill.group(2)) if spill else None,
                stack_bytes=int(stack.group(1)) if stack else None)


def compile_case(case):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    fn, types, const, cfg = importlib.import_module(case["module"]).aot_signature(case)
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    missing = [n for n in fn.arg_names if sig[n] == "constexpr" and n not in const]
    if missing:
        return dict(case=case["name"], ok=False, error=f"no type or value for {missing}")
    try:
        k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", ARCH, 32),
                           options=dict(num_warps=cfg["num_warps"]))
    except Exception as e:  # noqa: BLE001 - reported, and the check fails
        return dict(case=case["name"], ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    stats = _ptxas_stats(k.asm["ptx"])
    ok = bool(k.asm.get("cubin")) and stats["spill_store_bytes"] in (0, None)
    return dict(case=case["name"], ok=ok, kernel=fn.__name__, config=cfg, shared_bytes=k.metadata.shared,
                cubin_bytes=len(k.asm["cubin"]), compile_s=round(time.time() - t0, 1), **stats)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="write the per-kernel report here")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args()
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia.compiler import get_ptxas
        get_ptxas(ARCH).path
    except Exception as e:  # noqa: BLE001
        print(f"triton AOT check: skipped, no triton with its NVIDIA backend ({e})")
        return 0
    t0 = time.time()
    with ProcessPoolExecutor(a.jobs) as ex:
        results = list(ex.map(compile_case, all_cases()))
    bad = 0
    for r in results:
        if r["ok"]:
            print(f"  ok   {r['case']:<42} {r['kernel']:<20} regs {r['registers']:>3}  spill {r['spill_store_bytes']}B"
                  f"  smem {r['shared_bytes']:>6}B  {r['config']}")
        else:
            bad += 1
            print(f"  FAIL {r['case']}: {r.get('error') or 'spills ' + str(r.get('spill_store_bytes'))}")
    import triton
    print(f"triton {triton.__version__} AOT compile for sm_{ARCH}: {len(results) - bad}/{len(results)} kernels ok"
          f" in {time.time() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(arch=f"sm_{ARCH}", triton=triton.__version__, date=time.strftime("%Y-%m-%d"),
                           results=results), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
