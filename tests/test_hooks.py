"""Named hook points (ckptsvc.hooks): nothing by default, installed behaviour runs at the
library's real call sites, and the library never imports its tools or test helpers."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckptsvc import hooks
from ckptsvc.errors import ConfigError
from ckptsvc.stage.arena import copy_into
from ckptsvc.storage import Location

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def recorded() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every hook point the library calls while the test runs, with its arguments."""
    seen: list[tuple[str, dict[str, Any]]] = []
    removers = []
    for name in sorted(hooks.POINTS):
        if name == "sink.open":

            def wrap_fn(sink: Any, _name: str = name, **info: Any) -> Any:
                seen.append((_name, info))
                return sink

            removers.append(hooks.install(name, wrap_fn))
        else:

            def fn(_name: str = name, **info: Any) -> None:
                seen.append((_name, info))

            removers.append(hooks.install(name, fn))
    yield seen
    for remove in removers:
        remove()
    assert not any(hooks.installed(name) for name in hooks.POINTS)


def test_nothing_installed_is_a_no_op() -> None:
    hooks.point("publish.before", name="x", url="y")
    sentinel = object()
    assert hooks.wrap("sink.open", sentinel, name="x", url="y") is sentinel


def test_unknown_point_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown hook point 'publish\.befor'"):
        hooks.install("publish.befor", lambda **_: None)


def test_install_order_and_removal() -> None:
    calls: list[str] = []
    remove_a = hooks.install("job.submitted", lambda *, url: calls.append(f"a {url}"))
    remove_b = hooks.install("job.submitted", lambda *, url: calls.append(f"b {url}"))
    try:
        hooks.point("job.submitted", url="u")
        remove_a()
        hooks.point("job.submitted", url="v")
    finally:
        remove_b()
    hooks.point("job.submitted", url="w")
    assert calls == ["a u", "b u", "b v"]


def test_local_storage_calls_its_points(
    tmp_path: Path, recorded: list[tuple[str, dict[str, Any]]]
) -> None:
    loc = Location.parse(str(tmp_path / "d" / "f.json"))
    loc.publish(b"{}")
    loc.remove()
    sink = Location.parse(str(tmp_path / "d" / "s.bin")).open_sink()
    sink.write(b"abc")
    sink.close()
    names = [name for name, _ in recorded]
    assert names == [
        "publish.before",
        "rename.before",
        "publish.after",
        "remove.before",
        "unlink.after",
        "remove.after",
        "sink.open",
    ]
    assert recorded[1][1] == {"path": loc.path}
    assert recorded[3][1] == {"name": "f.json", "url": loc.url, "recursive": False}


def test_a_hook_can_fail_a_publish(tmp_path: Path) -> None:
    def fail(**_: Any) -> None:
        raise OSError(28, "injected")

    remove = hooks.install("rename.before", fail)
    try:
        with pytest.raises(OSError, match="injected"):
            Location.parse(str(tmp_path / "f.json")).publish(b"{}")
    finally:
        remove()
    assert not (tmp_path / "f.json").exists()
    assert list(tmp_path.iterdir()) == []  # the temp file went too


def test_snapshot_copy_points(recorded: list[tuple[str, dict[str, Any]]]) -> None:
    src, dst = torch.arange(8.0), torch.zeros(8)
    copy_into([dst], [src], threads=1)
    assert torch.equal(src, dst)
    assert [name for name, _ in recorded] == ["snapshot.copy.before", "snapshot.copy.after"]


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the ckptsvc modules ``path`` imports (any nesting)."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_library_never_imports_tools_or_testing() -> None:
    roots = {"ckptsvc": REPO / "ckptsvc", "ckptsvc.workers": REPO / "workers",
             "ckptsvc.storage": REPO / "storage"}  # fmt: skip
    offenders = []
    checked = 0
    for package, root in roots.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if package == "ckptsvc" and parts and parts[0] in ("tools", "testing"):
                continue
            if package == "ckptsvc" and parts and parts[0] == "cli":
                continue  # the CLI is the top layer
            pkg = ".".join([package, *rel.parts[:-1]])
            checked += 1
            for mod in _imports(path, pkg):
                if mod.startswith(("ckptsvc.tools", "ckptsvc.testing")):
                    offenders.append(f"{path.relative_to(REPO)} imports {mod}")
    assert checked > 50
    assert offenders == []
