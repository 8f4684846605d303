"""The DCP workloads of ``ckptsvc bench``: ``torch.distributed.checkpoint`` with DCP's own
storage (``FileSystemWriter``/``Reader``, ``FsspecWriter``/``Reader`` on object stores)
and with ckptsvc's plugins (:class:`ckptsvc.dcp.StorageWriter` / ``StorageReader``), side
by side in one run.

Methods: ``dcp_save`` / ``dcp_async`` / ``dcp_load`` (DCP's storage) and
``ckptsvc_dcp_save`` / ``ckptsvc_dcp_async`` / ``ckptsvc_dcp_load`` (ckptsvc's), each in
its own worker process like every bench method (:mod:`ckptsvc.tools.bench_workloads` runs
them: ``python -m ckptsvc.tools.bench_dcp CONFIG_JSON``). In the worker: a 1-rank gloo
group on a ``HashStore`` (``no_dist`` would skip the collectives DCP's ``async_save``
relies on), then

- ``*_save``: ``dcp.save``; blocking = durable = until it returns (both writers fsync
  before ``finish``; ckptsvc's also commits its manifest last);
- ``*_async``: ``dcp.async_save`` of the same ``AsyncCheckpointerType`` for both writers
  (``PROCESS`` where this torch has it): a warm-up save (pays the daemon start), then the
  measured save with changed values; blocking = until ``async_save`` returns, durable =
  until its future completes;
- ``*_load``: ``dcp.load`` in place into a state of the same shapes, then every page
  touched.

``ckptsvc bench --dcp`` selects these six (``--only`` picks any of them).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from ckptsvc.tools.bench_probes import PeakRss, Sample, build_state, make_specs
from ckptsvc.tools.bench_workloads import (
    ARTIFACTS,
    Ctx,
    Unavailable,
    load_sample,
    perturb,
    require,
    run_worker_main,
    sample,
)

__all__ = ["DCP_METHODS", "DCP_WORKLOADS"]

#: the DCP methods, in the order the bench runs and prints them
DCP_METHODS = (
    "dcp_save",
    "dcp_async",
    "ckptsvc_dcp_save",
    "ckptsvc_dcp_async",
    "dcp_load",
    "ckptsvc_dcp_load",
)


def _dcp_init() -> Any:
    dcp = require("torch.distributed", "checkpoint")
    import torch.distributed as dist

    if not dist.is_available():
        raise Unavailable("torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dcp


def _writer(ctx: Ctx, name: str, *, ours: bool) -> Any:
    """A storage writer for the artifact ``name``: ckptsvc's, or DCP's own."""
    dcp = _dcp_init()
    if ours:
        from ckptsvc.dcp import StorageWriter

        return StorageWriter(
            ctx.path(name),
            storage_options=ctx.cfg.storage_options or None,
            thread_count=ctx.cfg.dcp_threads,
        )
    if ctx.cfg.remote:
        fsspec_writer = require("torch.distributed.checkpoint._fsspec_filesystem", "FsspecWriter")
        return fsspec_writer(
            ctx.path(name), thread_count=ctx.cfg.dcp_threads, **ctx.cfg.storage_options
        )
    return dcp.FileSystemWriter(ctx.path(name), thread_count=ctx.cfg.dcp_threads)


def _reader(ctx: Ctx, name: str, *, ours: bool) -> Any:
    dcp = _dcp_init()
    if ours:
        from ckptsvc.dcp import StorageReader

        return StorageReader(ctx.path(name), storage_options=ctx.cfg.storage_options or None)
    if ctx.cfg.remote:
        fsspec_reader = require("torch.distributed.checkpoint._fsspec_filesystem", "FsspecReader")
        return fsspec_reader(ctx.path(name), **ctx.cfg.storage_options)
    return dcp.FileSystemReader(ctx.path(name))


def _save_name(ours: bool) -> str:
    return ARTIFACTS["ckptsvc_dcp_save" if ours else "dcp_save"]


def w_save(ctx: Ctx, *, ours: bool) -> Sample:
    """``dcp.save`` through one writer (see the module docstring)."""
    dcp = _dcp_init()
    writer = _writer(ctx, _save_name(ours), ours=ours)
    with PeakRss() as rss:
        t0 = time.perf_counter()
        dcp.save(ctx.state, storage_writer=writer)
        t1 = time.perf_counter()
    return sample(ctx, rss, (t1 - t0, t1 - t0, {}))


def w_async(ctx: Ctx, *, ours: bool) -> Sample:
    """``dcp.async_save`` through one writer: a warm-up save, then the measured one."""
    dcp = _dcp_init()
    state = ctx.state or {}
    kinds = require("torch.distributed.checkpoint.state_dict_saver", "AsyncCheckpointerType")
    kind = getattr(kinds, "PROCESS", None) or kinds.THREAD
    prefix = "ckptsvc_dcp_async" if ours else "dcp_async"

    def one(name: str) -> tuple[float, float]:
        writer = _writer(ctx, name, ours=ours)
        t0 = time.perf_counter()
        fut = dcp.async_save(state, storage_writer=writer, async_checkpointer_type=kind)
        t1 = time.perf_counter()
        (getattr(fut, "upload_completion", None) or fut).result()
        return t1 - t0, time.perf_counter() - t0

    with PeakRss() as rss:
        first = one(f"{prefix}_warmup")
        perturb(state)
        blocking_s, durable_s = one(prefix)
    extras = {"mode": kind.value, "first_blocking_s": first[0], "first_durable_s": first[1]}
    return sample(ctx, rss, (blocking_s, durable_s, extras))


def w_load(ctx: Ctx, *, ours: bool) -> Sample:
    """``dcp.load`` in place of what ``*_save`` wrote through the same writer's reader."""
    dcp = _dcp_init()
    target = build_state(make_specs(ctx.cfg.total_nbytes, tensors=ctx.cfg.tensors), fill=False)
    reader = _reader(ctx, _save_name(ours), ours=ours)

    def load() -> dict[str, Any]:
        dcp.load(target, storage_reader=reader)
        return target

    return load_sample(ctx, load)


#: method -> (workload, needs the state built)
DCP_WORKLOADS: dict[str, tuple[Callable[[Ctx], Sample], bool]] = {
    "dcp_save": (partial(w_save, ours=False), True),
    "dcp_async": (partial(w_async, ours=False), True),
    "dcp_load": (partial(w_load, ours=False), False),
    "ckptsvc_dcp_save": (partial(w_save, ours=True), True),
    "ckptsvc_dcp_async": (partial(w_async, ours=True), True),
    "ckptsvc_dcp_load": (partial(w_load, ours=True), False),
}


if __name__ == "__main__":
    run_worker_main(sys.argv[1:], workloads=DCP_WORKLOADS)
