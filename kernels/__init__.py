"""Triton kernels of dps_fast (installed as dps_fast.kernels)."""
