"""What Hugging Face's ``save_pretrained`` writes besides the weights.

A checkpoint whose model component is a ``transformers`` model also holds its
``config.json`` and ``generation_config.json`` (and, for ``save_model``, the
preprocessor's files), so ``from_pretrained(<checkpoint>)`` works with no extra step.
Duck-typed: any model with a ``config`` that has ``save_pretrained`` / ``to_json_file``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["cached_pretrained_files", "pretrained_files"]

#: configs' files by their JSON text: a save re-serialises them only when one changed
_CACHE: OrderedDict[tuple[str, ...], dict[str, bytes]] = OrderedDict()
_CACHE_SIZE = 8
_LOCK = threading.Lock()


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


def _json_text(obj: Any) -> str | None:
    to_json = getattr(obj, "to_json_string", None)
    return to_json() if callable(to_json) else None


def cached_pretrained_files(model: Any) -> dict[str, bytes]:
    """:func:`pretrained_files` of ``model``, cached by the type and ``to_json_string()``
    of its ``config`` and ``generation_config`` (a few microseconds instead of a temporary
    directory per save); uncached when the config has no ``to_json_string``."""
    config = getattr(model, "config", None)
    generation = getattr(model, "generation_config", None)
    text = _json_text(config)
    if text is None:
        return pretrained_files(model)
    gen_text = "" if generation is None else _json_text(generation)
    if gen_text is None:
        return pretrained_files(model)
    key = (type(config).__qualname__, text, type(generation).__qualname__, gen_text)
    with _LOCK:
        files = _CACHE.get(key)
        if files is not None:
            _CACHE.move_to_end(key)
            return dict(files)
    files = pretrained_files(model)
    with _LOCK:
        _CACHE[key] = files
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return dict(files)
