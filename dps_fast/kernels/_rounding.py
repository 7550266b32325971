"""Float32 -> storage dtype conversion for the Triton kernels' stores.

The Triton 3.8 *interpreter* (TRITON_INTERPRET=1, how the tests run Triton on a CPU) rounds
float32 -> bfloat16 toward zero, also with ``fp_downcast_rounding="rtne"``: 0.12098576 is stored
as 0.12060547 where PyTorch gives 0.12109375. Compiled kernels round to nearest even (the sm_90
PTX of such a store is ``cvt.rn.bf16.f32``). Under the interpreter, :func:`to_dtype` therefore
rounds bfloat16 by hand, so that the tests see the values a GPU stores; compiled, it is a plain
``x.to(dtype)`` (the branch is a compile-time constant). Found by ``make fuzz`` (2026-11-30):
a bf16 bank one ulp off moved a DPSLoss contrastive term beyond the loss's tolerance.
"""
import os

import triton
import triton.language as tl

ROUND_BF16_BY_HAND = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """float32 ``x`` as ``dtype``, rounded to nearest even (NaN stays NaN)."""
    y = x.to(dtype)
    if ROUND_BF16_BY_HAND:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = tl.where(x != x, bits | 0x400000, bits + 0x7FFF + ((bits >> 16) & 1))
            y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y
