"""The hierarchical commit (``ckptsvc.commit.coordinator``) with many ranks as threads of
this process: real Coordinators, a real TCPStore, real files (``SimulatedJob`` of
``ckptsvc simulate``). Store operations are counted by a wrapping Store, not timed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import StorageRoot

from ckptsvc.commit.resume import resolve_latest
from ckptsvc.errors import CoordinationError, SaveFailedError
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.read.component_load import load_state
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.tools.simulate import SimulatedJob
from ckptsvc.tools.simulate_probes import RequestLog


def _rank0_ops(job: SimulatedJob) -> int:
    return sum(job.ranks[0].store.ops.values())


@pytest.mark.parametrize("ranks_per_node", [4, 8])
def test_rank0_store_operations_grow_with_nodes_not_ranks(
    ranks_per_node: int, tmp_path: Path
) -> None:
    counts = {}
    with ThreadPoolExecutor(16) as pool:
        for ranks in (8, 64):
            job = SimulatedJob(
                ranks=ranks, ranks_per_node=ranks_per_node, root=f"{tmp_path}/r{ranks}", opts={}
            )
            assert all(e is None for e in job.save(0, pool).values())
            for r in job.ranks:
                r.store.ops.clear()
            assert all(e is None for e in job.save(1, pool).values())
            counts[ranks] = _rank0_ops(job)
            job.close()
            assert (tmp_path / f"r{ranks}" / "checkpoint-1" / MANIFEST_NAME).exists()
    # 8x the ranks, 8x the nodes: rank 0 never polls key by key and fetches node batches in
    # multi_gets of 256, so its count stays the same. Rank 0 gathers its own node's
    # reports (5 operations more, measured at 8 ranks: 2 add, 2 set, 1 multi_get) only
    # when it is its node's last rank to report, which the threads' order decides, not N
    # (rank 0 no longer writes the model's index and document, so it is not always last)
    node_gather = 5
    assert counts[64] <= counts[8] + 2 + node_gather, counts
    assert counts[8] <= 20 + ranks_per_node, counts


def test_every_rank_loads_its_own_state_after_the_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with ThreadPoolExecutor(8) as pool:
        job = SimulatedJob(ranks=16, ranks_per_node=4, root=str(tmp_path), opts={})
        assert all(e is None for e in job.save(3, pool).values())
        job.close()
    path = find_latest_checkpoint(str(tmp_path))
    assert path is not None and path.endswith("checkpoint-3")
    for rank in (0, 5, 15):
        state = load_state(path, rank=rank)
        assert set(state) == {"model", "optimizer"}
        assert state["optimizer"]["exp_avg"].eq(rank).all()


def test_a_failing_rank_fails_the_save_everywhere(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        job = SimulatedJob(ranks=12, ranks_per_node=4, root=str(tmp_path), opts={})
        outcomes = job.save(0, pool, failing=frozenset({6}))
        job.close()
    assert isinstance(outcomes.pop(6), OSError)  # the failing rank keeps its own error
    assert all(isinstance(e, SaveFailedError) for e in outcomes.values()), outcomes
    assert all("rank 6" in str(e) and "disk full" in str(e) for e in outcomes.values())
    assert not (tmp_path / "checkpoint-0" / MANIFEST_NAME).exists()


def test_a_rank_that_never_reports_is_named_within_the_timeout(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        job = SimulatedJob(ranks=8, ranks_per_node=4, root=str(tmp_path), opts={}, timeout_s=1.0)
        outcomes = job.save(0, pool, silent=frozenset({5}))
        job.close(timeout_s=1.0)
    assert set(outcomes) == {0, 1, 2, 3, 4, 6, 7}
    assert isinstance(outcomes[0], CoordinationError)
    assert all("ranks [5] did not report" in str(e) for e in outcomes.values()), outcomes
    assert not (tmp_path / "checkpoint-0" / MANIFEST_NAME).exists()


@pytest.mark.cloud
def test_one_discovery_per_job_on_s3(s3_root: StorageRoot) -> None:
    """16 ranks resume: rank 0 lists the run, the others learn the answer through the
    store; the S3 client sees exactly the requests of one ``find_latest_checkpoint``."""
    opts = s3_root.storage_options
    with ThreadPoolExecutor(16) as pool:
        job = SimulatedJob(ranks=16, ranks_per_node=4, root=s3_root.url, opts=opts)
        for step in (1, 2):
            assert all(e is None for e in job.save(step, pool).values())
        job.close()
        log = RequestLog(s3_root.url, opts)
        assert find_latest_checkpoint(s3_root.url, storage_options=opts) is not None
        one_chain = len(log.records())
        log.reset_records()
        paths = list(
            pool.map(
                lambda r: resolve_latest(
                    s3_root.url,
                    storage_options=opts,
                    store=r.store,
                    rank=r.info.rank,
                    world_size=16,
                ),
                job.ranks,
            )
        )
    assert set(paths) == {f"{s3_root.url}/checkpoint-2"}
    assert len(log.records()) == one_chain > 0


def test_rank_0s_failure_to_resolve_reaches_every_rank(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    with ThreadPoolExecutor(4) as pool:
        job = SimulatedJob(ranks=4, ranks_per_node=2, root=str(tmp_path / "run"), opts={})

        def resolve(rank: int) -> BaseException | None:
            try:
                resolve_latest(
                    f"nosuch://{afile}", store=job.ranks[rank].store, rank=rank, world_size=4
                )
            except Exception as e:
                return e
            return None

        errors = list(pool.map(resolve, range(4)))
    assert all(e is not None for e in errors), errors
    assert all("rank 0 could not resolve" in str(e) for e in errors[1:]), errors


def test_a_save_waiting_on_the_store_does_not_block_another_saves_keys() -> None:
    """Two saves in flight share the job's store: save A's blocking wait (rank 0 waiting for
    reports, another rank for its outcome) must not hold up save B's writes. On one shared
    client it did, and two ranks deadlocked (Accelerate's 2-process test hung)."""
    import threading
    import time
    from datetime import timedelta

    from torch.distributed import TCPStore

    from ckptsvc.commit.channels import StoreChannel

    store = TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=60))
    waiting_a, other_b = StoreChannel(store, "job/1/"), StoreChannel(store, "job/2/")
    got: list[bool] = []
    waiter = threading.Thread(target=lambda: got.append(waiting_a.wait(["outcome"], 30.0)))
    waiter.start()
    time.sleep(0.3)  # let the waiter block first (if it has not, the test proves less)
    other_b.put("report", b"r")  # behind A's wait on a shared client: stuck until it times out
    StoreChannel(store, "job/1/").put("outcome", b"ok")
    waiter.join(60)
    assert got == [True]  # A saw its outcome: B's put did not wait for A's wait to time out


def test_store_connections_are_reused_across_saves_not_opened_per_save() -> None:
    """A checkpointer's saves take their store connection from a pool: two saves in flight
    hold two (save A's blocking wait does not hold up save B), and later saves reuse them."""
    import threading
    from datetime import timedelta

    from torch.distributed import TCPStore

    from ckptsvc.commit.channels import StoreChannel, StorePool
    from ckptsvc.tools.simulate_probes import CountingStore

    master = TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=60))
    store = CountingStore(TCPStore("127.0.0.1", master.port, 1, False))
    pool = StorePool(store)
    a, b = StoreChannel(store, "job/1/", pool=pool), StoreChannel(store, "job/2/", pool=pool)
    got: list[bool] = []
    entered = threading.Event()

    def wait_a() -> None:
        a.add("entered", 1)  # a holds its connection from here on
        entered.set()
        got.append(a.wait(["outcome"], 30.0))

    waiter = threading.Thread(target=wait_a)
    waiter.start()
    assert entered.wait(30)
    b.put("report", b"r")  # its own connection: not behind a's wait
    outcome = StoreChannel(store, "job/1/", pool=pool)  # a third holder: a third connection
    outcome.put("outcome", b"ok")
    outcome.release()
    waiter.join(60)
    assert got == [True]
    assert pool.opened == 3
    a.release()
    b.release()
    for seq in range(3, 10):  # later saves, one at a time: no new connection
        c = StoreChannel(store, f"job/{seq}/", pool=pool)
        c.put("report", b"r")
        c.release()
    assert pool.opened == 3 and store.ops["connect"] == 3


def test_a_simulated_job_opens_its_connections_on_the_first_save_only(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        job = SimulatedJob(ranks=8, ranks_per_node=4, root=str(tmp_path), opts={})
        first = []
        for step in range(3):
            assert all(e is None for e in job.save(step, pool).values())
            first.append(sum(r.store.ops["connect"] for r in job.ranks))
        job.close()
    # save 0: one per rank; save 1: rank 0 one more (its sweep of save 0's acknowledged
    # outcome runs while save 1 holds the first); then none
    assert first == [8, 9, 9], first


@pytest.mark.cloud
def test_object_store_writes_per_save_are_one_per_rank_and_a_constant(
    s3_root: StorageRoot,
) -> None:
    """16 ranks save ``simulate``'s state (a small REPLICATED model, a PER_RANK optimizer)
    on S3: one object per rank (its shard, its document inside), one object for the model
    (too small to split over writers: ``model.safetensors``, its document inside, no HF
    index), and the constant: the manifest, the in-progress marker's PUT and DELETE, the
    ``latest`` pointer. N + 5 in all."""
    opts = s3_root.storage_options
    with ThreadPoolExecutor(16) as pool:
        job = SimulatedJob(ranks=16, ranks_per_node=4, root=s3_root.url, opts=opts)
        assert all(e is None for e in job.save(1, pool).values())
        log = RequestLog(s3_root.url, opts)
        assert all(e is None for e in job.save(2, pool).values())
        job.close()
    writes = sorted(
        ("POST", "?delete") if r.query == "delete" else (r.method, r.path.rsplit("/", 1)[1])
        for r in log.records()
        if r.method in ("PUT", "POST", "DELETE")
    )
    per_rank = [("PUT", f"optimizer_state_rank_{r}.safetensors") for r in range(16)]
    constant = [
        ("POST", "?delete"),  # the marker's removal (DeleteObjects)
        ("PUT", ".ckptsvc-in-progress"),
        ("PUT", "checkpoint_manifest.json"),
        ("PUT", "model.safetensors"),
        ("PUT", "ckptsvc-latest.json"),  # the latest pointer, beside the checkpoints
    ]
    assert writes == sorted(per_rank + constant)
    assert len(writes) == 16 + 5


def test_a_replicated_component_is_written_by_one_rank_per_64_mib() -> None:
    """Writers of a REPLICATED component: ceil(bytes / 64 MiB), spread over the ranks;
    every rank when the replicas' bytes are compared; a reused plan keeps them."""
    import torch

    from ckptsvc import hooks
    from ckptsvc.ranks import RankInfo
    from ckptsvc.stage.component_plan import plan_components, replicated_writers
    from ckptsvc.stage.components import SharingPattern, StateComponent
    from ckptsvc.stage.plan_reuse import PlanReuse
    from ckptsvc.stage.state_components import HeldState

    model = {f"w{i}": torch.ones(16) for i in range(4)}
    small = StateComponent("model", HeldState(model), SharingPattern.REPLICATED)
    checked = StateComponent(
        "model", HeldState(model), SharingPattern.REPLICATED, validate_replication=True
    )
    mib = 2**20
    assert replicated_writers(small, 1024, 256) == (0,)
    assert replicated_writers(small, 16, 200 * mib) == (0, 4, 8, 12)
    assert replicated_writers(small, 3, 10_000 * mib) == (0, 1, 2)
    assert replicated_writers(checked, 8, 256) == tuple(range(8))

    def parts(rank: int, reuse: PlanReuse) -> list[str | None]:
        info = RankInfo(rank, 16, rank % 4, 4, rank // 4, f"n{rank // 4}")
        plans = plan_components(
            [small], info=info, process_groups=None, max_shard_size=1 << 30,
            user_metadata={}, reuse=reuse,
        )  # fmt: skip
        return [p.part.instance for p in plans]

    seen: list[bool] = []
    remove = hooks.install("plan.component", lambda *, key, reused: seen.append(reused))
    try:
        for rank in (0, 5):
            reuse = PlanReuse()
            first, second = parts(rank, reuse), parts(rank, reuse)
            assert first == second == ([""] if rank == 0 else [None])  # rank 0 alone writes
    finally:
        remove()
    assert seen == [False, True, False, True]
