"""The package's structure (issue 24): every module of dps_fast imports on its own, the import
graph of dps_fast/ has no cycle, and the public names are imported explicitly."""
import ast
import os
import pkgutil
import re
import subprocess
import sys

import dps_fast
from dps_fast.ops import PUBLIC

PACKAGE_DIR = os.path.dirname(os.path.abspath(dps_fast.__file__))

# Imports inside a function that close a cycle of the graph, each with why it cannot be at
# the top of its module. Every entry must still be such an import (checked below).
DEFERRED_CYCLE_EDGES = {
    ("dps_fast._dispatch", "dps_fast.kernels"):
        "Triton is optional and slow to import, so the backend probe imports the kernels on first "
        "use; the kernels register their ops from the op modules, which dispatch through _dispatch",
}


def package_modules(path=PACKAGE_DIR, prefix="dps_fast"):
    """{module name: (file, is a package)} of every Python module under ``path``, found on disk
    (pkgutil.walk_packages would import the subpackages to find their children)."""
    found = {prefix: (os.path.join(path, "__init__.py"), True)}
    for info in pkgutil.iter_modules([path]):
        sub = os.path.join(path, info.name)
        if info.ispkg:
            found.update(package_modules(sub, f"{prefix}.{info.name}"))
        elif os.path.isfile(sub + ".py"):
            found[f"{prefix}.{info.name}"] = (sub + ".py", False)
    return found


MODULES = package_modules()


def _not_importable(name: str) -> str | None:
    """Why ``name`` is not imported alone here, or None."""
    if name.endswith(".__main__"):
        return "a script: importing it runs the command"
    return None


# The optional dependencies (setup.py's extras and what the trainer imports on demand): a
# module that cannot import for want of one of them is not a failure here.
OPTIONAL = ("triton", "tqdm", "matplotlib", "sklearn", "torchvision", "timm", "mlxtend")

# One process imports torch once, then forks one child per module: each child starts with no
# dps_fast module loaded, as a fresh interpreter would, for a fraction of the start-up time.
IMPORT_EACH = r"""
import os, sys, traceback
import torch  # noqa: F401
optional = set(sys.argv[1].split(","))
failures = []
for name in sys.argv[2:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            __import__(name)
            report = b""
        except ModuleNotFoundError as e:
            missing = (e.name or "").partition(".")[0] in optional
            report = b"" if missing else traceback.format_exc().encode()
        except BaseException:
            report = traceback.format_exc().encode()
        os.write(w, report)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    if report or status:
        failures.append(f"{name} (exit status {status}):\n{report}")
print("\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_each_module_imports_alone():
    names = sorted(n for n in MODULES if _not_importable(n) is None)
    out = subprocess.run([sys.executable, "-c", IMPORT_EACH, ",".join(OPTIONAL), *names], capture_output=True,
                         text=True, timeout=600, cwd=os.path.dirname(PACKAGE_DIR))
    assert out.returncode == 0, out.stdout + out.stderr


def _imports(tree: ast.Module):
    """(import node, inside a function) for every import statement of a module."""
    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            yield from walk(child, inner)
    return walk(tree, False)


def _targets(module: str, is_package: bool, node) -> list[str]:
    """The dps_fast modules an import statement of ``module`` names (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return found or ([base] if base in MODULES else [])


def _ran_too(module: str, target: str) -> list[str]:
    """The packages that importing ``target`` runs first, beyond those ``module`` sits in."""
    parts = target.split(".")
    return [p for p in (".".join(parts[:k]) for k in range(1, len(parts)))
            if not (module == p or module.startswith(p + "."))]


def import_graph():
    """{module: {module it imports: inside a function}} over dps_fast/. An import of
    ``a.b.c`` also runs the package ``a.b``; a package that finds its modules by name
    (``pkgutil.iter_modules(__path__)``: dps_fast.ops, dps_fast.kernels) imports each of them."""
    graph = {}
    for module, (path, is_package) in MODULES.items():
        with open(path) as f:
            source = f.read()
        edges = graph.setdefault(module, {})
        for node, deferred in _imports(ast.parse(source)):
            for target in _targets(module, is_package, node):
                for dep in [target] + _ran_too(module, target):
                    edges[dep] = edges.get(dep, True) and deferred
        if is_package and "iter_modules(__path__)" in source:
            for child in MODULES:
                if child.rpartition(".")[0] == module and not child.rpartition(".")[2].startswith("_"):
                    edges[child] = False
        edges.pop(module, None)
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle of ``graph`` ({node: iterable of nodes}) as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_import_graph_has_no_cycle():
    """Imports inside functions count too (a deferred import still depends on its target);
    only the edges of DEFERRED_CYCLE_EDGES are left out, and each must still be deferred."""
    graph = import_graph()
    for (src, dst), why in DEFERRED_CYCLE_EDGES.items():
        if dst in MODULES:  # dps_fast.kernels is absent from a source tree without its link
            assert graph[src].get(dst) is True, f"{src} -> {dst} is no longer a deferred import ({why})"
            del graph[src][dst]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in dps_fast/: " + " -> ".join(cycle)


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_public_functions_are_imported_explicitly():
    """Every op module's public function is a plain import in dps_fast and dps_fast.functional
    (no globals().update: editors and type checkers resolve the names)."""
    from dps_fast import functional

    for module in (dps_fast, functional):
        with open(module.__file__) as f:
            source = f.read()
        assert "globals()" not in source, module.__name__
        for name, fn in PUBLIC.items():
            assert getattr(module, name, None) is fn and name in module.__all__, (module.__name__, name)


def test_no_python_function_over_60_lines():
    """Functions fit a screen (docs/contributing.md): at most 60 lines, docstring included,
    everywhere in dps_fast/, Triton kernels too (their parts are @triton.jit helpers)."""
    root = os.path.dirname(dps_fast.__file__)
    long = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        long.append(f"{os.path.relpath(path, root)}::{node.name} ({lines} lines)")
    assert not long, "functions over 60 lines: " + ", ".join(long)


_CPP_BRANCH = re.compile(r"\b(if|for|while|switch|catch)\s*\(")
_CPP_SIGNATURE_END = re.compile(r"\)\s*(const)?\s*(noexcept)?\s*(override)?\s*(->\s*[\w:<>, ]+)?$")


def cpp_function_lengths(text: str):
    """(signature tail, first line, lines) of each outermost C++ function body in ``text``: a
    brace opening after a signature ``... ( ... )`` that is not a branch, namespace, struct or
    class. A heuristic for csrc/'s style (clang-format, Google-like), not a C++ parser."""
    found, stack, sig = [], [], ""
    for no, line in enumerate(text.split("\n"), 1):
        code = re.sub(r'"(\\.|[^"\\])*"', '""', re.sub(r"//.*", "", line))
        for ch in code:
            if ch == "{":
                head = sig.strip()
                is_fn = bool(_CPP_SIGNATURE_END.search(head)) and not _CPP_BRANCH.search(head) and \
                    not head.startswith(("namespace", "struct", "class", "extern"))
                stack.append((is_fn, no, head[-70:]))
                sig = ""
            elif ch == "}":
                if stack:
                    is_fn, start, head = stack.pop()
                    if is_fn and not any(f for f, _, _ in stack):
                        found.append((head, start, no - start + 1))
                sig = ""
            else:
                sig = "" if ch == ";" else sig + ch
        sig += " "
    return found


def test_cpp_function_lengths_are_found():
    text = "namespace a {\nint f(int x) {\n  if (x) {\n    return 1;\n  }\n  return 2;\n}\nstruct S {\n  void g() const {\n" \
           "  }\n};\n}  // namespace a\n"
    assert [(start, n) for _, start, n in cpp_function_lengths(text)] == [(2, 6), (9, 2)]


def test_no_cpp_function_over_60_lines():
    """The same rule in csrc/: at most 60 lines, unless a comment just above the function says
    why it is longer ("on purpose")."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    long = []
    for folder, _, files in os.walk(root):
        for name in sorted(f for f in files if f.endswith((".cpp", ".cu", ".h"))):
            path = os.path.join(folder, name)
            with open(path) as f:
                text = f.read()
            lines = text.split("\n")
            for head, start, n in cpp_function_lengths(text):
                why = " ".join(lines[max(0, start - 4):start - 1])
                if n > 60 and "on purpose" not in why:
                    long.append(f"{os.path.relpath(path, root)}:{start} {head!r} ({n} lines)")
    assert not long, "C++ functions over 60 lines: " + ", ".join(long)
