"""The CUDA kernels of csrc/cuda/ run on the CPU by tools/cuda_emulator (no GPU needed), with
a Python mirror of their torch glue (csrc/cuda/*_glue.cpp), so tests can check the CUDA
kernels' arithmetic against the reference. Built with g++ on first use into build/cuda-emu.
What it cannot show: timing, races between blocks (blocks run one after another), warp
behaviour that differs from block-wide barriers, and __expf's own approximation error."""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess

import torch

from dps_fast.ops.supcon import fused as fused_supcon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = os.path.join(ROOT, "tools", "cuda_emulator")
CUDA = os.path.join(ROOT, "csrc", "cuda")
SOURCES = ["attach_grad.cu", "dps_cross_entropy.cu", "supcon.cu", "topk_step.cu"]
_LAUNCH = re.compile(r"(\w+(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\((.*?)\);", re.S)
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_lib = None


def unavailable() -> str | None:
    """Why the emulator cannot be built here, or None."""
    return None if shutil.which("g++") else "g++ not found"


def _as_cpp(cu_text: str) -> str:
    """CUDA launch syntax `k<<<grid, block, shm, stream>>>(args);` as a call of the emulator."""
    return _LAUNCH.sub(lambda m: f"emu::Config({m.group(2)}).run({m.group(1)}, {m.group(3)});", cu_text)


def library():
    global _lib
    if _lib is not None:
        return _lib
    texts = {n: _as_cpp(open(os.path.join(CUDA, n)).read()) for n in SOURCES}
    deps = [open(os.path.join(d, f)).read() for d in (EMU, os.path.join(EMU, "include"), CUDA, os.path.dirname(CUDA))
            for f in sorted(os.listdir(d)) if f.endswith((".h", ".cpp"))]
    key = hashlib.sha256("".join(list(texts.values()) + deps).encode()).hexdigest()[:16]
    out = os.path.join(ROOT, "build", "cuda-emu", key)
    so = os.path.join(out, "libdps_cuda_emu.so")
    if not os.path.exists(so):
        os.makedirs(out, exist_ok=True)
        srcs = []
        for name, text in texts.items():
            srcs.append(os.path.join(out, name.replace(".cu", ".cpp")))
            with open(srcs[-1], "w") as f:
                f.write(text)
        cmd = ["g++", "-std=c++17", "-O2", "-U_FORTIFY_SOURCE", "-fPIC", "-shared", "-I", os.path.join(EMU, "include"), "-I", CUDA,
               "-include", os.path.join(EMU, "emu.h"), *srcs, os.path.join(EMU, "capi.cpp"), "-o", so + ".tmp"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(so + ".tmp", so)
    _lib = ctypes.CDLL(so)
    _lib.emu_ce_num_blocks.restype = ctypes.c_int64
    _lib.emu_ce_num_blocks.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    return _lib


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None and t.numel() else 0)


def _check(err, what):
    if err:
        raise RuntimeError(f"dps_fast (cuda, emulated): {what} failed ({err})")


# ------------------------------------------------------------------ mirror of dps_cross_entropy_glue.cpp
def _run_ce(logits, index, a, grad, gamma, tau_e, posterior, update, reduction, normalize):
    lib = library()
    z = logits.contiguous()
    v = z.shape[0] if z.dim() == 3 else 1
    b, c = z.shape[-2], z.shape[-1]
    has_grad = grad.numel() > 0
    idx = index.to(torch.int64).contiguous() if index is not None else None
    loss = torch.empty(z.shape[:-1] if reduction == 0 else (), dtype=torch.float32)
    part = torch.empty(max(1, lib.emu_ce_num_blocks(b, c, v)), dtype=torch.float32)
    ticket = torch.zeros(1, dtype=torch.int32)
    stats = torch.empty(3, v, b) if v > lib.emu_ce_register_views() else None
    scale = 1.0 / (v * b) if reduction == 1 else 1.0
    f = ctypes.c_float
    err = lib.emu_launch_ce(
        _ptr(z), _ptr(idx), _ptr(a), _ptr(grad if has_grad else None), _ptr(loss), _ptr(part), _ptr(ticket),
        _ptr(stats), ctypes.c_int64(b), ctypes.c_int64(c), ctypes.c_int64(a.shape[0]), ctypes.c_int64(a.stride(0)),
        ctypes.c_int(v), f(gamma), f(1.0 / tau_e), f(scale), f(scale), _DTYPES[z.dtype], _DTYPES[a.dtype],
        int(posterior), int(update), int(tau_e != 1.0), int(has_grad), int(normalize), int(reduction))
    _check(err, "DPS / soft-CE kernel")
    assert int(ticket) == 0, "the reduction ticket was not reset"
    return loss


def dps_ce_fwd(logits, index, alpha, grad, gamma, tau_e, posterior, update, reduction):
    if update and logits.shape[-2] > 0:
        torch.autograd.graph.increment_version(alpha)  # the glue bumps the bank's version
    return _run_ce(logits, index, alpha, grad, gamma, tau_e, posterior, update, reduction, True)


def soft_ce_fwd(logits, target, grad, normalize, reduction):
    return _run_ce(logits, None, target.contiguous(), grad, 0.0, 1.0, False, False, reduction, normalize)


# ------------------------------------------------------------------ mirror of attach_grad_glue.cpp
def scale_unless_one_(grad, s):
    """grad *= s unless s == 1, by the CUDA kernel (csrc/cuda/attach_grad.cu); the glue's
    other layouts multiply."""
    if grad.dtype not in _DTYPES or not grad.is_contiguous() or s.numel() != 1 or s.dtype != torch.float32:
        grad.mul_(s)
        return
    scale = s.reshape(1).contiguous()
    _check(library().emu_scale_unless_one(_ptr(grad), ctypes.c_int64(grad.numel()), _DTYPES[grad.dtype],
                                          _ptr(scale)), "scale kernel")


# ------------------------------------------------------------------ mirror of supcon_glue.cpp
def supcon_lse(f, inv_tau):
    lse = torch.empty(f.shape[0])
    _check(library().emu_launch_supcon(0, _ptr(f), _ptr(lse), None, None, ctypes.c_int64(f.shape[0]),
                                       ctypes.c_int64(f.shape[1]), ctypes.c_float(inv_tau)), "SupCon lse kernel")
    return lse


def supcon_grad(f, lse, coef, inv_tau):
    df = torch.empty_like(f)
    _check(library().emu_launch_supcon(1, _ptr(f), _ptr(lse), _ptr(coef), _ptr(df), ctypes.c_int64(f.shape[0]),
                                       ctypes.c_int64(f.shape[1]), ctypes.c_float(inv_tau)), "SupCon gradient kernel")
    return df


def supcon_fwd(features, labels, soft, tau, normalize, need_grad):
    """The public op's host glue (dps_fast/ops/supcon.py) over the emulated kernels."""
    return fused_supcon(supcon_lse, supcon_grad, features, labels, soft, tau, normalize, need_grad)


# ------------------------------------------------------------------ mirror of topk_step_glue.cpp
def topk_step(logits, index, ids, vals, rest, bound, grad, gamma, tau_e, posterior, update, reduction):
    """``dps_fast::topk_step`` on the emulated CUDA kernel (csrc/cuda/topk_step.cu), as the glue
    calls it: the [B, C] work buffer, the per-row loss, then the reduction."""
    v, b, c = logits.shape
    loss = torch.empty(v, b)
    work = torch.empty(b, c)
    f, i64 = ctypes.c_float, ctypes.c_int64
    _check(library().emu_launch_topk(
        _ptr(logits), _ptr(index), _ptr(ids), _ptr(vals), _ptr(rest), _ptr(bound if bound.numel() else None),
        _ptr(grad if grad.numel() else None), _ptr(loss), _ptr(work), i64(v), i64(b), i64(c), i64(ids.shape[0]),
        i64(ids.shape[1]), f(gamma), f(1.0 / tau_e), f(1.0 / (v * b) if reduction == 1 else 1.0), int(posterior),
        int(update)), "top-k step kernel")
    if reduction == 0:
        return loss
    total = loss.double().sum()
    return (total / (v * b) if reduction == 1 else total).float()
