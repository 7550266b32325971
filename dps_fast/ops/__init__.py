"""The fused ops, one module each (docs/contributing.md). Every module here defines:

- ``KERNELS``: its kernel ops, each a :class:`~dps_fast.ops._common.Kernel` (schema name,
  fake kernel for ``torch.compile``, opcheck samples); ``csrc/cpu/<op>.cpp`` defines each
  schema once, next to the CPU kernel, and the Triton namespace copies it from there. Most
  ops have one kernel op; SupCon has two (statistics and gradient, with the host glue
  around them written once in ``ops/supcon.py``);
- ``reference``: the plain-PyTorch oracle and fallback; ``check``: its input validation;
- its public function(s), named in ``__all__``.

Modules are found by name: adding ``ops/<op>.py`` registers its fake kernels, opcheck samples
and Triton ops. Its public function is imported by name in ``dps_fast/__init__.py`` and
``dps_fast/functional.py`` (explicit, for editors; tests/test_structure.py checks against
:data:`PUBLIC`).
"""
from __future__ import annotations

import importlib
import pkgutil

MODULES = tuple(importlib.import_module(f"{__name__}.{m.name}")
                for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name) if not m.name.startswith("_"))
PUBLIC = {name: getattr(mod, name) for mod in MODULES for name in mod.__all__}
