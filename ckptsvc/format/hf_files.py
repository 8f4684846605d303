"""What Hugging Face's ``save_pretrained`` writes besides the weights.

A checkpoint whose model component is a ``transformers`` model also holds its
``config.json`` and ``generation_config.json`` (and, for ``save_model``, the
preprocessor's files), so ``from_pretrained(<checkpoint>)`` works with no extra step.
Duck-typed: any model with a ``config`` that has ``save_pretrained`` / ``to_json_file``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

__all__ = ["pretrained_files"]


def pretrained_files(model: Any, *, preprocessor: Any = None) -> dict[str, bytes]:
    """What ``save_pretrained`` writes besides the weights (``config.json``,
    ``generation_config.json``, the preprocessor's files), by relative path."""
    config = getattr(model, "config", None)
    writers: list[Callable[[str], Any]] = []
    if config is not None and callable(getattr(config, "save_pretrained", None)):
        writers.append(config.save_pretrained)
    elif config is not None and callable(getattr(config, "to_json_file", None)):
        writers.append(lambda d: config.to_json_file(os.path.join(d, "config.json")))
    generation = getattr(model, "generation_config", None)
    if generation is not None and callable(getattr(generation, "save_pretrained", None)):
        writers.append(generation.save_pretrained)
    if preprocessor is not None and callable(getattr(preprocessor, "save_pretrained", None)):
        writers.append(preprocessor.save_pretrained)
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory(prefix="ckptsvc-export-") as tmp:
        for write in writers:
            write(tmp)
        for root, _, names in os.walk(tmp):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), tmp).replace(os.sep, "/")
                with open(os.path.join(root, name), "rb") as f:
                    files[rel] = f.read()
    return files
