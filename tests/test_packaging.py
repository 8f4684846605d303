"""The wheel maps ``workers/`` and ``storage/`` under ``ckptsvc`` and ships nothing top-level.

Builds the wheel from a copy of the source tree (no network: ``--no-isolation``), installs it
with ``--no-deps`` into a fresh venv without system site-packages, and inspects the result.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCE_ENTRIES = ("pyproject.toml", "README.md", "ckptsvc", "workers", "storage")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(
            f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
            f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
        )
    return proc.stdout


@pytest.fixture(scope="module")
def wheel_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the wheel once for this module, from a clean copy of the sources."""
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "*.pyc")
    for name in SOURCE_ENTRIES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(out),
            str(src),
        ],
        cwd=src,
    )
    wheels = sorted(out.glob("ckptsvc-*.whl"))
    if len(wheels) != 1:
        pytest.fail(f"expected one ckptsvc wheel in {out}, found {[w.name for w in wheels]}")
    return wheels[0]


def _package_files(root: Path, package_dir: str) -> set[str]:
    return {
        p.relative_to(root / package_dir).as_posix() for p in (root / package_dir).rglob("*.py")
    }


def test_wheel_contents_are_namespaced(wheel_path: Path) -> None:
    with zipfile.ZipFile(wheel_path) as whl:
        names = set(whl.namelist())
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"ckptsvc", f"ckptsvc-{wheel_path.name.split('-')[1]}.dist-info"}
    for sub, src in (("ckptsvc/workers", "workers"), ("ckptsvc/storage", "storage")):
        shipped = {
            n[len(sub) + 1 :] for n in names if n.startswith(sub + "/") and n.endswith(".py")
        }
        assert shipped == _package_files(REPO, src), f"{sub} differs from {src}/"
    assert "ckptsvc/py.typed" in names
    assert _package_files(REPO, "ckptsvc") <= {n[len("ckptsvc/") :] for n in names}


def test_wheel_installs_into_fresh_venv(wheel_path: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=False, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    # the outer pip installs into the new interpreter (no ensurepip, no network, no torch)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "--no-compile",
            str(wheel_path),
        ],
        cwd=tmp_path,
    )
    probe = (
        "import json, os, sysconfig;"
        "sp = sysconfig.get_paths()['purelib'];"
        "print(json.dumps({'site': sp, 'entries': sorted(os.listdir(sp))}))"
    )
    info = json.loads(_run([str(python), "-c", probe], cwd=tmp_path))
    site = Path(info["site"])
    assert "workers" not in info["entries"]
    assert "storage" not in info["entries"]
    for rel in (
        "ckptsvc/__init__.py",
        "ckptsvc/py.typed",
        "ckptsvc/workers/__init__.py",
        "ckptsvc/storage/__init__.py",
        "ckptsvc/storage/location.py",
    ):
        assert (site / rel).is_file(), f"{rel} missing from the installed wheel"
    assert (env_dir / "bin" / "ckptsvc").is_file(), "console script `ckptsvc` not installed"


def test_editable_install_has_no_top_level_modules(tmp_path: Path) -> None:
    """In the development install too, only ``ckptsvc.workers``/``ckptsvc.storage`` import."""
    code = (
        "import importlib.util as u, json;"
        "print(json.dumps({n: u.find_spec(n) is not None for n in"
        " ('workers', 'storage', 'ckptsvc.workers', 'ckptsvc.storage')}))"
    )
    found = json.loads(_run([sys.executable, "-c", code], cwd=tmp_path))  # cwd: not the repo
    assert found == {
        "workers": False,
        "storage": False,
        "ckptsvc.workers": True,
        "ckptsvc.storage": True,
    }
