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
DT = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}


def dps_case(name, b, c, v, z="fp32", bank="fp32", idx="i64", reduction=1, posterior=True, update=True,
             temper=False, grad=True, soft=False):
    return dict(kind="dps", name=name, shape=[v, b, c], z=z, bank=bank, idx=idx, reduction=reduction,
                posterior=posterior, update=update, temper=temper, grad=grad, soft=soft)


def supcon_case(name, m, d, k, direction):
    return dict(kind="supcon", name=name, m=m, d=d, k=k, direction=direction)


CASES = [
    # the benchmark shapes of issue #4, with the launchers' (ROWS, BLOCK_C, warps)
    dps_case("dps 256x100 fp32/fp32 mean", 256, 100, 1),
    dps_case("dps 1024x1000 bf16/bf16 mean", 1024, 1000, 1, z="bf16", bank="bf16"),
    dps_case("dps 65536x1000 bf16/fp32 sum i32-index", 65536, 1000, 1, z="bf16", idx="i32", reduction=2),
    dps_case("dps 8192x32000 fp32/fp32 none", 8192, 32000, 1, reduction=0),
    dps_case("dps 8192x32000 fp16/bf16 mean", 8192, 32000, 1, z="fp16", bank="bf16"),
    dps_case("dps 2 views 1024x1000 tau_e fp32 mean", 1024, 1000, 2, temper=True),
    dps_case("dps 2 views 4096x32000 bf16 no-grad", 4096, 32000, 2, z="bf16", grad=False),
    dps_case("dps update-only 4096x10", 4096, 10, 1, posterior=False),
    dps_case("soft-ce 4096x1000 fp32", 4096, 1000, 1, soft=True),
    dps_case("soft-ce 4096x131072 bf16", 4096, 131072, 1, z="bf16", bank="bf16", soft=True),
    supcon_case("supcon fwd hard d=128", 65536, 128, 1, "fwd"),
    supcon_case("supcon bwd hard d=128", 65536, 128, 1, "bwd"),
    supcon_case("supcon fwd soft k=10 d=128", 8192, 128, 10, "fwd"),
    supcon_case("supcon bwd soft k=10 d=128", 8192, 128, 10, "bwd"),
    supcon_case("supcon fwd soft k=1000 d=128", 8192, 128, 1000, "fwd"),
    supcon_case("supcon bwd soft k=1000 d=128", 8192, 128, 1000, "bwd"),
    supcon_case("supcon fwd hard d=256", 8192, 256, 1, "fwd"),
    supcon_case("supcon bwd hard d=256", 8192, 256, 1, "bwd"),
]


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
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    if case["kind"] == "dps":
        from dps_fast.kernels import dps_cross_entropy as K
        v, b, c = case["shape"]
        rows, block_c, warps = case.get("override") or K._config(b, c, v)
        fn = K._dps_ce_kernel
        z, bank = DT[case["z"]], DT[case["bank"]]
        types = dict(Z=f"*{z}", IDX=f"*{case['idx']}" if not case["soft"] else f"*{z}", A=f"*{bank}",
                     G=f"*{z}", LOSS="*fp32", PART="*fp32", TICKET="*i32", B="i32", C="i32", N="i32",
                     stride_a="i64", gamma="fp32", inv_tau_e="fp32", gscale="fp32", out_scale="fp32")
        nprog = triton.cdiv(b, rows)
        soft = case["soft"]
        const = dict(V=v, VP=triton.next_power_of_2(v), ROWS=rows, BLOCK_C=block_c,
                     POSTERIOR=case["posterior"] and not soft, UPDATE=case["update"] and not soft,
                     TEMPER=case["temper"], HAS_GRAD=case["grad"], REDUCE=case["reduction"],
                     NORMALIZE=True, HAS_IDX=not soft, BLOCK_P=min(1024, triton.next_power_of_2(nprog)))
        cfg = dict(ROWS=rows, BLOCK_C=block_c, num_warps=warps)
    else:
        from dps_fast.kernels import supcon as K
        hard = case["k"] == 1
        fwd = case["direction"] == "fwd"
        blocks = K._fwd_blocks if fwd else K._blocks
        bm, bn, bd, bk, warps = case.get("override") or blocks(case["m"], case["d"], case["k"])
        fn = K._supcon_fwd_kernel if fwd else K._supcon_bwd_kernel
        types = dict(F="*fp32", LAB="*i64" if hard else "*fp32", T="*fp32", M="i32", D="i32", K="i32",
                     inv_tau="fp32")
        if fwd:
            types.update(LSE="*fp32", WSUM="*fp32", WDOT="*fp32")
        else:
            types.update(LSE="*fp32", COEF="*fp32", INVW="*fp32", DF="*fp32")
        const = dict(HARD=hard, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_K=bk)
        if fwd:
            const["DCHUNK"] = K._dchunk(bd)
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps)
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
        results = list(ex.map(compile_case, CASES))
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
