"""What the ``ckptsvc`` commands share: the ``--json``/``--storage-options`` options,
JSON option values, sizes and tables for humans."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from ckptsvc.errors import ConfigError

__all__ = [
    "add_common_options",
    "human_bytes",
    "json_object",
    "positive_int",
    "print_table",
    "storage_options",
]


def storage_options(args: argparse.Namespace) -> dict[str, Any]:
    raw = getattr(args, "storage_options", None)
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options is not valid JSON: {e}") from e
    if not isinstance(opts, dict):
        raise ConfigError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return opts


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def json_object(raw: str | None, flag: str) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object")
    return value


def human_bytes(n: float) -> str:
    """``n`` bytes as ``"512 B"``, ``"1.5 KiB"`` ... ``"3.0 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def print_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


def add_common_options(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument(
        "--storage-options",
        metavar="JSON",
        help='fsspec options, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\'',
    )
