"""The house rules of /work/shared/reference/architecture.md, read from the source (no imports run).

- ``kernels/`` imports torch, triton and the standard library only: a kernel is usable and testable
  without the rest of the package.
- The parts (``models``, ``rollout``, ``rewards``, ``algorithms``, ``data``) never import ``training``
  or ``stages``: the stages wire parts together, not the other way round.
- GPU-only packages (sglang, vllm, transformer_engine, apex) are imported lazily (inside a function),
  so ``import megatron_prism`` works without them.
- No import circle between modules (lazy imports inside functions included: moving an import into
  a function hides a circle, it does not break it), and no module grows past ``MAX_LINES``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_prism"
PARTS = ("models", "rollout", "rewards", "algorithms", "data")
ORCHESTRATION = ("megatron_prism.training", "megatron_prism.stages")
GPU_ONLY = ("sglang", "vllm", "transformer_engine", "apex")
MAX_LINES = 1000


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (ROOT / top).rglob("*.py"))


def _imports(path: Path, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(module imported, line) for each import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # imports under a top-level `if`/`try` still run at import time
        nodes = [n for stmt in tree.body for n in ast.walk(stmt)
                 if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 or n is stmt]
        nodes += [n for stmt in tree.body if isinstance(stmt, ast.ClassDef) for n in stmt.body]
    out = []
    for node in nodes:
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append((name, node.lineno))
            # `from pkg import submodule` imports the submodule too
            out += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _is_type_checking_only(path: Path) -> set[int]:
    """Lines of imports guarded by ``if TYPE_CHECKING:`` (never run)."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    return lines


def test_kernels_import_only_torch_triton_and_the_standard_library() -> None:
    allowed = {"torch", "triton", "kernels", "__future__"} | set(sys.stdlib_module_names)
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}"
           for p in _sources("kernels") for name, line in _imports(p, top_level_only=False)
           if name.split(".")[0] not in allowed]
    assert not bad, "kernels/ must stay standalone:\n" + "\n".join(bad)


@pytest.mark.parametrize("part", PARTS)
def test_parts_never_import_training_or_stages(part: str) -> None:
    bad = [f"{p.relative_to(ROOT)}:{line} imports {name}"
           for p in _sources(f"megatron_prism/{part}") for name, line in _imports(p, top_level_only=False)
           if name.startswith(ORCHESTRATION)]
    assert not bad, f"megatron_prism/{part} must not depend on the stages or the trainer:\n" + "\n".join(bad)


def test_gpu_only_packages_are_imported_lazily() -> None:
    bad = []
    for p in _sources("megatron_prism", "kernels"):
        guarded = _is_type_checking_only(p)
        bad += [f"{p.relative_to(ROOT)}:{line} imports {name} at import time"
                for name, line in _imports(p, top_level_only=True)
                if name.split(".")[0] in GPU_ONLY and line not in guarded]
    assert not bad, "\n".join(bad)


def test_no_import_circles_between_modules() -> None:
    modules = {_module_name(p): p for p in _sources("megatron_prism")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        guarded = _is_type_checking_only(path)
        deps = set()
        # lazy imports count: an import moved into a function hides a circle, it does not break it
        for imported, line in _imports(path, top_level_only=False):
            if line in guarded:
                continue
            # the module itself or the package whose __init__ runs
            while imported and imported not in modules:
                imported = imported.rpartition(".")[0]
            if imported and imported != name and not name.startswith(imported + "."):
                deps.add(imported)
        graph[name] = deps
    # A package __init__ re-exporting its own submodules is not a circle: drop edges from a
    # submodule to its enclosing package's __init__ before looking for cycles.
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    circles = [" -> ".join(c) for c in cycles
               if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(c, c[1:]))]
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_no_module_grows_past_the_house_limit() -> None:
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in _sources("megatron_prism", "kernels", "tools")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not long, f"split these (house limit {MAX_LINES} lines):\n" + "\n".join(long)
