"""The house rules of docs/design.md, checked on the source with `ast`: no import cycle (module- or
function-level imports), no import pointing up the layer table of docs/design.md, no private name imported
across modules, no file over 600 lines, no function over 80 lines, Hugging Face internals only in
core/model.py, SQL only in the store/ package.

`python tests/test_design.py` prints the imports that point up the layer table (0 expected)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "crystallized_safety"
DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design.md"
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
            found += [(f"{target}.{n}", []) for n in names if f"{target}.{n}" in MODULES]  # `from pkg import module`
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest:
                found.append((target, rest))
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


def _layer_table(text: str) -> list[tuple[str, list[str]]]:
    """The rows of design.md's "Layers of the package" table, top first: (layer, module prefixes). A cell names
    modules in backquotes (`cli/`, `store/`, `crystallized_safety/__init__.py`); other words are comments."""
    section = text.split("## Layers of the package", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) != 2 or cells[0] == "layer" or set(cells[0]) <= {"-"}:
            continue
        prefixes = []
        for token in re.findall(r"`([^`]+)`", cells[1]):
            if token.endswith((".py", "/")):
                parts = token.removeprefix(PKG + "/").removesuffix("/").removesuffix(".py").split("/")
                prefixes.append(".".join([PKG, *(p for p in parts if p != "__init__")]))
        rows.append((cells[0], prefixes))
    return rows


def _layer_of(module: str, table: list[tuple[str, list[str]]]) -> int | None:
    """Row index of the longest prefix naming `module` (0 = the top row), None when no row names it."""
    best: tuple[int, int] | None = None
    for row, (_layer, prefixes) in enumerate(table):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), row)
    return None if best is None else best[1]


def _lazy_exports() -> set[str]:
    """The names the package root re-exports lazily (its `_EXPORTS` table): the public API, an entry point."""
    for node in ast.walk(ast.parse(MODULES[PKG][0].read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}  # type: ignore[attr-defined]
    raise AssertionError("the package root has no _EXPORTS table")


def _layer_graph() -> dict[str, set[str]]:
    """`_graph`, except that importing the package root's own names (`__version__`, the error base class) is not
    an arrow to the public API: Python runs the root before any module of the package, and the root imports
    only leaves (`test_the_package_root_is_a_leaf`). Importing a lazily re-exported name is one."""
    lazy = _lazy_exports()
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, (_path, is_pkg) in MODULES.items():
        for target, names in _imports(name):
            if target == name or (is_pkg and target.startswith(name + ".")):
                continue
            if target == PKG and names and not set(names) & lazy:
                continue
            graph[name].add(target)
    return graph


def _upward(graph: dict[str, set[str]], table: list[tuple[str, list[str]]]) -> list[str]:
    """Every import that points to a higher row than its importer's ("a (layer) -> b (layer)")."""
    out = []
    for name in sorted(graph):
        for target in sorted(graph[name]):
            a, b = _layer_of(name, table), _layer_of(target, table)
            if a is not None and b is not None and b < a:
                out.append(f"{name} ({table[a][0]}) -> {target} ({table[b][0]})")
    return out


LAYERS = _layer_table(DESIGN.read_text())


def test_the_layer_table_is_read_and_names_every_module():
    names = [layer for layer, _ in LAYERS]
    assert names == ["entry points", "orchestration", "studies", "models by name", "measuring", "mechanics", "leaves"]
    assert _layer_of(f"{PKG}.cli.steer_cmds", LAYERS) == 0 and _layer_of(PKG, LAYERS) == 0
    assert _layer_of(f"{PKG}.core.generation.fast", LAYERS) == 5 and _layer_of(f"{PKG}.store", LAYERS) == 6
    assert [name for name in MODULES if _layer_of(name, LAYERS) is None] == []


def test_the_layer_checker_finds_a_planted_upward_arrow():
    table = [("top", [f"{PKG}.cli"]), ("middle", [f"{PKG}.judges"]), ("bottom", [f"{PKG}.core", f"{PKG}.x.py"])]
    graph = {
        f"{PKG}.cli.app": {f"{PKG}.judges.llm", f"{PKG}.core.model"},  # down: fine
        f"{PKG}.judges.llm": {f"{PKG}.judges.base", f"{PKG}.cli.app"},  # sideways fine, up not
        f"{PKG}.core.model": set(),
        f"{PKG}.judges.base": set(),
    }
    assert _upward(graph, table) == [f"{PKG}.judges.llm (middle) -> {PKG}.cli.app (top)"]


def test_layer_imports_only_point_down():
    """docs/design.md's layer table: an import (module- or function-level) points down or sideways, never up."""
    assert _upward(_layer_graph(), LAYERS) == []


def test_the_package_root_is_a_leaf():
    """What `from crystallized_safety import __version__` runs: the root's own imports reach leaves only."""
    assert "load_model" in _lazy_exports() and "__version__" not in _lazy_exports()
    assert {_layer_of(t, LAYERS) for t, _ in _imports(PKG)} == {len(LAYERS) - 1}


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
        (r"\.execute(many|script)?\(|\bSELECT\b|\bINSERT\b", "store/"),
    ],
)
def test_internals_stay_in_their_module(pattern, home):
    """Hugging Face internals only in the model adapter; SQL only in the store (`home`: a file, or a package's
    folder ending in "/")."""
    rx = re.compile(pattern)
    found = []
    for path, _ in MODULES.values():
        rel = path.relative_to(ROOT).as_posix()
        if rel == home or (home.endswith("/") and rel.startswith(home)):
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


if __name__ == "__main__":
    arrows = _upward(_layer_graph(), LAYERS)
    print("\n".join(arrows + [f"arrows up: {len(arrows)}"]))
