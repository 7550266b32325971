"""Fail on a public name of dps_fast without a docstring (`make docs` runs this before the site build).

Public means: every name in ``dps_fast.__all__`` and the public names of the modules in MODULES (their
``__all__`` where they have one, else every function and class defined in the module whose name has no
leading underscore), and of each such class every method, property, classmethod and staticmethod without a
leading underscore that a dps_fast class defines (methods inherited from torch or Python are not ours to
document, nor are our overrides of them such as ``forward`` or ``extra_repr``). The docstring must be the object's own (``__doc__``, not inherited from a parent's method), since
the API pages (mkdocstrings) show the object's own. Exit status 1 lists every missing one, "module:name".
"""
import importlib
import inspect
import sys

MODULES = ("dps_fast", "dps_fast.distributed", "dps_fast.soft_labels", "dps_fast.label_issues",
           "dps_fast.metrics", "dps_fast.calibration", "dps_fast.datasets")


def _ours(obj):
    return (getattr(obj, "__module__", None) or "").split(".")[0] == "dps_fast"


def public_names(module):
    """The (qualified name, object) pairs of a module's public functions and classes."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, o in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(o) or inspect.isclass(o)) and getattr(o, "__module__", None) == module.__name__]
    out = []
    for name in names:
        obj = getattr(module, name)
        if inspect.ismodule(obj):  # a submodule in __all__: its own names are checked as a module
            out.append((f"{module.__name__}:{name}", obj))
        elif inspect.isfunction(obj) or inspect.isclass(obj) or callable(obj):
            out.append((f"{module.__name__}:{name}", obj))
    return out


def _member_doc(cls, name):
    """The docstring of cls.name as defined in the first dps_fast class of the MRO that defines it, or
    None when no dps_fast class defines it (then it is torch's or Python's)."""
    if any(name in vars(klass) for klass in cls.__mro__ if not _ours(klass)):
        return None  # an override of torch's or Python's method (forward, extra_repr): documented there
    for klass in cls.__mro__:
        if name in vars(klass):
            member = vars(klass)[name]
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            elif isinstance(member, property):
                member = member.fget
            elif not callable(member):
                return None  # a plain attribute
            return (getattr(member, "__doc__", None) or "").strip() or ""
    return None


def missing(modules=MODULES):
    """Every public name (and public method of a public class) without a docstring, as 'module:name'."""
    seen, bad = set(), []
    for modname in modules:
        module = importlib.import_module(modname)
        if not (module.__doc__ or "").strip():
            bad.append(f"{modname} (module)")
        for qual, obj in public_names(module):
            if id(obj) in seen or (not inspect.ismodule(obj) and not _ours(obj)):
                continue
            seen.add(id(obj))
            if inspect.ismodule(obj):
                if not (obj.__doc__ or "").strip():
                    bad.append(f"{qual} (module)")
                continue
            if not (obj.__doc__ or "").strip():
                bad.append(qual)
            if inspect.isclass(obj):
                for name in sorted(dir(obj)):
                    if name.startswith("_"):
                        continue
                    doc = _member_doc(obj, name)
                    if doc == "":
                        bad.append(f"{qual}.{name}")
    return bad


def main():
    bad = missing()
    if bad:
        print(f"check_docstrings: {len(bad)} public name(s) without a docstring:", *bad, sep="\n  ")
        return 1
    print("check_docstrings: every public name has a docstring")
    return 0


if __name__ == "__main__":
    sys.exit(main())
