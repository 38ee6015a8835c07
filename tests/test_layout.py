"""The layout's rules, checked on the source: no import cycles among rscir modules (imports inside
functions count; ``if TYPE_CHECKING:`` blocks do not run and do not count), no private names
imported across modules, and one module that reads a store address's scheme."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

SRC = REPO / "src"
PKG = SRC / "rscir"


def module_of(path: Path) -> tuple[str, bool]:
    """(dotted module name, is a package __init__)."""
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts = parts[:-1]
    return ".".join(parts), is_pkg


MODULES = {module_of(p)[0]: p for p in PKG.rglob("*.py")}


def _type_checking_lines(tree: ast.Module) -> set[int]:
    """Line numbers inside ``if TYPE_CHECKING:`` blocks."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            t = node.test
            name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for sub in node.body:
                    for n in ast.walk(sub):
                        if hasattr(n, "lineno"):
                            lines.add(n.lineno)
    return lines


def _resolve(base: str, name: str | None) -> str | None:
    """The rscir module an import refers to (a submodule when ``name`` is one)."""
    if name is not None and f"{base}.{name}" in MODULES:
        return f"{base}.{name}"
    return base if base in MODULES else None


def imports(path: Path) -> list[tuple[str, str | None, int]]:
    """(imported rscir module, imported name or None, line) of every runtime import."""
    mod, is_pkg = module_of(path)
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    out: list[tuple[str, str | None, int]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "rscir" or a.name.startswith("rscir."):
                    target = _resolve(a.name, None)
                    if target:
                        out.append((target, None, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base_parts = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if not (base == "rscir" or base.startswith("rscir.")):
                continue
            for a in node.names:
                target = _resolve(base, a.name)
                if target:
                    out.append((target, a.name, node.lineno))
    return out


def import_graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in imports(p) if t != m} for m, p in MODULES.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_cycle() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
        ["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_the_checker_resolves_relative_and_function_imports(tmp_path: Path) -> None:
    found = {t for t, _, _ in imports(PKG / "search" / "searcher.py")}
    assert "rscir.stores.base" in found  # from ..stores.base import EmbeddingStore
    assert "rscir.ingest.images" in found  # imported inside a function
    assert "rscir.search.strategy" in found


def test_no_import_cycles() -> None:
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles among rscir modules: " + "; ".join(
        " ↔ ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules() -> None:
    bad = [f"{module_of(p)[0]}:{line} imports {name} from {target}"
           for p in MODULES.values() for target, name, line in imports(p)
           if name and name.startswith("_") and not name.startswith("__")
           and target != module_of(p)[0]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("needle", ["is_pg_uri(", '"postgresql://"', "'postgresql://'"])
def test_one_place_reads_the_store_scheme(needle: str) -> None:
    allowed = {PKG / "stores" / "uri.py", *(PKG / "stores" / "postgres").glob("*.py")}
    users = [str(p.relative_to(SRC)) for p in PKG.rglob("*.py")
             if p not in allowed and needle in p.read_text()]
    assert not users, f"{needle} outside rscir.stores.uri: {users}"
