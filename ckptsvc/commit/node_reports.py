"""Node reports: one node's rank reports merged by its leader, so rank 0 merges nodes.

The last rank of a node to report (the node's leader, :mod:`ckptsvc.commit.coordinator`)
fetches its node's rank reports and, instead of forwarding them as they are, merges them
(:func:`premerge_batch`): one JSON document per node with, per component, the instances
its ranks write (their ranks and files), the summed bytes, the sharded pieces in rank
order, and the distinct structure signatures and replica checksums with the ranks that
hold each; and the node's file records with their writer. Rank 0 then decodes n = N / 8
node documents (plain ``json.loads``, no object per rank or per file until the manifest's
own records) and merges them (:func:`merge_nodes`): its CPU per save grows with the nodes
plus the instance records the manifest lists anyway, not with N dataclass reports.

The merge is the one of :func:`~ckptsvc.commit.reports.merge_reports` (which runs on one
node report of its own): every check it makes - the same components in the same order,
the same step and path, no file written by two ranks, identical structure of replicated
state, per-tensor checksums - gives the same verdict, and names the same ranks, whether
the ranks' reports were merged by their leader or not. A leader whose reports fail a
check, or hold a failed rank, forwards them as they are (a "raw" batch, the reports
newline-separated): rank 0 merges those itself and raises the error with its message.
A node report starts with ``N``; a raw batch with ``{``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ckptsvc.errors import (
    CoordinationError,
    CorruptCheckpointError,
    ReplicationMismatchError,
    SaveFailedError,
)
from ckptsvc.format.manifest import ComponentRecord, FileRecord
from ckptsvc.stage.parts import doc_name

__all__ = ["NODE_PREFIX", "decode_batches", "merge_nodes", "node_of", "premerge_batch"]

#: the first byte of a node report (a raw batch starts with a rank report's ``{``)
NODE_PREFIX = b"N"

Node = dict[str, Any]


class _Fallback(Exception):
    """A leader's reports fail a check: forward them raw (rank 0 raises the error)."""


def premerge_batch(raws: Sequence[bytes]) -> bytes:
    """The leader: its node's rank reports (JSON, :meth:`RankReport.to_json`) as one node
    report, or the raw batch when one failed or they disagree (see the module docstring)."""
    try:
        reports = sorted((json.loads(r) for r in raws), key=lambda d: int(d["rank"]))
        node = node_of(reports, strict=False)
    except (_Fallback, ValueError, KeyError, TypeError, AttributeError):
        return b"\n".join(raws)
    return NODE_PREFIX + json.dumps(node, ensure_ascii=True, allow_nan=False).encode("ascii")


def decode_batches(batches: Iterable[bytes], *, where: str = "node batch") -> list[Node]:
    """Rank 0: the node reports of ``batches`` (merging raw batches here), sorted by their
    first rank. A failed rank in a raw batch raises :class:`SaveFailedError` naming the
    first failed rank of all (and the others); a malformed batch
    :class:`CorruptCheckpointError`."""
    nodes: list[Node] = []
    raw: list[tuple[str, list[dict[str, Any]]]] = []
    for i, batch in enumerate(batches):
        name = f"{where} {i + 1}"
        try:
            if batch[:1] == NODE_PREFIX:
                node = json.loads(batch[1:])
                if not isinstance(node, dict) or not node.get("ranks"):
                    raise ValueError("not a node report")
                nodes.append(node)
            else:
                raw.append((name, [json.loads(line) for line in batch.split(b"\n")]))
        except (UnicodeDecodeError, ValueError) as e:
            raise CorruptCheckpointError(f"{name}: malformed node batch ({e})") from e
    if raw:
        reports = sorted((d for _, ds in raw for d in ds), key=lambda d: int(d["rank"]))
        failed = [d for d in reports if d.get("error") is not None]
        if failed:
            first = failed[0]
            others = f" (ranks {[d['rank'] for d in failed]} failed)" if len(failed) > 1 else ""
            raise SaveFailedError(
                f"rank {first['rank']} failed to write its part: {first.get('error_type')}: "
                f"{first['error']}{others}"
            )
        for name, ds in raw:
            try:
                nodes.append(node_of(sorted(ds, key=lambda d: int(d["rank"])), strict=True))
            except (KeyError, TypeError, AttributeError) as e:
                raise CorruptCheckpointError(f"{name}: malformed rank report ({e!r})") from e
    nodes.sort(key=lambda n: int(n["ranks"][0]))
    return nodes


def node_of(reports: Sequence[Mapping[str, Any]], *, strict: bool) -> Node:
    """One node report from rank reports as JSON data (sorted by rank, none failed).
    ``strict``: raise the check's error (rank 0); else :class:`_Fallback` (a leader)."""
    if not strict and any(r.get("error") is not None for r in reports):
        raise _Fallback
    first = reports[0]
    want = [(p["key"], p["pattern"]) for p in first["parts"]]
    for r in reports[1:]:
        got = [(p["key"], p["pattern"]) for p in r["parts"]]
        if got != want or r.get("step") != first.get("step") or r["path"] != first["path"]:
            if not strict:
                raise _Fallback
            _disagree(r["rank"], got, r.get("step"), r["path"], first["rank"], want, first)
    files: list[list[Any]] = []
    seen: dict[str, int] = {}
    for r in reports:
        rank = int(r["rank"])
        for path, nbytes, crc in r.get("files") or ():
            if path in seen:
                if not strict:
                    raise _Fallback
                _twice(path, seen[path], rank)
            seen[path] = rank
            files.append([path, nbytes, crc, rank])
    parts = [_node_part(i, head, reports) for i, head in enumerate(first["parts"])]
    return {
        "ranks": [int(r["rank"]) for r in reports],
        "step": first.get("step"),
        "path": first["path"],
        "parts": parts,
        "files": files,
    }


def _node_part(i: int, head: Mapping[str, Any], reports: Sequence[Mapping[str, Any]]) -> Node:
    signatures: dict[str, list[int]] = {}
    crcs: dict[tuple[str, ...], list[int]] = {}
    instances: dict[str, dict[str, Any]] = {}
    sharded: dict[str, list[Any]] = {}
    nbytes = 0
    for r in reports:
        p = r["parts"][i]
        rank = int(r["rank"])
        signatures.setdefault(str(p.get("signature", "")), []).append(rank)
        if p.get("crcs") is not None:
            crcs.setdefault(tuple(p["crcs"]), []).append(rank)
        nbytes += int(p.get("nbytes") or 0)
        if p.get("instance") is not None:
            inst = instances.setdefault(p["instance"], {"doc": None, "ranks": [], "files": []})
            inst["ranks"].append(rank)
            inst["files"].extend(p.get("files") or ())
            if p.get("doc"):
                inst["doc"] = p["doc"]
        for fqn, pieces in (p.get("sharded") or {}).items():
            sharded.setdefault(fqn, []).extend(pieces)
    return {
        "key": head["key"],
        "pattern": head["pattern"],
        "group_name": head.get("group_name"),
        "replicas": head.get("replicas"),
        "metadata": head.get("metadata") or {},
        "signatures": [[s, ranks] for s, ranks in signatures.items()],
        "crcs": [[list(c), ranks] for c, ranks in crcs.items()],
        "nbytes": nbytes,
        "instances": instances,
        "sharded": sharded or None,
    }


def _disagree(
    rank: int,
    got: Any,
    step: Any,
    path: str,
    first_rank: int,
    want: Any,
    first: Mapping[str, Any],
) -> None:
    if got != want:
        raise ReplicationMismatchError(
            f"rank {rank} saved components {got} but rank {first_rank} saved {want}; "
            "every rank must pass the same components in the same order"
        )
    raise ReplicationMismatchError(
        f"rank {rank} saved step {step} to {path} but rank {first_rank} saved "
        f"step {first.get('step')} to {first['path']}; every rank must call save in the same order"
    )


def _twice(path: str, owner: int, rank: int) -> None:
    raise CoordinationError(
        f"{path} was written by rank {owner} and rank {rank}; check "
        "LOCAL_RANK / GROUP_RANK / process groups (two ranks claim one instance)"
    )


def _replicas(value: Any) -> tuple[int, ...] | None:
    """A head's ``replicas``: a list, or a range as :func:`~.reports._compact` writes it."""
    if value is None:
        return None
    if isinstance(value, dict):
        start, stop, step = (int(x) for x in value["range"])
        return tuple(range(start, stop, step))
    return tuple(int(x) for x in value)


def _check_replicas(key: str, parts: Sequence[Node], names: Sequence[str] = ()) -> None:
    """Structure (signature) and, when reported, per-tensor checksums agree across every
    rank of ``parts`` (one per node, in rank order); errors name the ranks as a merge of
    the rank reports would."""
    base_rank = int(parts[0]["signatures"][0][1][0])
    base = parts[0]["signatures"][0][0]
    for np in parts:
        for sig, ranks in np["signatures"]:
            if sig != base:
                raise ReplicationMismatchError(
                    f"component {key!r}: rank {min(ranks)} holds a different structure "
                    f"(tensor names, shapes, dtypes or non-tensor values) than rank "
                    f"{base_rank}; REPLICATED state must be identical on every rank"
                )
    entries = [(c, ranks) for np in parts for c, ranks in np["crcs"]]
    if sum(len(ranks) for _, ranks in entries) < 2 or len(entries) < 2:
        return  # fewer than two ranks with checksums, or all of them in one agreeing group
    ref_crcs, ref_ranks = min(entries, key=lambda e: min(e[1]))
    ref_rank = min(ref_ranks)
    for i, crc in enumerate(ref_crcs):
        values: dict[str, list[int]] = {}
        for c, ranks in entries:
            values.setdefault(c[i], []).extend(ranks)
        if len(values) > 1:
            tensor = names[i] if i < len(names) else f"#{i}"
            detail = "; ".join(
                f"ranks {sorted(ranks)} crc32c {v}" for v, ranks in sorted(values.items())
            )
            raise ReplicationMismatchError(
                f"component {key!r}: tensor {tensor!r} differs across replicas ({detail}); "
                f"rank {ref_rank} has {crc}. The replicas diverged: fix the training step "
                "before saving"
            )


def merge_nodes(
    nodes: Sequence[Node],
    *,
    world_size: int,
    crc_names: Mapping[str, Sequence[str]],
    sharded_docs: Mapping[str, dict[str, Any]],
) -> tuple[tuple[ComponentRecord, ...], dict[str, bytes], tuple[FileRecord, ...]]:
    """Rank 0's merge of node reports sorted by first rank: the manifest's components, the
    small files (sharded documents) and every file record; raises on disagreement."""
    first = nodes[0]
    want = [(p["key"], p["pattern"]) for p in first["parts"]]
    for nd in nodes[1:]:
        got = [(p["key"], p["pattern"]) for p in nd["parts"]]
        if got != want or nd.get("step") != first.get("step") or nd["path"] != first["path"]:
            _disagree(
                nd["ranks"][0], got, nd.get("step"), nd["path"], first["ranks"][0], want, first
            )
    owner: dict[str, int] = {}
    files: list[FileRecord] = []
    for nd in nodes:
        for path, nbytes, crc, rank in nd["files"]:
            if path in owner:
                _twice(path, owner[path], rank)
            owner[path] = rank
            files.append(FileRecord(str(path), int(nbytes), str(crc)))
    records = []
    small: dict[str, bytes] = {}
    for i, head in enumerate(first["parts"]):
        key, pattern = head["key"], head["pattern"]
        parts = [nd["parts"][i] for nd in nodes]
        if pattern == "replicated" and key not in sharded_docs:
            _check_replicas(key, parts, crc_names.get(key, ()))
        instances: dict[str, dict[str, Any]] = {}
        for np in parts:
            for name, inst in np["instances"].items():
                have = instances.get(name)
                if have is None:
                    instances[name] = {
                        "doc": inst["doc"],
                        "ranks": list(inst["ranks"]),
                        "files": list(inst["files"]),
                    }
                    continue
                have["ranks"].extend(inst["ranks"])
                have["files"].extend(inst["files"])
                if inst["doc"]:
                    have["doc"] = inst["doc"]
        if key in sharded_docs:
            _check_replicas(key, parts)
            doc = sharded_docs[key]
            for np in parts:
                for fqn, pieces in (np.get("sharded") or {}).items():
                    doc["tensors"][fqn]["pieces"].extend(pieces)
            name = doc_name(key, "")
            small[name] = json.dumps(doc, ensure_ascii=True, allow_nan=False).encode("ascii")
            inst = instances.setdefault("", {"doc": None, "ranks": [], "files": []})
            inst["doc"] = name
        writers = sorted({rank for inst in instances.values() for rank in inst["ranks"]})
        for inst in instances.values():
            inst["files"] = sorted(set(inst["files"]) | ({inst["doc"]} if inst["doc"] else set()))
        nbytes = sum(int(np["nbytes"]) for np in parts) + sum(
            len(small[inst["doc"]]) for inst in instances.values() if inst["doc"] in small
        )
        records.append(
            ComponentRecord(
                key=key,
                sharing_pattern=pattern,
                ranks=tuple(writers or [0]),
                replicated_across=_replicas(head.get("replicas"))
                if pattern == "replicated"
                else None,
                group_name=head.get("group_name"),
                size_bytes=nbytes,
                metadata={
                    **head["metadata"],
                    "ckptsvc": {
                        "world_size": world_size,
                        "sharded": key in sharded_docs,
                        "instances": dict(sorted(instances.items())),
                    },
                },
            )
        )
    return tuple(records), small, tuple(files)
