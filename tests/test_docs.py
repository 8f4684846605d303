"""The documentation site builds, and its code samples are true.

- Every page is in the nav; the ``docs`` extra that ``.ci/run`` installs is declared.
- Every ``python`` sample compiles, and every name it takes from ckptsvc, torch or
  safetensors exists; every ``ckptsvc`` command line in a ``bash`` sample names a real
  subcommand and real options.
- Every sample not marked ``<!-- docs-test: skip (why) -->`` runs (slow): a page's python
  samples as one script in a fresh directory, then its bash samples, in page order. Pages
  whose samples use ``s3://`` run against moto's S3, with the credentials and endpoint in
  the environment as the page tells users to do. A sample marked
  ``<!-- docs-test: torchrun -->`` runs under ``torchrun`` with two processes, twice (the
  second run must resume).
- ``README.md`` counts as a page: its samples are checked and run the same way.
- ``mkdocs build --strict`` passes (slow). Without mkdocs the test skips, except with
  ``CI=true``, where it fails: CI must not pass by skipping the docs.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
import types
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
MKDOCS_YML = REPO / "mkdocs.yml"
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes", "on")
VENV_BIN = str(Path(sys.executable).parent)
HANG_GUARD_S = 400  # bound on a subprocess, so a hang fails instead of blocking CI
NOT_SAMPLES = {"design.md"}  # the lead's design document: prose, not tutorials
CHECKED_PACKAGES = {"ckptsvc", "torch", "safetensors"}
# Pages whose samples, run twice, must show on the second run that they resumed.
RERUN_EXPECT = {"how-to/resume-from-s3.md": "resumed from s3://"}

_FENCE_RE = re.compile(r"^```(\w*)\s*$")
_MARK_RE = re.compile(r"^<!-- docs-test: (skip|torchrun)(?: \((.+)\))? -->$")
_BUCKET_RE = re.compile(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/")


@dataclass(frozen=True)
class Sample:
    """One fenced code block of a page."""

    page: str  # relative to docs/ (the README: ../README.md)
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    mode: str  # "run" | "skip" | "torchrun"

    def __str__(self) -> str:
        return f"{os.path.normpath(f'docs/{self.page}')}:{self.line}"


def pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.relative_to(DOCS).parts)


def sample_pages() -> list[Path]:
    """The pages whose samples are checked and run: the site's and the README."""
    return [*pages(), README]


def samples_of(page: Path) -> list[Sample]:
    """Fenced blocks at column 0, each with the docs-test mark on the line before it."""
    rel = os.path.relpath(page, DOCS)
    lines = page.read_text().splitlines()
    out: list[Sample] = []
    i = 0
    while i < len(lines):
        m = _FENCE_RE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"docs/{rel}:{i + 1}: unclosed code fence"
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = _MARK_RE.match(before.strip())
        mode = mark.group(1) if mark else "run"
        out.append(Sample(rel, start + 1, lang, "\n".join(lines[start + 1 : end]), mode))
        i = end + 1
    return out


def all_samples(lang: str) -> list[Sample]:
    return [
        s
        for p in sample_pages()
        if p.name not in NOT_SAMPLES
        for s in samples_of(p)
        if s.lang == lang
    ]


# ---------------------------------------------------------------- the real CLI


def ckptsvc_help(*argv: str) -> str:
    """``ckptsvc [argv] --help`` from the real parser, in process."""
    from ckptsvc.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main([*argv, "--help"])
        except SystemExit as e:
            assert e.code in (0, None), (
                f"`ckptsvc {' '.join(argv)} --help` failed:\n{out.getvalue()}"
            )
    return out.getvalue()


def ckptsvc_subcommands() -> set[str]:
    m = re.search(r"\{([a-z0-9_,-]+)\}", ckptsvc_help())
    assert m, ckptsvc_help()
    return set(m.group(1).split(","))


def shell_commands(code: str) -> list[str]:
    """Command lines of a bash sample: continuations joined, comments dropped."""
    text = code.replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            commands.append(shlex.split(line, comments=True))
    return [" ".join(shlex.quote(a) for a in c) for c in commands if c]


# ---------------------------------------------------------------- site and nav


def nav_pages(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [p for item in node for p in nav_pages(item)]
    if isinstance(node, dict):
        return [p for value in node.values() for p in nav_pages(value)]
    return []


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load(MKDOCS_YML.read_text())
    in_nav = nav_pages(config["nav"])
    on_disk = [str(p.relative_to(DOCS)) for p in pages()]
    assert sorted(in_nav) == sorted(set(in_nav)), "a page is in the nav twice"
    assert set(in_nav) == set(on_disk), (
        f"not in the nav: {sorted(set(on_disk) - set(in_nav))}; "
        f"in the nav but missing: {sorted(set(in_nav) - set(on_disk))}"
    )
    assert {"Design": "design.md"} in config["nav"], "the design document must be in the nav"


def test_docs_extra_is_declared() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert "docs" in extras, "pyproject.toml needs a `docs` extra (mkdocs, material, mkdocstrings)"
    names = {re.split(r"[\[<>=!~; ]", req, maxsplit=1)[0].lower() for req in extras["docs"]}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names, extras["docs"]
    assert any(req.startswith("mkdocstrings[python]") for req in extras["docs"]), extras["docs"]


def mkdocs_missing() -> list[str]:
    return [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python")
            if importlib.util.find_spec(m.split(".")[0]) is None
            or (m == "mkdocstrings_handlers.python" and not _has_python_handler())]  # fmt: skip


def _has_python_handler() -> bool:
    try:
        return importlib.util.find_spec("mkdocstrings_handlers.python") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path: Path) -> None:
    missing = mkdocs_missing()
    if missing:
        message = (
            f"mkdocs build needs the `docs` extra (pip install -e '.[docs]'); missing {missing}"
        )
        if IN_CI:
            pytest.fail(message + " - CI=true forbids skipping the docs build", pytrace=False)
        pytest.skip(message)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S,
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    site = tmp_path / "site"
    knobs_page = (site / "operations" / "index.html").read_text()
    assert "CKPTSVC_ARENAS_PER_RANK" in knobs_page, "the knobs table was not generated"
    cli_page = (site / "reference" / "cli" / "index.html").read_text()
    assert "ckptsvc verify --help" in cli_page, "the CLI reference was not generated"
    api_page = (site / "reference" / "storage" / "index.html").read_text()
    assert "ckptsvc.storage.location.Location" in api_page, "ckptsvc.storage was not documented"


# ---------------------------------------------------------------- samples are true


def _resolve(module: types.ModuleType, attrs: list[str], where: str) -> None:
    obj: Any = module
    path = module.__name__
    for attr in attrs:
        if not isinstance(obj, (types.ModuleType, type)):
            return  # an instance: its attributes are not ours to check statically
        if not hasattr(obj, attr):
            try:
                obj = importlib.import_module(f"{path}.{attr}")
            except ImportError:
                pytest.fail(f"{where}: `{path}.{attr}` does not exist", pytrace=False)
        else:
            obj = getattr(obj, attr)
        path = f"{path}.{attr}"


def check_names(sample: Sample) -> None:
    tree = ast.parse(sample.code, filename=str(sample))
    aliases: dict[str, types.ModuleType] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in CHECKED_PACKAGES:
                    mod = importlib.import_module(a.name)
                    aliases[a.asname or a.name.split(".")[0]] = (
                        mod if a.asname else importlib.import_module(a.name.split(".")[0])
                    )
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.split(".")[0] in CHECKED_PACKAGES
        ):
            mod = importlib.import_module(node.module)
            for a in node.names:
                _resolve(mod, [a.name], f"{sample}")
                value = getattr(mod, a.name, None)
                if isinstance(value, types.ModuleType):
                    aliases[a.asname or a.name] = value
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain: list[str] = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                chain.insert(0, cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in aliases:
                _resolve(aliases[cur.id], chain, f"{sample}")


@pytest.mark.parametrize("sample", all_samples("python"), ids=str)
def test_python_sample_compiles_and_names_real_apis(sample: Sample) -> None:
    compile(sample.code, str(sample), "exec")
    check_names(sample)


def bash_samples_with_ckptsvc() -> list[Sample]:
    return [s for s in all_samples("bash") if re.search(r"^\s*ckptsvc ", s.code, re.MULTILINE)]


@pytest.mark.parametrize("sample", bash_samples_with_ckptsvc(), ids=str)
def test_cli_sample_uses_real_commands_and_options(sample: Sample) -> None:
    subcommands = ckptsvc_subcommands()
    for command in shell_commands(sample.code):
        argv = shlex.split(command)
        if argv[0] != "ckptsvc":
            continue
        assert argv[1] in subcommands, f"{sample}: `ckptsvc {argv[1]}` is not a subcommand"
        help_text = ckptsvc_help(argv[1])
        for flag in (a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text), (
                f"{sample}: `ckptsvc {argv[1]}` has no option {flag}"
            )


# ---------------------------------------------------------------- samples run


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["CKPTSVC_NODE_ID"] = f"test-docs-{uuid.uuid4().hex[:12]}"  # a writer with this env
    env["CKPTSVC_WRITER_LINGER_S"] = "1"  # it inherits stderr: exit soon after the sample
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run(argv: list[str], *, cwd: Path, env: dict[str, str], what: str) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(
            f"{what} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
            f"--- stderr\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return proc.stdout + proc.stderr


def runnable_pages() -> list[Any]:
    params = []
    for page in sample_pages():
        if page.name in NOT_SAMPLES:
            continue
        samples = [s for s in samples_of(page) if s.mode == "run" and s.lang in ("python", "bash")]
        if not samples:
            continue
        uses_s3 = any("s3://" in s.code for s in samples)
        rel = os.path.relpath(page, DOCS)
        params.append(pytest.param(rel, id=rel, marks=[pytest.mark.cloud] if uses_s3 else []))
    return params


def s3_environment(request: pytest.FixtureRequest, buckets: set[str]) -> dict[str, str]:
    """moto's S3 behind the standard AWS variables; ``buckets`` exist and are empty."""
    server = request.getfixturevalue("moto_server")
    client = server.boto3_client()
    for bucket in sorted(buckets):
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for listing in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in listing.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    return {
        "AWS_ENDPOINT_URL_S3": server.endpoint_url,
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.mark.slow
@pytest.mark.parametrize("page", runnable_pages())
def test_page_samples_run(page: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    samples = [s for s in samples_of(DOCS / page) if s.mode == "run"]
    python = [s for s in samples if s.lang == "python"]
    bash = [s for s in samples if s.lang == "bash"]
    extra: dict[str, str] = {}
    buckets = {b for s in samples for b in _BUCKET_RE.findall(s.code)}
    if buckets:
        extra = s3_environment(request, buckets)
    env = subprocess_env(**extra)
    outputs = []
    if python:
        script = tmp_path / "samples.py"
        script.write_text("\n\n".join(f"# {s}\n{s.code}" for s in python) + "\n")
        runs = 2 if page in RERUN_EXPECT else 1
        for _ in range(runs):
            outputs.append(run([sys.executable, str(script)], cwd=tmp_path, env=env,
                               what=f"the python samples of docs/{page}"))  # fmt: skip
    for s in bash:
        run(["bash", "-euo", "pipefail", "-c", s.code], cwd=tmp_path, env=env, what=f"{s}")
    if page in RERUN_EXPECT:
        assert RERUN_EXPECT[page] in outputs[-1], f"second run did not resume:\n{outputs[-1]}"


def torchrun_samples() -> list[Sample]:
    return [s for s in all_samples("python") if s.mode == "torchrun"]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("sample", torchrun_samples(), ids=str)
def test_torchrun_sample_runs_and_resumes(sample: Sample, tmp_path: Path) -> None:
    script = tmp_path / "sample.py"
    script.write_text(sample.code + "\n")
    argv = [str(Path(VENV_BIN) / "torchrun"), "--standalone", "--nproc-per-node=2", str(script)]
    env = subprocess_env()
    run(argv, cwd=tmp_path, env=env, what=f"{sample} (first run)")
    second = run(argv, cwd=tmp_path, env=env, what=f"{sample} (second run)")
    assert "resumed from" in second, f"{sample}: the second run did not resume:\n{second[-3000:]}"
