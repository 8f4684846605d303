"""mkdocs hook: let mkdocstrings see the package as it is installed, not as it is stored.

The repository keeps ``workers/`` and ``storage/`` at the top level and setuptools maps
them to ``ckptsvc.workers`` and ``ckptsvc.storage`` (``[tool.setuptools.package-dir]`` in
``pyproject.toml``). mkdocstrings' python handler (griffe) reads sources statically and
finds ``ckptsvc`` in the repository, so ``ckptsvc.storage`` would not exist for it.

Call order (mkdocs runs it once per build, in the mkdocs process):

1. ``on_config``: read the package-dir mapping from ``pyproject.toml``, build a mirror of
   the installed layout in a temporary directory (a copy of the sources: griffe resolves
   symlinks back to the repository, so links would not do), and put that directory
   first in the python handler's ``paths``;
2. ``on_shutdown``: remove the mirror.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the docs build runs on 3.11+
    import tomli as tomllib

log = logging.getLogger("mkdocs.hooks.api_source")

_mirror: Path | None = None


def package_dirs(pyproject: Path) -> dict[str, Path]:
    """``{import name: source directory}`` from ``[tool.setuptools.package-dir]``."""
    doc = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    mapping = doc.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    if not mapping:
        raise PluginError(f"{pyproject}: no [tool.setuptools.package-dir] table to mirror")
    return {name: (pyproject.parent / rel).resolve() for name, rel in mapping.items()}


def build_mirror(packages: dict[str, Path], dest: Path) -> None:
    """Copy the sources of ``packages`` under ``dest`` in their installed layout.

    Parents first, so ``ckptsvc/`` exists before ``ckptsvc/storage/`` is copied into it;
    a sub-package's directory replaces anything of the same name in its parent.
    """
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in sorted(packages, key=lambda n: n.count(".")):
        target = dest.joinpath(*name.split("."))
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(packages[name], target, ignore=skip)


@event_priority(100)  # before mkdocstrings' own on_config, which creates the handler
def on_config(config: Any) -> Any:
    global _mirror
    repo = Path(config.config_file_path).resolve().parent
    _mirror = Path(tempfile.mkdtemp(prefix="ckptsvc-docs-src-"))
    build_mirror(package_dirs(repo / "pyproject.toml"), _mirror)
    plugin = config.plugins.get("mkdocstrings")
    if plugin is None:
        raise PluginError("mkdocs.yml: the api_source hook needs the mkdocstrings plugin")
    python = plugin.config.handlers.setdefault("python", {})
    python["paths"] = [str(_mirror), *python.get("paths", [])]
    log.debug("mkdocstrings reads the package from %s", _mirror)
    return config


def on_shutdown() -> None:
    global _mirror
    if _mirror is not None:
        shutil.rmtree(_mirror, ignore_errors=True)
        _mirror = None
