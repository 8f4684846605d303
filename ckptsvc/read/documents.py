"""Where a component's document is, and reading it from there.

A component instance's document (:mod:`ckptsvc.stage.component_plan`) is either the JSON
file ``<key>_state<suffix>.json`` or, when the instance has tensor files, the string
``__metadata__["ckptsvc_component"]`` in the safetensors header of its first tensor file
(``model.safetensors``, ``optimizer_state.safetensors``, ``optimizer_state_rank_3.
safetensors``...). The manifest's ``metadata.ckptsvc.instances[<suffix>]["doc"]`` names
whichever holds it; checkpoints written before the documents moved keep JSON files there.

:func:`model_param_sharing` answers what the HF index's ``metadata.param_sharing`` used
to for a model saved as one ``model.safetensors`` without an index (as transformers
writes a model that fits in one shard): the tied groups, from the model's document.
"""

from __future__ import annotations

from typing import Any

from ckptsvc.errors import CorruptCheckpointError
from ckptsvc.format.json_doc import parse_json_doc
from ckptsvc.format.manifest import Manifest, check_relpath
from ckptsvc.format.safetensors_stream import ShardLayout
from ckptsvc.read.loading import read_checked_doc, read_safetensors_header
from ckptsvc.read.regions import RegionReader
from ckptsvc.stage.parts import DOC_META_KEY, MODEL_KEY
from ckptsvc.storage import Location

__all__ = ["instance_doc_name", "model_param_sharing", "read_document"]

_WHAT = "component document"


def instance_doc_name(manifest: Manifest | None, key: str, suffix: str = "") -> str | None:
    """The file that holds the document of component ``key``'s instance ``suffix`` (a
    ``.json`` file or a ``.safetensors`` file whose header carries it), per the manifest;
    None when the manifest lists no such instance or document."""
    if manifest is None:
        return None
    rec = next((c for c in manifest.components if c.key == key), None)
    ours = rec.metadata.get("ckptsvc") if rec is not None else None
    instances = ours.get("instances") if isinstance(ours, dict) else None
    inst = instances.get(suffix) if isinstance(instances, dict) else None
    name = inst.get("doc") if isinstance(inst, dict) else None
    return name if isinstance(name, str) and name else None


def read_document(
    ckpt: Location,
    name: str,
    *,
    manifest: Manifest | None = None,
    reader: RegionReader | None = None,
    what: str = _WHAT,
) -> Any:
    """The parsed document ``name`` of ``ckpt`` names: a JSON file read bounded (checked
    against ``manifest``'s size and CRC-32C when given), or, for a ``.safetensors`` name,
    the document in that file's header (through ``reader``, which keeps the header for
    the tensor reads that follow). :class:`CorruptCheckpointError` when it is not there."""
    rel = check_relpath(name, where=ckpt.url)
    if rel.endswith(".safetensors"):
        return (reader or RegionReader(ckpt, manifest=manifest)).document(rel, what=what)
    return read_checked_doc(ckpt, rel, manifest=manifest, what=what)


def _groups(value: Any, *, where: str) -> list[list[str]]:
    if value is None:
        return []
    if not (
        isinstance(value, list)
        and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in value)
    ):
        raise CorruptCheckpointError(f"{where}: 'param_sharing' must be a list of lists of names")
    return [list(g) for g in value]


def model_param_sharing(
    ckpt: Location,
    manifest: Manifest | None,
    *,
    file_name: str,
    layout: ShardLayout | None = None,
) -> list[list[str]]:
    """The tied groups of the model saved as the single file ``file_name`` (no HF index):
    ``param_sharing`` of the document in its header (``layout``, already read, or read
    now), else of the model component's document the manifest names (a JSON file when the
    document was too large for the header). ``[]`` for a file without either (a model
    written by another tool: transformers ties weights from its config)."""
    doc: Any = None
    loc = ckpt.join(check_relpath(file_name, where=ckpt.url))
    where = loc.url
    if layout is None:
        layout, _ = read_safetensors_header(loc)
    text = (layout.metadata or {}).get(DOC_META_KEY)
    if text is not None:
        doc = parse_json_doc(text.encode("utf-8"), where=where, what=_WHAT)
    else:
        name = instance_doc_name(manifest, MODEL_KEY)
        if name is None:
            return []
        where = ckpt.join(name).url
        doc = read_document(ckpt, name, manifest=manifest)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{where}: not a ckptsvc component document")
    return _groups(doc.get("param_sharing"), where=where)
