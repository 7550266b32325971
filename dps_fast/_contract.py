"""What the DPS step accepts, declared once (docs/contributing.md, "The eager fast path").

Three readers, one declaration:

- the Python checks (:mod:`dps_fast._validate`) build their tables and bounds from it;
- the eager fast path's Python side (:mod:`dps_fast._fast_path`) reads the argument kinds
  and the decline message from it;
- the fast path's C++ filter (csrc/fast_path.cpp) includes ``csrc/fast_path_contract.h``,
  which is *generated* from this file: ``python dps_fast/_contract.py`` rewrites it, and
  tests/test_fast_path_contract.py fails while it is out of date.

So a new target, reduction, dtype or bound is one edit here (and the header regenerated).
This module is pure data and imports nothing, so that the generator runs without torch.
"""

GAMMA_LOW, GAMMA_HIGH = 0.0, 1.0  # gamma in (GAMMA_LOW, GAMMA_HIGH]: open below, closed above
# The smallest tau_e: FLT_MIN, so that tau_e and 1 / tau_e are both normal float32 numbers in
# every backend (the kernels take tau_e as a float32 and multiply by 1 / tau_e; below FLT_MIN
# tau_e is subnormal, flushed to 0 under torch.set_flush_denormal(True)).
TAU_E_MIN = 2.0 ** -126
TARGETS = ("posterior", "prior")  # the target after the update or before it; the first is the kernels' flag
REDUCTIONS = ("none", "mean", "sum")  # a reduction's code in the kernels is its position here
FUSED_DTYPES = ("float32", "bfloat16", "float16")  # logits and bank dtypes with fused kernels
INDEX_DTYPES = ("int64", "int32", "int16", "int8", "uint8")
BACKEND_ENV = "DPS_FAST_BACKEND"  # the default backend when none is named
EAGER_BACKENDS = ("auto", "cpu")  # backend names the fast path runs (no name and an unset env: "auto")
# How a decline starts: a NotImplementedError with this prefix, raised before any write, sends
# the call to the Python path; any other exception is the call's error.
DECLINES = "dps_fast: the eager fast path declines"

# The eager op's arguments, in order, with their kinds. The fast path takes a call as it is only
# where every argument has its kind's plain type (_fast_path.plain_arguments, and the CPython
# binding in csrc/module.cpp); anything else takes the Python path, whose checks name the problem.
#   tensor: a plain tensor;  bank: a plain tensor written in place;  real: a float, or an int a
#   double holds exactly;  target / reduction: one of the names above;  flag: a bool;
#   backend: None or a str.
EAGER_ARGUMENTS = (
    ("logits", "tensor"), ("index", "tensor"), ("alpha", "bank"), ("gamma", "real"), ("tau_e", "real"),
    ("target", "target"), ("reduction", "reduction"), ("update", "flag"), ("validate", "flag"),
    ("backend", "backend"),
)
EAGER_OP = "dps_ce_eager"

# ------------------------------------------------------------------------- the C++ header
_SCHEMA_TYPES = {"tensor": "Tensor", "bank": "Tensor(a!)", "real": "float", "target": "str",
                 "reduction": "str", "flag": "bool", "backend": "str?"}
_C10_TYPES = {"float32": "Float", "bfloat16": "BFloat16", "float16": "Half", "int64": "Long", "int32": "Int",
              "int16": "Short", "int8": "Char", "uint8": "Byte"}
HEADER = "csrc/fast_path_contract.h"


def _name_lookup(function: str, names, what: str) -> str:
    """A C++ function giving a name's position in ``names``, or -1."""
    lines = [f"// The position of {what} in {list(names)}, or -1.",
             f"inline int {function}(c10::string_view name) {{"]
    lines += [f'  if (name == "{n}") return {i};' for i, n in enumerate(names)]
    return "\n".join(lines + ["  return -1;", "}"])


def _dtype_test(function: str, names) -> str:
    tests = " ||\n         ".join(f"t == c10::ScalarType::{_C10_TYPES[n]}" for n in names)
    return f"inline bool {function}(c10::ScalarType t) {{\n  return {tests};\n}}"


def eager_schema() -> str:
    args = ", ".join(f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in EAGER_ARGUMENTS)
    return f"{EAGER_OP}({args}) -> Tensor"


def cpp_header() -> str:
    """The text of csrc/fast_path_contract.h."""
    parts = [
        "// Generated from dps_fast/_contract.py by `python dps_fast/_contract.py`: edit that file, not this one",
        "// (tests/test_fast_path_contract.py checks that the two agree).",
        "#pragma once",
        "#include <c10/core/ScalarType.h>",
        "#include <c10/util/string_view.h>",
        "",
        "// How a decline starts (a NotImplementedError the Python path catches).",
        f'#define DPS_FAST_DECLINES "{DECLINES}"',
        "",
        "namespace dps_fast {",
        "namespace contract {",
        "",
        f"constexpr double kGammaLow = {GAMMA_LOW!r};  // exclusive",
        f"constexpr double kGammaHigh = {GAMMA_HIGH!r};  // inclusive",
        f"constexpr double kTauEMin = {TAU_E_MIN!r};  // FLT_MIN",
        f'constexpr const char* kBackendEnv = "{BACKEND_ENV}";',
        f"constexpr int kEagerArguments = {len(EAGER_ARGUMENTS)};",
        f'constexpr const char* kEagerSchema = "{eager_schema()}";',
        "",
        _name_lookup("target_position", TARGETS, "a target"),
        "",
        _name_lookup("reduction_code", REDUCTIONS, "a reduction"),
        "",
        _name_lookup("eager_backend_position", EAGER_BACKENDS, "a backend the fast path runs"),
        "",
        _dtype_test("fused_dtype", FUSED_DTYPES),
        "",
        _dtype_test("index_dtype", INDEX_DTYPES),
        "",
        "}  // namespace contract",
        "}  // namespace dps_fast",
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), HEADER)
    with open(path, "w") as f:
        f.write(cpp_header())
    print(f"wrote {path}")
