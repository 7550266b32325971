"""Triton kernels of dps_fast (installed as ``dps_fast.kernels``).

Importing this package registers the ``torch.ops.dps_fast_triton`` ops. On CPU
tensors they run only in Triton's interpreter (``TRITON_INTERPRET=1`` set before
import), which is how they are tested on machines without a GPU.
"""
raise ImportError("the Triton kernels are not written yet")
