"""mkdocs hook: fill marked sections of pages from the code, so they cannot go stale.

A page asks for a section with an HTML comment on a line of its own:

- ``<!-- ckptsvc:knobs -->``: a table of every knob in :mod:`ckptsvc.knobs` (environment
  variable, default, description), in definition order;
- ``<!-- ckptsvc:cli -->``: the ``--help`` of ``ckptsvc`` and of every subcommand, taken
  from the real parser through :func:`ckptsvc.cli.main`.

Call order: mkdocs calls ``on_page_markdown`` once per page (mkdocs process, main
thread); pages without a marker pass through unchanged. A generator that fails raises,
which fails the build with a ``PluginError`` that says which command or marker.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

from mkdocs.exceptions import PluginError

_SUBCOMMANDS_RE = re.compile(r"\{([a-z0-9_,-]+)\}")


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def _default_text(name: str, default: object) -> str:
    if isinstance(default, bool):
        return "`1` (on)" if default else "`0` (off)"
    if isinstance(default, int) and (name.endswith("_bytes") or name.endswith("_size")):
        return f"`{default}` ({_human_bytes(default)})"
    if default == "":
        return "*(empty)*"
    return f"`{default}`"


def knobs_table() -> str:
    """Markdown table of every knob's environment variable, default and description."""
    from ckptsvc import knobs

    rows = [
        f"| `{k.env_var}` | {_default_text(k.name, k.default)} | {k.doc} |"
        for k in vars(knobs).values()
        if isinstance(k, knobs.Knob)
    ]
    if not rows:
        raise PluginError("ckptsvc.knobs defines no Knob: the knobs table would be empty")
    return "\n".join(["| Environment variable | Default | What it does |", "|---|---|---|", *rows])


@contextlib.contextmanager
def _help_environment() -> Iterator[None]:
    """Fixed terminal width and no colour, so the help text is the same on every machine."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ.update(COLUMNS="100", NO_COLOR="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _help_text(argv: list[str]) -> str:
    from ckptsvc.cli import main

    out = io.StringIO()
    with _help_environment(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(argv)
        except SystemExit as e:
            if e.code not in (0, None):
                raise PluginError(
                    f"`ckptsvc {' '.join(argv)}` exited {e.code}: {out.getvalue().strip()}"
                ) from e
        else:
            raise PluginError(f"`ckptsvc {' '.join(argv)}` did not print help and exit")
    return out.getvalue().rstrip()


def cli_reference() -> str:
    """``ckptsvc --help`` and ``ckptsvc <command> --help`` for every subcommand."""
    top = _help_text(["--help"])
    match = _SUBCOMMANDS_RE.search(top)
    if match is None:
        raise PluginError(f"no {{subcommand,...}} list in `ckptsvc --help`:\n{top}")
    parts = ["```text", "$ ckptsvc --help", top, "```"]
    for sub in match.group(1).split(","):
        parts += ["", f"### `ckptsvc {sub}`", "", "```text", f"$ ckptsvc {sub} --help"]
        parts += [_help_text([sub, "--help"]), "```"]
    return "\n".join(parts)


GENERATORS: dict[str, Callable[[], str]] = {
    "knobs": knobs_table,
    "cli": cli_reference,
}
_MARKER_RE = re.compile(r"^<!-- ckptsvc:([a-z]+) -->$", re.MULTILINE)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    def replace(m: re.Match[str]) -> str:
        generate = GENERATORS.get(m.group(1))
        if generate is None:
            raise PluginError(
                f"{page.file.src_path}: unknown generated section {m.group(0)}; "
                f"known: {sorted(GENERATORS)}"
            )
        return generate()

    return _MARKER_RE.sub(replace, markdown)
