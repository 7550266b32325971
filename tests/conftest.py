"""Test configuration.

TRITON_INTERPRET=1 must be set before any Triton kernel module is imported, so
the Triton backend runs here (no GPU) in Triton's interpreter on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import dps_fast  # noqa: E402
from _helpers import FUSED  # noqa: E402


def pytest_report_header(config):
    return [f"dps_fast {dps_fast.__file__}; fused cases: {FUSED}; torch {torch.__version__}"]
