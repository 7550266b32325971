"""Test configuration.

TRITON_INTERPRET=1 must be set before any Triton kernel module is imported, so
the Triton backend runs here (no GPU) in Triton's interpreter on CPU tensors.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402


def _load_ops_library(path):
    """DPS_FAST_TEST_OPS_LIBRARY=<.so> (`make sanitize`): the ops come from that library (e.g. the
    sanitized build), not from the prebuilt dps_fast._C. Its TORCH_LIBRARY registrations run on
    load; a stub dps_fast._C then stands in for the prebuilt module, so dps_fast does not import it
    (registering the same schemas twice would fail)."""
    import types

    torch.ops.load_library(path)
    sys.modules["dps_fast._C"] = types.ModuleType("dps_fast._C")


def _check_ops_library(path):
    with open("/proc/self/maps") as f:
        maps = f.read()
    assert os.path.realpath(path) in maps, f"{path} is not loaded"
    assert "dps_fast/_C." not in maps, "the prebuilt dps_fast._C was loaded next to the library under test"


_OPS_LIBRARY = os.environ.get("DPS_FAST_TEST_OPS_LIBRARY")
if _OPS_LIBRARY:
    _load_ops_library(_OPS_LIBRARY)

import dps_fast  # noqa: E402

if _OPS_LIBRARY:
    _check_ops_library(_OPS_LIBRARY)
from _helpers import FUSED  # noqa: E402


def pytest_report_header(config):
    ops = f"; ops library {_OPS_LIBRARY}" if _OPS_LIBRARY else ""
    return [f"dps_fast {dps_fast.__file__}; fused cases: {FUSED}; torch {torch.__version__}{ops}"]
