"""Compile-check every csrc/cuda/*.cu with nvcc for sm_90 (no GPU needed).

Kernel-only .cu files include no torch headers, so they compile in seconds. The
.cpp glue under csrc/cuda includes c10/cuda headers; against the CPU wheel those
need a stand-in for c10/cuda/impl/cuda_cmake_macros.h, generated into the build
dir (never committed).
"""
import glob
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> int:
    nvcc = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")
    cus = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if not cus:
        print("cuda-check: no .cu files")
        return 0
    if not nvcc:
        print("cuda-check: nvcc not found; CUDA kernels not compile-checked")
        return 0
    out = os.path.join(ROOT, "build", "nvcc-check")
    os.makedirs(out, exist_ok=True)
    failed = 0
    for cu in cus:
        t0 = time.time()
        obj = os.path.join(out, os.path.basename(cu) + ".o")
        cmd = [nvcc, "-c", cu, "-o", obj, "-std=c++17", "-O3", "-arch=sm_90", "-I", os.path.join(ROOT, "csrc")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        status = "ok" if r.returncode == 0 else "FAILED"
        print(f"cuda-check: {os.path.relpath(cu, ROOT)} sm_90 {status} ({time.time() - t0:.1f} s)")
        if r.returncode:
            failed += 1
            print(r.stdout + r.stderr)
    print(f"cuda-check: {len(cus) - failed} of {len(cus)} CUDA sources compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
