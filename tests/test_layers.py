"""The package's layers, read statically from every module's imports (including those inside functions).

core <- torch, tensorflow, models, data (libraries) <- train, cli, ... (the app): a library imports only
libraries (never the app, whatever packages the app grows), the core imports only itself, and no import cycle exists anywhere. Importing a package runs
its ``__init__``, so ``import hvdllm.torch`` inside a submodule of hvdllm.torch (which the package
``__init__`` imports) is a cycle; the packages a module already sits in are not (Python has started them).
"""
from __future__ import annotations

import ast
from pathlib import Path

import hvdllm

ROOT = Path(hvdllm.__file__).parent
LIBRARIES = ("hvdllm.core", "hvdllm.torch", "hvdllm.tensorflow", "hvdllm.keras", "hvdllm.models", "hvdllm.data")


def _module_name(path: Path) -> str:
    parts = ("hvdllm",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _targets(name: str, source: str, is_pkg: bool, known: set[str]) -> set[str]:
    """The package modules that module ``name`` (its ``source``) imports anywhere in its body.

    The module an import names is always a target (``import hvdllm.torch`` runs hvdllm/torch/__init__);
    the parent packages it passes through are targets unless ``name`` sits in them (already started).
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            named = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            named = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for mod in named:
            parts = mod.split(".")
            parents = {".".join(parts[:i]) for i in range(1, len(parts))}
            out |= {mod} if mod in known else set()
            out |= {p for p in parents if p in known and not (name == p or name.startswith(p + "."))}
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _targets(name, path.read_text(), path.name == "__init__.py", set(known))
            for name, path in known.items()}


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _outside(graph: dict[str, set[str]], layer: tuple[str, ...], allowed: tuple[str, ...]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() if _in(m, layer)
                  for t in ts if t != "hvdllm" and not _in(t, allowed))


def test_libraries_never_import_the_app() -> None:
    graph = _graph()
    bad = _outside(graph, LIBRARIES, LIBRARIES)
    assert not bad, "library modules import the app:\n" + "\n".join(bad)
    core = _outside(graph, ("hvdllm.core",), ("hvdllm.core",))
    assert not core, "hvdllm.core imports other layers:\n" + "\n".join(core)
    assert len(graph) > 40 and "hvdllm.torch.distributed" in graph["hvdllm.torch"]
    assert "hvdllm.torch" in graph["hvdllm.train.trainer_torch"]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself): Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each line: modules that import each other):\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_cycle_detection_sees_late_package_imports() -> None:
    """The scan itself: a function-level ``import hvdllm.torch`` in a submodule the package imports."""
    graph = {"hvdllm.torch": {"hvdllm.torch.sync"}, "hvdllm.torch.sync": {"hvdllm.torch"}, "hvdllm.core": set()}
    assert _cycles(graph) == [["hvdllm.torch", "hvdllm.torch.sync"]]
    known = {"hvdllm", "hvdllm.torch", "hvdllm.torch.sync", "hvdllm.torch.parallel", "hvdllm.torch.parallel.tensor"}
    source = "def f():\n    import hvdllm.torch as hvd\n    from hvdllm.torch.sync import x\n"
    assert _targets("hvdllm.torch.parallel.tensor", source, False, known) == {"hvdllm.torch", "hvdllm.torch.sync"}
    assert _targets("hvdllm.torch.sync", source, False, known) == {"hvdllm.torch"}
    assert _targets("hvdllm.train.x", "from hvdllm.torch.parallel import tensor", False, known) == {
        "hvdllm.torch", "hvdllm.torch.parallel", "hvdllm.torch.parallel.tensor"}


def test_every_hvdllm_import_names_a_module_that_exists() -> None:
    """Late imports inside functions are not run by the other tests: a renamed module must not leave one
    behind (``from hvdllm.core.runtime_base import ...`` after the rename to backends)."""
    known = set(_modules())
    missing = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module
                    else [])
            missing += [f"{name}: {m}" for m in mods if m.split(".")[0] == "hvdllm" and m not in known]
    assert not missing, missing
