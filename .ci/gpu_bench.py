"""1 GiB of fp32 CUDA tensors: a later async ``save()`` against the device-to-host copy into
pinned memory, and ``load_checkpoint(device="cuda")`` against safetensors (warm page
cache). Run on the device machine by ``.ci/gpu_on_device.sh``; prints two lines."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

from ckptsvc import AsyncCheckpointer
from ckptsvc.sharded_checkpoint import load_checkpoint, save_checkpoint


def timed(fn: Callable[[], object], reps: int = 3) -> float:
    """Median wall seconds of ``fn``, the device synchronized around each call."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    state = {f"w{i}": torch.randn(2**30 // 4 // 8, device="cuda") for i in range(8)}
    pinned = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in state.items()}

    def to_pinned() -> None:
        for k, v in state.items():
            pinned[k].copy_(v, non_blocking=True)

    floor = timed(to_pinned)
    pageable = timed(lambda: {k: v.cpu() for k, v in state.items()})
    root = tempfile.mkdtemp(dir="/tmp")
    blocking = []
    with AsyncCheckpointer(root) as ckpt:
        ckpt.save(0, state).wait(300)  # the first save plans and warms the arena
        for step in range(1, 4):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            handle = ckpt.save(step, state)
            blocking.append(time.perf_counter() - t0)
            handle.wait(300)
    save_s = statistics.median(blocking)
    print(
        f"D2H floor pinned {floor:.3f}s  pageable .cpu() {pageable:.3f}s  async save() "
        f"blocking median {save_s:.3f}s  ratio vs pinned floor {save_s / floor:.2f}"
    )
    path = os.path.join(root, "weights")
    save_checkpoint(path, state, safetensors=True)
    single = os.path.join(root, "one.safetensors")
    save_file({k: v.cpu() for k, v in state.items()}, single)
    ours = timed(lambda: load_checkpoint(path, device="cuda"))
    theirs = timed(lambda: load_file(single, device="cuda"))
    print(
        f"warm-cache load to cuda: ckptsvc load_checkpoint {ours:.3f}s  safetensors "
        f"load_file {theirs:.3f}s  ratio {theirs / ours:.2f}x"
    )


if __name__ == "__main__":
    main()
