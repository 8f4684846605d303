"""``ckptsvc simulate``: what one save and one resume cost as the job grows (a benchmark).

N simulated ranks run as threads of this process against a real ``TCPStore`` and a real
object store (``moto_server``, started here unless ``--endpoint`` names one), with a tiny
state per rank: a REPLICATED ``model`` (a few small tensors, identical everywhere) and a
PER_RANK ``optimizer``. Each rank runs the library's own code for its part of a save:

1. plan its components (``plan_components``) and, on rank 0, claim the checkpoint
   (``claim_target``);
2. its writer's job, done in-process (the node writer subprocess is left out: it adds no
   request): ``begin_checkpoint``, every shard it owns through ``write_shard``, its small
   files through ``publish_file``;
3. its report through the real :class:`~ckptsvc.commit.coordinator.Coordinator`, whose
   rank 0 commits through the writer's commit steps (``publish_file``,
   ``finish_checkpoint``).

Then every rank resumes: resolves the latest checkpoint
(:func:`~ckptsvc.commit.resume.resolve_latest`) and loads its state (``load_state``).

Counted, per save: the store operations of rank 0 and of all ranks (every rank's store is
wrapped in a counting ``Store``; its connections apart); the time from the last rank's
report to rank 0's wake, to its outcome published, and to its handle completed; the CPU
time of rank 0's commit thread from its wake to the outcome and its decode + merge (the
``commit.phase`` hook); object-store requests (counted in the S3 client, retries included: by method,
writes, and the most writes under one prefix); per resume: discovery requests, load
requests (in all and per rank), GETs of the replicated model's shard (each simulated
node of 8 ranks has a node cache directory of its own, ``read.node_cache``: one GET per
node), bytes of metadata read per rank (each GET by the bytes it returned: a ranged read
of a v3 manifest counts its range, not the object). Nothing here is timed against a target:
the table is for comparing runs and ranks counts within one run.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from ckptsvc.commit.coordinator import Coordinator, PendingCommit
from ckptsvc.commit.reports import Merged, RankReport
from ckptsvc.commit.resume import resolve_latest
from ckptsvc.commit.target import claim_target
from ckptsvc.engine.jobs import commit_info, pending_commit
from ckptsvc.ranks import RankInfo
from ckptsvc.read.component_load import load_state
from ckptsvc.read.node_cache import cache_dir_override
from ckptsvc.stage.component_plan import plan_components
from ckptsvc.stage.components import SharingPattern, StateComponent
from ckptsvc.stage.save_handle import SaveHandle, SaveTimings
from ckptsvc.stage.state_components import HeldState
from ckptsvc.stage.tensors import tensor_bytes
from ckptsvc.storage import Location
from ckptsvc.tools.simulate_probes import (
    BUCKET,
    CountingStore,
    PhaseLog,
    RequestLog,
    create_bucket,
    moto_server,
)
from ckptsvc.tools.simulate_report import format_table, metadata_bytes, object_sizes
from ckptsvc.workers.commit import begin_checkpoint, publish_file
from ckptsvc.workers.job_runner import finish_checkpoint
from ckptsvc.workers.shard_writer import write_shard

__all__ = ["CountingStore", "SimResult", "SimulatedJob", "add_parser", "run", "simulate"]

_WRITES = ("PUT", "POST", "DELETE")


@dataclass(frozen=True)
class SimResult:
    """One simulated job: per-save means and the resume's counts."""

    ranks: int
    nodes: int
    rank0_store_ops: float
    store_ops_per_rank: float
    store_connects_per_save: float
    first_save_store_connects: float
    commit_after_last_report_ms: float
    wake_after_last_report_ms: float
    outcome_after_last_report_ms: float
    rank0_commit_cpu_ms: float
    decode_merge_ms: float
    commit_storage_ms: float
    requests_per_save: float
    writes_per_save: float
    max_writes_one_prefix: float
    discovery_requests: int
    load_requests: int
    load_requests_per_rank: float
    replicated_shard_gets: int  # GETs of the REPLICATED model's shard(s) at load (per job)
    metadata_bytes_per_rank: float
    json_bytes_per_rank: float  # the JSON objects alone (what this column counted before)
    checkpoints_at_resume: int


@dataclass
class SimRank:
    info: RankInfo
    store: CountingStore
    coordinator: Coordinator
    done: threading.Event
    error: BaseException | None = None
    reported_at: float = 0.0
    outcome_at: float = 0.0


def _state(rank: int) -> list[StateComponent]:
    gen = torch.Generator().manual_seed(0)
    model = {f"layer{i}.weight": torch.randn(16, generator=gen) for i in range(4)}
    return [
        StateComponent("model", HeldState(model), SharingPattern.REPLICATED),
        StateComponent(
            "optimizer",
            HeldState({"exp_avg": torch.full((16,), float(rank))}),
            SharingPattern.PER_RANK,
        ),
    ]


class SimulatedJob:
    """A simulated job: its ranks (threads of this process, each with its own client of
    one ``TCPStore`` wrapped in a :class:`CountingStore`) saving under ``root``."""

    def __init__(
        self,
        *,
        ranks: int,
        ranks_per_node: int,
        root: str,
        opts: dict[str, Any],
        timeout_s: float | None = None,
    ) -> None:
        self.root = root
        self.commit_storage_s = 0.0  # rank 0's last commit: its requests to the storage
        self._cleanup: threading.Thread | None = None  # the last commit's marker / pointer
        self._outcome_out = threading.Event()  # rank 0's handle of the last commit is done
        self.commit_cpu_s = 0.0  # the last commit's CPU until its manifest was durable
        self.opts = opts
        self.master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
        self.ranks: list[SimRank] = []
        for r in range(ranks):
            local = min(ranks_per_node, ranks)
            info = RankInfo(r, ranks, r % local, local, r // local, f"sim{r // local}")
            client = dist.TCPStore("127.0.0.1", self.master.port, is_master=False)
            store = CountingStore(client)
            coordinator = Coordinator(
                info,
                root=root,
                store=store,
                commit=self._commit,
                storage_options=opts,
                timeout_s=timeout_s,
            )
            self.ranks.append(SimRank(info, store, coordinator, threading.Event()))

    def _commit(self, pending: PendingCommit, merged: Merged) -> Any:
        """Rank 0's commit, as its writer runs a distributed commit job (``run_job`` with
        ``report_when_durable``): it returns once the manifest is durable; the marker's
        delete and the ``latest`` pointer go on in the background (joined before the next
        commit and by :meth:`close`, as the writer chains a trainer's jobs)."""
        started = time.monotonic()
        ckpt = Location.parse(pending.path, self.opts)
        if merged.small_files or not pending.claim_id:
            begin_checkpoint(ckpt)
        records = [publish_file(ckpt, n, b) for n, b in sorted(merged.small_files.items())]
        info = commit_info(pending, merged, world_size=len(self.ranks))
        durable = threading.Event()
        failed: list[BaseException] = []
        cpu = 0.0  # the helper thread's CPU clock when it started

        def committed(_manifest: Any) -> None:
            self.commit_cpu_s = time.thread_time() - cpu
            durable.set()
            # the writer is another process: its cleanup does not hold this process's
            # GIL while rank 0 publishes the outcome
            self._outcome_out.wait(60)

        def run() -> None:
            nonlocal cpu
            cpu = time.thread_time()
            try:
                finish_checkpoint(ckpt, info, records, durable=committed)
            except BaseException as e:
                failed.append(e)
            finally:
                durable.set()

        self._join_cleanup()
        self._outcome_out.clear()
        self._cleanup = threading.Thread(target=run, name="sim-commit", daemon=True)
        self._cleanup.start()
        durable.wait()
        if failed:
            raise failed[0]
        self.commit_storage_s = time.monotonic() - started
        return _Done(self.commit_storage_s)

    def _join_cleanup(self) -> None:
        if self._cleanup is not None:
            self._cleanup.join()
            self._cleanup = None

    def save(
        self,
        step: int,
        pool: ThreadPoolExecutor,
        *,
        failing: frozenset[int] = frozenset(),
        silent: frozenset[int] = frozenset(),
    ) -> dict[int, BaseException | None]:
        """Every rank saves ``step``; ranks in ``failing`` report an error, ranks in
        ``silent`` never report (a dead rank). Returns each reporting rank's outcome."""
        path = f"{self.root}/checkpoint-{step}"
        live = [r for r in self.ranks if r.info.rank not in silent]
        for r in self.ranks:
            r.done.clear()
            r.error = None
        list(pool.map(lambda r: self._save_rank(r, step, path, r.info.rank in failing), live))
        for r in live:
            if not r.done.wait(600):
                raise TimeoutError(f"rank {r.info.rank} saw no outcome of step {step}")
        self._join_cleanup()  # this save's requests all counted in this save
        return {r.info.rank: r.error for r in live}

    def _save_rank(self, r: SimRank, step: int, path: str, fail: bool) -> None:
        plans = plan_components(
            _state(r.info.rank),
            info=r.info,
            process_groups=None,
            max_shard_size=1 << 30,
            user_metadata={},
            incremental=False,
        )
        target = claim_target(
            path, storage_options=self.opts, overwrite=False, claim=r.info.rank == 0
        )
        handle = SaveHandle(
            step=step, path=path, started=time.perf_counter(), timings=SaveTimings(0, 0.0, 0.0, 0.0)
        )
        report = RankReport(r.info.rank, step, path, tuple(p.part for p in plans))
        pending = pending_commit(handle, report, target=target, plans=plans, user_metadata={})
        r.coordinator.begin(pending)
        ckpt = Location.parse(target.write_path, self.opts)
        begin_checkpoint(ckpt)
        records = []
        for f in (f for p in plans for f in p.files if f.write):
            chunks = (tensor_bytes(f.sources[e.name]) for e in f.plan.layout.entries)
            records.append(
                write_shard(
                    ckpt.join(f.plan.file_name), f.plan.layout, chunks, rel_path=f.plan.file_name
                )
            )
        records += [publish_file(ckpt, n, b) for p in plans for n, b in sorted(p.docs.items())]

        def on_done(_handle: Any, error: BaseException | None) -> None:
            r.outcome_at = time.monotonic()
            if r.info.rank == 0:
                self._outcome_out.set()
            r.error = error
            target.release()
            r.done.set()

        error = OSError(f"rank {r.info.rank}: simulated disk full") if fail else None
        report = replace(report, files=tuple(records))
        if error is not None:
            report = replace(report, error=str(error), error_type=type(error).__name__)
        r.reported_at = time.monotonic()
        r.coordinator.data_done(pending, report, on_done=on_done, local_error=error)

    def close(self, timeout_s: float = 5.0) -> None:
        """Rank 0 waits (bounded) for every rank to read the outcomes and for its last
        commit's cleanup."""
        self.ranks[0].coordinator.close(timeout_s=timeout_s)
        self._join_cleanup()


def _is_model_shard(name: str) -> bool:
    """``model.safetensors`` (one shard) or ``model-<i>-of-<n>.safetensors``."""
    return name == "model.safetensors" or (
        name.startswith("model-") and name.endswith(".safetensors")
    )


def _round_trips(store: CountingStore) -> int:
    """Store operations of one rank (connects counted apart)."""
    return sum(n for op, n in store.ops.items() if op != "connect")


@dataclass(frozen=True)
class _Done:
    commit_s: float


@contextlib.contextmanager
def _environment(ranks: int, ranks_per_node: int) -> Iterator[None]:
    """The launcher variables ``RankInfo.current`` reads on load (restored on exit)."""
    names = ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(min(ranks_per_node, ranks)))
    for n in ("RANK", "LOCAL_RANK", "GROUP_RANK"):
        os.environ.pop(n, None)
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def simulate(
    *,
    ranks: int,
    ranks_per_node: int = 8,
    saves: int = 3,
    endpoint: str | None = None,
    threads: int = 32,
) -> SimResult:
    """Run ``saves`` saves and one resume of a job of ``ranks`` simulated ranks (see the
    module docstring); return the per-save means and the resume's counts."""
    if ranks < 1 or ranks_per_node < 1 or saves < 1:
        raise ValueError("ranks, ranks_per_node and saves must be at least 1")
    with (
        tempfile.TemporaryDirectory(prefix="ckptsvc-sim-") as workdir,
        moto_server(endpoint, workdir) as upstream,
        _environment(ranks, ranks_per_node),
    ):
        opts = {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": upstream, "region_name": "us-east-1"},
        }
        create_bucket(upstream)
        root = f"s3://{BUCKET}/run-{uuid.uuid4().hex[:8]}"
        requests = RequestLog(root, opts)
        phases = PhaseLog()
        job = SimulatedJob(ranks=ranks, ranks_per_node=ranks_per_node, root=root, opts=opts)
        rows: list[dict[str, float]] = []
        with phases.installed(), ThreadPoolExecutor(max_workers=threads) as pool:
            for step in range(saves):
                for r in job.ranks:
                    r.store.ops.clear()
                requests.reset_records()
                # N ranks' objects share this one heap, where a real rank 0 (and its node
                # writer, whose commit steps run here in-process) has its own: freeze what
                # exists so a collection walks only what this save allocates
                gc.collect()
                gc.freeze()
                try:
                    failed = {r: e for r, e in job.save(step, pool).items() if e is not None}
                finally:
                    gc.unfreeze()
                if failed:
                    raise RuntimeError(f"step {step}: rank {min(failed)}: {failed[min(failed)]}")
                records = requests.records()
                last = max(r.reported_at for r in job.ranks)
                writes = [x for x in records if x.method in _WRITES]
                prefixes = Counter(x.path.rsplit("/", 1)[0] for x in writes)
                rows.append(
                    {
                        "rank0": _round_trips(job.ranks[0].store),
                        "all": sum(_round_trips(r.store) for r in job.ranks) / ranks,
                        "connects": sum(r.store.ops["connect"] for r in job.ranks),
                        # its commit thread, and the commit's steps until the manifest
                        # is durable (the writer's, on a thread of its own here)
                        "rank0_cpu_ms": 1000 * (phases.cpu_s(step) + job.commit_cpu_s),
                        "merge_ms": 1000 * phases.wall_s(step, "decode", "merge"),
                        "commit_ms": 1000 * (job.ranks[0].outcome_at - last),
                        "wake_ms": 1000 * (phases.at(step, "wake") - last),
                        "outcome_ms": 1000 * (phases.at(step, "outcome") - last),
                        "storage_ms": 1000 * job.commit_storage_s,
                        "requests": len(records),
                        "writes": len(writes),
                        "prefix": max(prefixes.values(), default=0),
                    }
                )
            job.close()
            sizes = object_sizes(opts, root)
            requests.reset_records()
            paths = list(
                pool.map(
                    lambda r: resolve_latest(
                        root, storage_options=opts, store=r.store, rank=r.info.rank
                    ),
                    job.ranks,
                )
            )
            discovery = len(requests.records())
            latest = paths[0]
            if len(set(paths)) != 1 or latest is None:
                raise RuntimeError(
                    f"ranks resolved different checkpoints: {sorted(set(map(str, paths)))}"
                )
            requests.reset_records()

            def load(r: SimRank) -> None:
                # each simulated node its own node cache (read.node_cache): its ranks are
                # threads of this process, like every other node's
                node_dir = os.path.join(workdir, f"node-cache-{r.info.node_index}")
                with cache_dir_override(node_dir):
                    load_state(latest, storage_options=opts, rank=r.info.rank)

            list(pool.map(load, job.ranks))
            loads = requests.records()
        meta, json_meta = metadata_bytes(loads, sizes, opts)
        ckpts = {p.split("/checkpoint-")[1].split("/")[0] for p in sizes if "/checkpoint-" in p}

    def mean(k: str) -> float:
        return sum(row[k] for row in rows[1:] or rows) / len(rows[1:] or rows)

    return SimResult(
        ranks=ranks,
        nodes=(ranks + ranks_per_node - 1) // ranks_per_node,
        rank0_store_ops=mean("rank0"),
        store_ops_per_rank=mean("all"),
        store_connects_per_save=mean("connects"),
        first_save_store_connects=rows[0]["connects"],
        commit_after_last_report_ms=mean("commit_ms"),
        wake_after_last_report_ms=mean("wake_ms"),
        outcome_after_last_report_ms=mean("outcome_ms"),
        rank0_commit_cpu_ms=mean("rank0_cpu_ms"),
        decode_merge_ms=mean("merge_ms"),
        commit_storage_ms=mean("storage_ms"),
        requests_per_save=mean("requests"),
        writes_per_save=mean("writes"),
        max_writes_one_prefix=mean("prefix"),
        discovery_requests=discovery,
        load_requests=len(loads),
        load_requests_per_rank=len(loads) / ranks,
        replicated_shard_gets=sum(
            1 for x in loads if x.method == "GET" and _is_model_shard(x.path.rsplit("/", 1)[-1])
        ),
        metadata_bytes_per_rank=meta / ranks,
        json_bytes_per_rank=json_meta / ranks,
        checkpoints_at_resume=len(ckpts),
    )


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``simulate`` on an argparse subparsers object and return its parser."""
    parser = subparsers.add_parser(
        "simulate",
        help="simulate N ranks' saves and resume against a TCPStore and an S3 emulator",
        description=__doc__.split("\n", 1)[0] if __doc__ else None,
    )
    parser.add_argument("--ranks", default="8,64,512,1024", help="comma-separated job sizes")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--saves", type=int, default=3, help="saves per job (the first is warm-up)")
    parser.add_argument("--endpoint", help="an S3 endpoint to use instead of a fresh moto_server")
    parser.add_argument("--threads", type=int, default=32, help="rank threads working at once")
    parser.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    return parser


def run(args: argparse.Namespace) -> int:
    """The ``simulate`` command: one job per ``--ranks`` value, then the table."""
    try:
        sizes = [int(x) for x in str(args.ranks).split(",") if x.strip()]
    except ValueError:
        print(
            f"ckptsvc simulate: error: --ranks {args.ranks!r} is not a list of integers",
            file=sys.stderr,
        )
        return 2
    results = []
    for n in sizes:
        started = time.monotonic()
        res = simulate(
            ranks=n,
            ranks_per_node=args.ranks_per_node,
            saves=args.saves,
            endpoint=args.endpoint,
            threads=args.threads,
        )
        results.append(res)
        print(
            f"{n} ranks simulated in {time.monotonic() - started:.1f} s: {json.dumps(asdict(res))}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        print(format_table(results))
    return 0
