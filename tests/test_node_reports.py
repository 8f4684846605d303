"""Node reports: a leader's pre-merge of its node's reports, and rank 0's merge of them,
against the merge of every rank report (the same manifest components, the same errors)."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import pytest
import torch

from ckptsvc.commit.node_reports import NODE_PREFIX, decode_batches, premerge_batch
from ckptsvc.commit.reports import Merged, RankReport, merge_node_reports, merge_reports
from ckptsvc.errors import (
    CoordinationError,
    CorruptCheckpointError,
    ReplicationMismatchError,
    SaveFailedError,
)
from ckptsvc.format.checksum import crc32c_hex
from ckptsvc.format.manifest import FileRecord
from ckptsvc.ranks import RankInfo
from ckptsvc.stage.component_plan import plan_components
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.parts import ComponentPlan
from ckptsvc.stage.state_components import HeldState

WORLD, PER_NODE = 12, 4


def _components(rank: int, *, validate: bool) -> list[StateComponent]:
    gen = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(16, generator=gen) for i in range(3)}
    return [
        StateComponent(
            "model", HeldState(model), SharingPattern.REPLICATED, validate_replication=validate
        ),
        StateComponent(
            "optimizer",
            HeldState({"exp_avg": torch.full((4 + rank % 3,), float(rank))}),
            SharingPattern.PER_RANK,
        ),
    ]


def _plans(rank: int, *, validate: bool = False) -> list[ComponentPlan]:
    info = RankInfo(rank, WORLD, rank % PER_NODE, PER_NODE, rank // PER_NODE, f"n{rank}")
    return plan_components(
        _components(rank, validate=validate),
        info=info,
        process_groups=None,
        max_shard_size=1 << 30,
        user_metadata={},
        incremental=False,
    )


def _report(rank: int, plans: list[ComponentPlan]) -> RankReport:
    files = tuple(
        FileRecord(f.plan.file_name, 100 + rank, crc32c_hex(f.plan.file_name.encode()))
        for p in plans
        for f in p.files
        if f.write
    )
    return RankReport(rank, 7, "/ckpt/checkpoint-7", tuple(p.part for p in plans), files)


def _with_crcs(report: RankReport, crcs: tuple[str, ...]) -> RankReport:
    """The replicated part's per-tensor checksums (filled in after the snapshot)."""
    return replace(report, parts=(replace(report.parts[0], crcs=crcs), *report.parts[1:]))


def _reports(*, validate: bool = False) -> tuple[list[RankReport], dict[str, Any]]:
    plans = {r: _plans(r, validate=validate) for r in range(WORLD)}
    crc_names = {p.component.key: p.crc_names for p in plans[0] if p.crc_names}
    reports = [_report(r, plans[r]) for r in range(WORLD)]
    if validate:
        reports = [_with_crcs(r, ("0a", "0b", "0c")) for r in reports]
    return reports, crc_names


def _by_nodes(reports: list[RankReport], crc_names: dict[str, Any]) -> Merged:
    """What a distributed commit does: each node's leader pre-merges, rank 0 merges (the
    batches arrive in any order)."""
    batches = [
        premerge_batch([r.to_json() for r in reports[i : i + PER_NODE]])
        for i in range(0, len(reports), PER_NODE)
    ]
    nodes = decode_batches(reversed(batches))
    return merge_node_reports(nodes, world_size=WORLD, crc_names=crc_names, sharded_docs={})


def _all(reports: list[RankReport], crc_names: dict[str, Any]) -> Merged:
    return merge_reports(reports, world_size=WORLD, crc_names=crc_names, sharded_docs={})


@pytest.mark.parametrize("validate", [False, True])
def test_node_reports_merge_to_what_all_rank_reports_merge_to(validate: bool) -> None:
    reports, crc_names = _reports(validate=validate)
    batch = premerge_batch([r.to_json() for r in reports[:PER_NODE]])
    assert batch.startswith(NODE_PREFIX)
    merged = _by_nodes(reports, crc_names)
    assert merged == _all(reports, crc_names)
    opt = next(c for c in merged.components if c.key == "optimizer")
    instances = opt.metadata["ckptsvc"]["instances"]
    assert len(instances) == WORLD and opt.ranks == tuple(range(WORLD))
    assert [f.path for f in merged.files] == [f.path for r in reports for f in r.files]
    model = next(c for c in merged.components if c.key == "model")
    assert model.replicated_across == tuple(range(WORLD))


def _errors(reports: list[RankReport], crc_names: dict[str, Any]) -> tuple[str, str]:
    messages = []
    for merge in (_all, _by_nodes):
        with pytest.raises((ReplicationMismatchError, CoordinationError, SaveFailedError)) as e:
            merge(reports, crc_names)
        messages.append(f"{type(e.value).__name__}: {e.value}")
    return messages[0], messages[1]


def test_a_diverged_replica_is_named_alike_either_way() -> None:
    reports, crc_names = _reports(validate=True)
    assert crc_names == {"model": ("layer0.weight", "layer1.weight", "layer2.weight")}
    reports[9] = _with_crcs(reports[9], ("0a", "99", "0c"))  # same structure, other values
    reports[10] = _with_crcs(reports[10], ("0a", "99", "0c"))
    whole, by_nodes = _errors(reports, crc_names)
    assert whole == by_nodes
    assert "'layer1.weight' differs across replicas" in whole and "ranks [9, 10] crc32c 99" in whole


def test_a_different_structure_is_named_alike_either_way() -> None:
    reports, crc_names = _reports()
    part = reports[6].parts[0]
    reports[6] = replace(
        reports[6], parts=(replace(part, signature="other"), *reports[6].parts[1:])
    )
    whole, by_nodes = _errors(reports, crc_names)
    assert whole == by_nodes and "rank 6 holds a different structure" in whole


def test_a_file_written_by_two_ranks_across_nodes_is_refused_alike() -> None:
    reports, crc_names = _reports()
    reports[10] = replace(reports[10], files=(*reports[10].files, reports[1].files[0]))
    whole, by_nodes = _errors(reports, crc_names)
    assert whole == by_nodes and "rank 1 and rank 10" in whole


def test_a_failed_rank_makes_its_leader_forward_the_raw_batch() -> None:
    reports, crc_names = _reports()
    reports[5] = replace(reports[5], error="disk full", error_type="OSError")
    reports[11] = replace(reports[11], error="disk full", error_type="OSError")
    batch = premerge_batch([r.to_json() for r in reports[4:8]])
    assert batch == b"\n".join(r.to_json() for r in reports[4:8])
    whole, by_nodes = _errors(reports, crc_names)
    assert whole == by_nodes and "rank 5 failed" in whole and "[5, 11]" in whole


def test_disagreeing_components_within_a_node_are_named_by_rank_0() -> None:
    reports, crc_names = _reports()
    reports[2] = replace(reports[2], parts=reports[2].parts[:1])
    batch = premerge_batch([r.to_json() for r in reports[:PER_NODE]])
    assert not batch.startswith(NODE_PREFIX)  # the leader forwards them as they are
    whole, by_nodes = _errors(reports, crc_names)
    assert whole == by_nodes and "rank 2 saved components" in whole


def test_sharded_pieces_arrive_in_rank_order() -> None:
    reports, _ = _reports()
    doc: dict[str, Any] = {"tensors": {"w": {"pieces": []}}}
    for r in range(WORLD):
        part = reports[r].parts[1]
        sharded = {"w": [{"rank": r, "offsets": [r * 2]}]}
        shard = replace(part, sharded=sharded, signature="same")
        reports[r] = replace(reports[r], parts=(reports[r].parts[0], shard))
    docs_a, docs_b = {"optimizer": copy.deepcopy(doc)}, {"optimizer": copy.deepcopy(doc)}
    a = merge_reports(reports, world_size=WORLD, crc_names={}, sharded_docs=docs_a)
    nodes = decode_batches(
        premerge_batch([r.to_json() for r in reports[i : i + PER_NODE]])
        for i in range(0, WORLD, PER_NODE)
    )
    b = merge_node_reports(nodes, world_size=WORLD, crc_names={}, sharded_docs=docs_b)
    assert a == b
    assert [p["rank"] for p in docs_b["optimizer"]["tensors"]["w"]["pieces"]] == list(range(WORLD))


def test_a_malformed_batch_is_named() -> None:
    with pytest.raises(CorruptCheckpointError, match="node batch 2"):
        decode_batches([premerge_batch([_reports()[0][0].to_json()]), NODE_PREFIX + b"{oops"])


def test_gc_held_nests_and_restores_the_collector() -> None:
    """Rank 0's decode + merge runs with automatic collection off (``gc_held``); holds of
    two saves in flight share one, and a collector the application disabled stays off."""
    import gc
    import threading

    from ckptsvc.commit.gc_hold import gc_held

    assert gc.isenabled()
    inside = threading.Event()
    release = threading.Event()

    def other_save() -> None:
        with gc_held():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other_save)
    t.start()
    try:
        assert inside.wait(10)
        with gc_held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other save still holds it
    finally:
        release.set()
        t.join()
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_held():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the application's choice stands
    finally:
        gc.enable()
