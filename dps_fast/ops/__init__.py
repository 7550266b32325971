"""The fused ops, one module each (docs/contributing.md). Every module here defines:

- ``OP``: the name of its schema (``csrc/cpu/<op>.cpp`` defines the schema once, next to
  the CPU kernel; the Triton namespace copies it from there);
- ``reference``: the plain-PyTorch oracle and fallback; ``check``: its input validation;
- ``fake``: the shape function for ``torch.compile``; ``opcheck_samples(device)``;
- its public function(s), named in ``__all__``.

Modules are found by name: adding ``ops/<op>.py`` registers its fake kernel, opcheck samples
and Triton op. Its public function is imported by name in ``dps_fast/__init__.py`` and
``dps_fast/functional.py`` (explicit, for editors; tests/test_structure.py checks against
:data:`PUBLIC`).
"""
from __future__ import annotations

import importlib
import pkgutil

MODULES = tuple(importlib.import_module(f"{__name__}.{m.name}")
                for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name) if not m.name.startswith("_"))
PUBLIC = {name: getattr(mod, name) for mod in MODULES for name in mod.__all__}
