"""mkdocs hook: render the reStructuredText roles that ckptsvc's docstrings use.

Docstrings say ``:class:`SaveHandle``` and end paragraphs with ``Usage::``, which Python
Markdown renders literally as ":class:<code>SaveHandle</code>" and "Usage::". This hook
drops the role prefix (the name stays in code font) and the second colon.

Call order: mkdocs calls ``on_page_content`` once per page with the rendered HTML (mkdocs
process, main thread), after mkdocstrings has inserted the API documentation.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE_RE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")
_LITERAL_MARK_RE = re.compile(r"::(?=</p>)")


def on_page_content(html: str, **_: Any) -> str:
    return _LITERAL_MARK_RE.sub(":", _ROLE_RE.sub("", html))
