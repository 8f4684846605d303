"""``ckptsvc bench --plot FILE.svg``: the run's save times as a bar chart, dependency-free.

For each method that ran, two bars: the time the caller was blocked, and the time until
the data was durable. Written as plain SVG so the docs can embed it and no plotting
library is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from xml.sax.saxutils import escape

from ckptsvc.tools.bench_report import Row

__all__ = ["render_svg"]

_BAR_H = 12
_GAP = 10
_LABEL_W = 230
_CHART_W = 460
_COLORS = {"blocking": "#1f77b4", "durable": "#ff7f0e"}


def render_svg(rows: Sequence[Row], *, title: str) -> str:
    """An SVG document with blocking and durable seconds per method (rows that ran)."""
    ran = [
        r
        for r in rows
        if r.status == "ok"
        and r.durable_s is not None
        and (r.kind == "save" or r.method in ("memcpy", "raw_write"))
    ]
    longest = max((max(r.blocking_s or 0.0, r.durable_s or 0.0) for r in ran), default=1.0) or 1.0
    scale = _CHART_W / longest
    height = 60 + len(ran) * (2 * _BAR_H + _GAP) + 30
    width = _LABEL_W + _CHART_W + 90
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="11">',
        f'<text x="10" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for i, (name, color) in enumerate(_COLORS.items()):
        x = _LABEL_W + i * 150
        out.append(f'<rect x="{x}" y="28" width="10" height="10" fill="{color}"/>')
        out.append(f'<text x="{x + 14}" y="37">{name} s</text>')
    y = 50
    for r in ran:
        out.append(
            f'<text x="{_LABEL_W - 6}" y="{y + _BAR_H + 3}" text-anchor="end">{escape(r.label)}</text>'
        )
        for j, (field, color) in enumerate(_COLORS.items()):
            value = float(getattr(r, f"{field}_s") or 0.0)
            top = y + j * _BAR_H
            out.append(
                f'<rect class="{field}" x="{_LABEL_W}" y="{top}" width="{max(value * scale, 1):.1f}" '
                f'height="{_BAR_H - 1}" fill="{color}"><title>{escape(r.label)}: {field} {value:.3f} s</title></rect>'
            )
            out.append(
                f'<text x="{_LABEL_W + value * scale + 4:.1f}" y="{top + _BAR_H - 2}">{value:.3f}</text>'
            )
        y += 2 * _BAR_H + _GAP
    out.append(
        f'<text x="{_LABEL_W}" y="{height - 8}" fill="#555">seconds (shorter is better)</text>'
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"
