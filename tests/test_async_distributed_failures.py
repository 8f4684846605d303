"""Distributed ``save_components`` whose job never reaches the node writer on one rank.

The rank's ``save_components`` raises; its failed report must still go out, so that rank 0
fails the checkpoint at once (instead of waiting ``CKPTSVC_COMMIT_TIMEOUT_S`` for a report
that never comes) and the next save's commit, which waits for the previous save to settle,
is not blocked forever.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from dist_workers.launch import free_port
from torch import nn

from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
from ckptsvc.engine.writer_link import WriterLink
from ckptsvc.errors import WriterDiedError
from ckptsvc.format.manifest import MANIFEST_NAME
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.stage.components import SharingPattern, StateComponent

pytestmark = pytest.mark.multiproc


def _rank_main(rank: int, world: int, port: int, root: str, node: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world), GROUP_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port), CKPTSVC_NODE_ID=node, CKPTSVC_WRITER_LINGER_S="1",
        CKPTSVC_COMMIT_TIMEOUT_S="600",
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    comps = [StateComponent("model", model, SharingPattern.GLOBAL)]
    result: dict[str, Any] = {}
    real_submit = WriterLink.submit
    failures = {"left": 1 if rank == 1 else 0}

    def submit(self: WriterLink, job: Any, on_outcome: Any) -> Any:
        if failures["left"]:  # rank 1 sends only data jobs: fail its first
            failures["left"] -= 1
            raise WriterDiedError("injected: no node writer took the job")
        return real_submit(self, job, on_outcome)

    WriterLink.submit = submit  # type: ignore[method-assign]
    with AsyncCheckpointer(root) as ckpt:
        try:
            first = ckpt.save_components(1, comps)
            error = first.exception(120)
            result["first"] = [first.path, type(error).__name__, str(error)]
        except WriterDiedError as e:
            result["first"] = [None, "raised", str(e)]
        dist.barrier()
        second = ckpt.save_components(2, comps)
        error = second.exception(120)
        result["second"] = [second.path, None if error is None else repr(error)]
        ckpt.wait_all(60)  # the raised failure is not reported twice
    dist.barrier()
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)


@pytest.mark.slow
def test_a_rank_whose_job_was_never_sent_fails_the_save_everywhere_and_the_next_commits(
    tmp_path: Path,
) -> None:
    root, out = str(tmp_path / "run"), str(tmp_path / "result")
    node = f"f{uuid.uuid4().hex[:10]}"
    torch.multiprocessing.spawn(
        _rank_main, args=(2, free_port(), root, node, out), nprocs=2, join=True
    )
    results = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    assert results[1]["first"][1] == "raised" and "injected" in results[1]["first"][2]
    path1, verdict, message = results[0]["first"]
    assert verdict == "SaveFailedError" and "rank 1" in message, results[0]
    assert not (Path(path1) / MANIFEST_NAME).exists()
    assert all(r["second"][1] is None for r in results), results
    assert find_latest_checkpoint(root) == results[0]["second"][0]
