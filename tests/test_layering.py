"""The package's layering stays true: the tree shows the data flow (docs/design.md, "The
tree"), lower layers never import higher ones, and nothing imports in a cycle.

Every import of every module counts - at the top, inside functions, behind
``TYPE_CHECKING`` - so no import hides in a function to dodge a cycle. A layer may import
its own layer only inside its own subpackage.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: package name -> folder (pyproject.toml's package-dir)
PACKAGE_DIRS = {"ckptsvc": "ckptsvc", "ckptsvc.workers": "workers", "ckptsvc.storage": "storage"}

#: the layers, lowest first; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("ckptsvc.version",),
    ("ckptsvc.errors",),
    ("ckptsvc.knobs", "ckptsvc.liveness", "ckptsvc.hooks", "ckptsvc.metrics", "ckptsvc.gc_pause"),
    ("ckptsvc.storage",),
    ("ckptsvc.format",),
    ("ckptsvc.workers",),
    ("ckptsvc.ranks",),
    ("ckptsvc.stage",),
    ("ckptsvc.read",),
    ("ckptsvc.commit",),
    ("ckptsvc.engine",),
    ("ckptsvc.ops",),
    ("ckptsvc.compat",),
    ("ckptsvc.sharded_checkpoint", "ckptsvc.manager", "ckptsvc.dcp"),
    ("ckptsvc.integrations",),
    ("ckptsvc.tools", "ckptsvc.testing"),
    ("ckptsvc.cli",),
    ("ckptsvc",),  # the package's __init__: re-exports the public API
]
#: the node writer's process imports these: never torch
TORCH_FREE = (
    "ckptsvc.workers",
    "ckptsvc.storage",
    "ckptsvc.format",
    "ckptsvc.errors",
    "ckptsvc.gc_pause",
)


def module_files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the prefix that placed it) for a module."""
    best: tuple[int, str] | None = None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (
                best is None or len(p) > len(best[1])
            ):
                best = (i, p)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS")
    return best


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def imports_of(module: str, *, runtime_only: bool = False) -> Iterator[tuple[str, int]]:
    """(imported ckptsvc module, line) for every import statement of ``module`` - at the
    top, in functions, and (unless ``runtime_only``) under ``if TYPE_CHECKING:``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = _type_checking_nodes(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            if t in MODULES and t != module:
                yield t, node.lineno


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    upward = []
    for module in MODULES:
        mine, my_prefix = layer_of(module)
        for target, line in imports_of(module):
            theirs, their_prefix = layer_of(target)
            if theirs > mine or (theirs == mine and their_prefix != my_prefix):
                upward.append(f"{MODULES[module].relative_to(REPO)}:{line}: {module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    # an annotation-only import under TYPE_CHECKING runs nothing, so it cannot cycle
    graph = {m: sorted({t for t, _ in imports_of(m, runtime_only=True)}) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycles.append([*stack[stack.index(t) :], t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    # the package __init__ is imported by every submodule's parent; it imports nothing eagerly
    cycles = [c for c in cycles if "ckptsvc" not in c]
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("prefix", TORCH_FREE)
def test_the_writer_side_never_imports_torch(prefix: str) -> None:
    offenders = []
    for module, path in MODULES.items():
        if module != prefix and not module.startswith(prefix + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            if any(n == "torch" or n.startswith("torch.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch imported on the writer side: {offenders}"


def test_no_module_is_much_over_500_lines() -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in MODULES.values()
        if (n := len(p.read_text().splitlines())) > 550
    }
    assert not long, f"split these modules (one job each, ~500 lines): {long}"
