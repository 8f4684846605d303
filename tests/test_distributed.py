"""State components and distributed saves: sharing patterns, commit across ranks, failures.

The first half runs in this process (component files, manifest records, load errors);
the second half starts real ranks with ``torch.multiprocessing`` on gloo (see
``tests/dist_workers/``), each with its own node writer per simulated node.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SHM, StorageRoot
from dist_workers.launch import RankRun, describe, launch
from helpers_models import assert_bitwise_equal
from safetensors.torch import load_file
from test_async_checkpointer import wait_until

from ckptsvc.commit.coordinator import COORD_DIR
from ckptsvc.commit.reports import RankReport, ReplicationMismatchError, merge_reports
from ckptsvc.engine.async_checkpointer import AsyncCheckpointer, load_components
from ckptsvc.errors import CheckpointError, SaveFailedError, StateMismatchError
from ckptsvc.format.manifest import MANIFEST_NAME, FileRecord, Manifest
from ckptsvc.read.discovery import checkpoint_info, next_checkpoint_path
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import load_checkpoint
from ckptsvc.stage.components import RNGState, SharingPattern, StateComponent
from ckptsvc.stage.parts import PartReport

SP = SharingPattern


class Progress:
    """A stateful with tensors and plain values."""

    def __init__(self, step: int = 0) -> None:
        self.step = step
        self.losses = torch.arange(4, dtype=torch.float32) * step

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": self.losses, "name": "run", "nan": float("nan")}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.step, self.losses = sd["step"], sd["losses"]


class Broken(Progress):
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        raise KeyError("no such field")


def trained(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(2):
        model(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
    return model, opt


def components(model: Any, opt: Any, progress: Any, **extra: Any) -> list[StateComponent]:
    return [
        StateComponent("model", model, SP.GLOBAL),
        StateComponent("optimizer", opt, SP.PER_RANK),
        StateComponent("rng", RNGState(), SP.PER_RANK),
        StateComponent("trainer", progress, SP.GLOBAL, metadata={"note": "x"}),
        *extra.get("more", []),
    ]


@pytest.fixture
def saved(node: str, tmp_path: Path) -> Iterator[tuple[str, Any, Any, Progress]]:
    model, opt = trained()
    progress = Progress(7)
    with AsyncCheckpointer(tmp_path, max_shard_size=512) as ckpt:
        handle = ckpt.save_components(7, components(model, opt, progress))
        handle.wait(60)
    yield handle.path, model, opt, progress


def test_components_roundtrip_bitwise(saved: tuple[str, Any, Any, Progress]) -> None:
    path, model, opt, progress = saved
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    model2, opt2 = trained(seed=5)
    progress2 = Progress(0)
    load_components(path, components(model2, opt2, progress2))
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert_bitwise_equal(a, b, name=k)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert_bitwise_equal(s1["state"][i][k], s2["state"][i][k], name=f"{i}.{k}")
    assert progress2.step == 7 and torch.equal(progress2.losses, progress.losses)
    assert not torch.equal(torch.get_rng_state(), rng_before)  # the RNG state was restored


def test_manifest_lists_every_component_with_its_files(saved: tuple[str, Any, Any, Any]) -> None:
    path = Path(saved[0])
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    comps = manifest["components"]
    assert sorted(comps) == ["model", "optimizer", "rng", "trainer"]
    assert comps["optimizer"]["sharing_pattern"] == "per_rank"
    assert comps["trainer"]["metadata"]["note"] == "x"
    files = set(manifest["metadata"]["ckptsvc"]["files"])
    for rec in comps.values():
        assert rec["ranks"] == [0]
        for inst in rec["metadata"]["ckptsvc"]["instances"].values():
            assert set(inst["files"]) <= files and inst["doc"] in inst["files"]
    # a per-rank instance with tensors: its document is in its first shard's header
    opt = comps["optimizer"]["metadata"]["ckptsvc"]["instances"]["_rank_0"]
    assert opt["doc"] == opt["files"][0] == "optimizer_state_rank_0-00001-of-00005.safetensors"
    assert all(f.endswith(".safetensors") for f in opt["files"])
    assert "optimizer_state_rank_0.json" not in files
    # so is a GLOBAL one (the trainer holds a tensor; the model's is in its first shard)
    trainer = comps["trainer"]["metadata"]["ckptsvc"]["instances"][""]
    assert trainer["doc"] == "trainer_state.safetensors" and "trainer_state.json" not in files
    model = comps["model"]["metadata"]["ckptsvc"]["instances"][""]
    assert model["doc"] == "model-00001-of-00002.safetensors" and "model_state.json" not in files
    assert files == {p.name for p in path.iterdir() if p.name != MANIFEST_NAME}
    for name in files:  # every tensor file loads with the reference reader
        if name.endswith(".safetensors"):
            load_file(str(path / name))
    weights = load_checkpoint(str(path))  # the model is a plain HF checkpoint
    assert weights is not None and sorted(weights) == sorted(saved[1].state_dict())


def test_missing_required_component_is_an_error(
    saved: tuple[str, Any, Any, Any], caplog: pytest.LogCaptureFixture
) -> None:
    path = saved[0]
    with pytest.raises(StateMismatchError, match="'extra'"):
        load_components(path, [StateComponent("extra", Progress(), SP.GLOBAL)])
    with caplog.at_level(logging.WARNING):
        load_components(path, [StateComponent("extra", Progress(), SP.GLOBAL, required=False)])
    assert "'extra'" in caplog.text


def test_load_failure_is_an_error(saved: tuple[str, Any, Any, Any]) -> None:
    with pytest.raises(StateMismatchError, match=r"'trainer'.*no such field"):
        load_components(saved[0], [StateComponent("trainer", Broken(), SP.GLOBAL)])
    wrong = torch.nn.Linear(3, 3)
    with pytest.raises(StateMismatchError, match="'model'"):
        load_components(saved[0], [StateComponent("model", wrong, SP.GLOBAL)])


def test_per_rank_state_at_another_world_size(
    saved: tuple[str, Any, Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _, opt, _ = saved
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    model2, opt2 = trained(seed=3)
    with pytest.raises(StateMismatchError, match=r"'optimizer'.*saved by 1 ranks, loading at 2"):
        load_components(path, [StateComponent("optimizer", opt2, SP.PER_RANK)])
    load_components(path, [StateComponent("model", model2, SP.GLOBAL)])  # GLOBAL: fine
    load_components(
        path, [StateComponent("optimizer", opt2, SP.PER_RANK)], world_size_policy="skip"
    )
    assert not torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )
    load_components(
        path, [StateComponent("optimizer", opt2, SP.PER_RANK)], world_size_policy="wrap"
    )
    assert torch.equal(
        opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_checkpoint_path_override(node: str, tmp_path: Path) -> None:
    target = str(tmp_path / "elsewhere" / "ckpt")
    with AsyncCheckpointer(tmp_path / "root") as ckpt:
        handle = ckpt.save_components(
            1, [StateComponent("trainer", Progress(3), SP.GLOBAL)], checkpoint_path=target
        )
        assert handle.path == target
        handle.wait(60)
    got = Progress()
    load_components(target, [StateComponent("trainer", got, SP.GLOBAL)])
    assert got.step == 3


def test_save_refused_in_a_multi_rank_world(
    node: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with AsyncCheckpointer(tmp_path) as ckpt, pytest.raises(Exception, match="save_components"):
        ckpt.save(1, {"w": torch.ones(2)})


# ---- rank 0's merge of the reports ----------------------------------------------------------


def _part(key: str, pattern: str = "replicated", **kw: Any) -> PartReport:
    fields: dict[str, Any] = dict(
        key=key, pattern=pattern, group_name=None, instance="", doc=None, files=(), nbytes=0,
        signature="s1", replicas=(0, 1),
    )  # fmt: skip
    fields.update(kw)
    return PartReport(**fields)


def _report(rank: int, *parts: PartReport, files: tuple[str, ...] = (), **kw: Any) -> RankReport:
    records = tuple(FileRecord(f, 1, "00000000") for f in files)
    return RankReport(rank, 1, "/ckpt", parts, files=records, **kw)


def _merge(*reports: RankReport) -> Any:
    return merge_reports(list(reports), world_size=len(reports), crc_names={}, sharded_docs={})


def test_merge_names_a_failed_rank() -> None:
    with pytest.raises(SaveFailedError, match=r"rank 1 failed.*disk full"):
        _merge(_report(0, _part("m")), _report(1, _part("m"), error="disk full", error_type="X"))


def test_merge_refuses_ranks_that_disagree() -> None:
    with pytest.raises(ReplicationMismatchError, match="rank 1 saved components"):
        _merge(_report(0, _part("m")), _report(1, _part("other")))
    with pytest.raises(ReplicationMismatchError, match=r"'m': rank 1 holds a different structure"):
        _merge(_report(0, _part("m")), _report(1, _part("m", signature="s2")))
    reports = [
        _report(0, _part("m", crcs=("1", "2"))),
        _report(1, _part("m", crcs=("1", "3"))),
    ]
    with pytest.raises(ReplicationMismatchError, match=r"'b.w' differs.*ranks \[1\] crc32c 3"):
        merge_reports(reports, world_size=2, crc_names={"m": ("a.w", "b.w")}, sharded_docs={})


def test_merge_refuses_a_file_written_twice() -> None:
    with pytest.raises(CheckpointError, match=r"x\.json was written by rank 0 and rank 1"):
        _merge(_report(0, _part("m"), files=("x.json",)), _report(1, _part("m"), files=("x.json",)))


# ---- real ranks -----------------------------------------------------------------------------


@pytest.fixture
def nodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A node-id prefix for the simulated nodes of one test; checks no arena leaks."""
    prefix = f"d{uuid.uuid4().hex[:8]}"
    yield prefix
    wait_until(lambda: not _node_segments(prefix), "the ranks' arenas to be unlinked", 20)


def _node_segments(prefix: str) -> list[str]:
    return [n for n in os.listdir(SHM) if n.startswith(f"ckptsvc-{prefix}")]


def _ok(runs: list[RankRun]) -> list[dict[str, Any]]:
    assert all(r.returncode == 0 and r.result is not None for r in runs), describe(runs)
    return [r.result for r in runs if r.result is not None]


def _manifest(path: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    info = checkpoint_info(path, storage_options=storage_options)
    assert info.manifest is not None, f"{path} has no manifest ({info.status})"
    return info.manifest


@pytest.mark.multiproc
@pytest.mark.slow
def test_four_ranks_two_nodes_every_pattern(nodes: str, tmp_path: Path) -> None:
    """4 ranks on 2 simulated nodes: DDP model REPLICATED (validated, split over 4 ranks),
    PER_RANK, PER_NODE, PER_GROUP (two dp groups), GLOBAL; each rank gets back bitwise
    exactly its own state, and a barrier after load shows nobody is stuck in a collective."""
    root = str(tmp_path / "run")
    results = _ok(launch("replicated_job", {"root": root}, world=4, nodes=2, node_prefix=nodes))
    for r in results:
        assert r["error"] is None
        assert not any(r["mismatch"].values()), r["mismatch"]
        assert r["rng_ok"]
    writers = [r["writer"] for r in results]
    assert writers[0] == writers[1] != writers[2] == writers[3]  # one node writer per node
    manifest = _manifest(results[0]["path"])
    assert manifest.world_size == 4
    comps = {c.key: c for c in manifest.components}
    assert comps["model"].ranks == (0, 1, 2, 3)  # the replicated write was split
    assert comps["model"].replicated_across == (0, 1, 2, 3)
    assert comps["trainer"].ranks == (0,)
    assert comps["data"].ranks == (0, 1, 2, 3)

    def instances(key: str) -> dict[str, Any]:
        return dict(comps[key].metadata["ckptsvc"]["instances"])

    assert {k: v["ranks"] for k, v in instances("node").items()} == {"_node_0": [0], "_node_1": [2]}
    assert {k: v["ranks"] for k, v in instances("group").items()} == {
        "_group_dp_0": [0],
        "_group_dp_2": [2],
    }
    assert comps["group"].group_name == "dp"
    assert verify_checkpoint(results[0]["path"], deep=True).ok
    weights = load_checkpoint(results[0]["path"])  # the split model is a plain HF checkpoint
    assert weights is not None and len(weights) == 6


@pytest.mark.multiproc
@pytest.mark.slow
def test_sixteen_ranks_two_nodes_save_commit_and_load_bitwise(nodes: str, tmp_path: Path) -> None:
    """The largest real job here (issue 16): 16 ranks on 2 simulated nodes of 8, every
    sharing pattern; the commit goes through the node leaders' merged reports, the manifest
    is format 3 (per-rank regions) and every rank loads its own view of it, bitwise."""
    root = str(tmp_path / "run")
    results = _ok(
        launch(
            "replicated_job", {"root": root}, world=16, nodes=2, node_prefix=nodes, timeout_s=400
        )
    )
    for r in results:
        assert r["error"] is None
        assert not any(r["mismatch"].values()), r["mismatch"]
        assert r["rng_ok"]
    assert len({r["writer"] for r in results}) == 2  # one node writer per node
    raw = Path(results[0]["path"], MANIFEST_NAME).read_bytes()
    assert raw.startswith(b'{"ckptsvc_layout": "v3 ')
    manifest = _manifest(results[0]["path"])
    assert manifest.world_size == 16 and manifest.format_version == 3
    comps = {c.key: c for c in manifest.components}
    assert comps["data"].ranks == tuple(range(16))
    assert verify_checkpoint(results[0]["path"], deep=True).ok


@pytest.mark.multiproc
@pytest.mark.cloud
@pytest.mark.slow
def test_distributed_save_to_s3(nodes: str, s3_root: StorageRoot) -> None:
    args = {"root": s3_root.url, "storage_options": s3_root.storage_options}
    results = _ok(launch("replicated_job", args, world=4, nodes=2, node_prefix=nodes))
    for r in results:
        assert r["error"] is None and not any(r["mismatch"].values()) and r["rng_ok"]
    latest = find_latest_checkpoint(s3_root.url, storage_options=s3_root.storage_options)
    assert latest == results[0]["path"]
    assert verify_checkpoint(latest, deep=True, storage_options=s3_root.storage_options).ok


@pytest.mark.multiproc
@pytest.mark.slow
def test_diverged_replica_fails_the_save_everywhere(nodes: str, tmp_path: Path) -> None:
    root = str(tmp_path / "run")
    args = {"root": root, "diverge_rank": 3}
    results = _ok(launch("replicated_job", args, world=4, nodes=2, node_prefix=nodes))
    for r in results:
        assert r["error"] is not None
        assert "ReplicationMismatchError" in r["error"]
        assert "'model'" in r["error"] and "'2.weight'" in r["error"]
        assert "ranks [3]" in r["error"]
    assert not (Path(results[0]["path"]) / MANIFEST_NAME).exists()
    assert find_latest_checkpoint(root) is None


@pytest.mark.multiproc
@pytest.mark.slow
def test_killed_rank_fails_the_save_and_the_restarted_job_saves(nodes: str, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    gate.touch()
    root = f"faulty://{tmp_path}/run"
    opts = {"gate_path": str(gate), "match": "data_state_rank_2"}  # rank 2's write hangs
    try:
        runs = launch(
            "killed_rank",
            {"root": root, "kill_rank": 2, "storage_options": opts},
            world=4,
            nodes=2,
            node_prefix=nodes,
            env={"CKPTSVC_COMMIT_TIMEOUT_S": "4"},
        )
    finally:
        gate.unlink()
    assert runs[2].returncode == -signal.SIGKILL, describe(runs)
    for r in (runs[0], runs[1], runs[3]):
        assert r.returncode == 0 and r.result is not None, describe(runs)
        assert "ranks [2] did not report" in r.result["error"]
    ckpt1 = tmp_path / "run" / "checkpoints" / "checkpoint-1"
    assert ckpt1.is_dir() and not (ckpt1 / MANIFEST_NAME).exists()
    # the restarted job (new processes, new store) saves the next step normally
    results = _ok(
        launch("replicated_job", {"root": root, "step": 2}, world=4, nodes=2, node_prefix=nodes)
    )
    assert all(r["error"] is None and not any(r["mismatch"].values()) for r in results)
    assert find_latest_checkpoint(root) == next_checkpoint_path(root, 2)


@pytest.mark.multiproc
def test_ranks_without_a_process_group_coordinate_through_files(nodes: str, tmp_path: Path) -> None:
    args = {"root": str(tmp_path / "run"), "no_dist": True}
    results = _ok(launch("without_store", args, world=2, node_prefix=nodes))
    assert all(not any(r["mismatch"].values()) for r in results)
    path = Path(results[0]["path"])
    assert (path / MANIFEST_NAME).exists() and not (path / COORD_DIR).exists()
    assert _manifest(str(path)).world_size == 2
