"""The house rules of docs/design.md, checked on the source with `ast`: no import cycle (module- or
function-level imports), no private name imported across modules, no file over 600 lines, no function over
80 lines, Hugging Face internals only in core/model.py, SQL only in store.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "crystallized_safety"
PKG = "crystallized_safety"


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = [PKG, *path.relative_to(ROOT).with_suffix("").parts]
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _imports(name: str) -> list[tuple[str, list[str]]]:
    """(imported module, names) for every `from X import ...` / `import X` in a module, at any depth."""
    path, is_pkg = MODULES[name]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            if f"{target}.{names[0]}" in MODULES and all(f"{target}.{n}" in MODULES for n in names):
                found += [(f"{target}.{n}", []) for n in names]  # `from pkg import module`
            else:
                found.append((target, names))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
    return [(t, n) for t, n in found if t.startswith(PKG) and t in MODULES]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, (_path, is_pkg) in MODULES.items():
        for target, _names in _imports(name):
            if target == name or (is_pkg and target.startswith(name + ".")):
                continue  # a package's __init__ re-exporting its own modules
            graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_no_private_name_imported_across_modules():
    bad = [
        f"{name} imports {target}.{n}"
        for name in MODULES
        for target, names in _imports(name)
        for n in names
        if n.startswith("_") and not n.startswith("__") and target != name
    ]
    assert bad == []


def test_files_and_functions_stay_small():
    long_files = {n: len(p.read_text().splitlines()) for n, (p, _) in MODULES.items()}
    assert {n: k for n, k in long_files.items() if k > 600} == {}
    long_functions = []
    for name, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                long_functions.append(f"{name}.{node.name}")
    assert long_functions == []


@pytest.mark.parametrize(
    ("pattern", "home"),
    [
        (r"\.base_model\b|batch_select_indices|generation_config|logits_to_keep|past_key_values", "core/model.py"),
        (r"\.execute(many|script)?\(|\bSELECT\b|\bINSERT\b", "store.py"),
    ],
)
def test_internals_stay_in_their_module(pattern, home):
    """Hugging Face internals only in the model adapter; SQL only in the store."""
    rx = re.compile(pattern)
    found = []
    for path, _ in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        if rel == home:
            continue
        code = "\n".join(
            line for line in path.read_text().splitlines() if not line.lstrip().startswith(("#", '"', "'"))
        )
        if rx.search(code):
            found.append(rel)
    assert found == []


def test_every_public_name_imports():
    """`from crystallized_safety import X` for every name of the public API (they are imported lazily, so a
    moved module would otherwise break only at the user's first call)."""
    import crystallized_safety

    for name in crystallized_safety.__all__:
        assert getattr(crystallized_safety, name) is not None, name
    from crystallized_safety import ActivationSteerer, Intervention, generate, load_model  # noqa: F401
