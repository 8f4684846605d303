"""``ckptsvc demo``: train a small transformer, checkpoint it asynchronously, kill it, resume.

The README's main command. A causal transformer learns a synthetic language (token
sequences from a fixed random Markov chain) on the CPU for a few hundred steps. Every
``save_every`` steps :class:`~ckptsvc.manager.CheckpointManager` saves model, optimizer,
LR scheduler, data position, RNG and progress asynchronously to
``<output>/checkpoints`` (a path or a URL); each save prints how long training was
blocked next to what a synchronous ``torch.save`` (+ fsync) of the same state costs.

With ``kill_at``, training runs in a child process that SIGKILLs itself at that step (a
real kill: no cleanup, maybe a save in flight); a new process resumes from the latest
complete checkpoint, and the combined loss curve is compared, bit for bit, with an
uninterrupted run's.

Run order (``run_demo``): header; run 1 (in this process, or a child that dies); with a
kill, run 2 (a child that resumes) and run 3 (the uninterrupted reference, here); the
summary; a resume check (load the latest checkpoint into fresh objects, compare); a deep
verify of the latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ckptsvc.compat.training_state import SimpleStatefulProvider, TrainingProgress
from ckptsvc.manager import CheckpointConfig, CheckpointManager
from ckptsvc.ops.retention import delete_checkpoint
from ckptsvc.read.discovery import CHECKPOINTS_DIR, list_checkpoints
from ckptsvc.read.latest import find_latest_checkpoint
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.stage.components import RNGState
from ckptsvc.storage import Location

__all__ = ["DemoSettings", "SyntheticCorpus", "TinyLM", "run_demo"]

_THREADS = 1  # fixed, so every process of the demo computes bit-identical losses


class TinyLM(nn.Module):
    """A small causal transformer language model with tied input/output embeddings."""

    def __init__(
        self,
        *,
        vocab: int = 256,
        dim: int = 96,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, batch_first=True, dropout=dropout
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        n = tokens.shape[1]
        mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)
        return self.head(self.norm(self.blocks(self.embed(tokens), mask=mask, is_causal=True)))


class SyntheticCorpus:
    """Endless batches from a fixed random Markov chain: learnable, and resumable (its
    position is its generator state)."""

    def __init__(self, *, vocab: int, seq_len: int, batch_size: int, seed: int) -> None:
        table = torch.Generator().manual_seed(seed)
        probs = torch.softmax(3.0 * torch.randn(vocab, vocab, generator=table), dim=-1)
        self.cdf = torch.cumsum(probs, dim=-1)
        self.cdf[:, -1] = 1.0
        self.vocab, self.seq_len, self.batch_size = vocab, seq_len, batch_size
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.batches = 0

    def next_batch(self) -> torch.Tensor:
        tokens = torch.empty(self.batch_size, self.seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, self.vocab, (self.batch_size,), generator=self.gen)
        u = torch.rand(self.seq_len, self.batch_size, 1, generator=self.gen)
        for t in range(1, self.seq_len):
            nxt = torch.searchsorted(self.cdf[tokens[:, t - 1]], u[t])
            tokens[:, t] = nxt.squeeze(1).clamp_(max=self.vocab - 1)
        self.batches += 1
        return tokens

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state(), "batches": self.batches}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.gen.set_state(torch.as_tensor(state_dict["generator"], dtype=torch.uint8))
        self.batches = int(state_dict["batches"])


@dataclass(frozen=True)
class DemoSettings:
    """What to run; ``kill_at`` (a step) makes run 1 a child process that dies there."""

    output: str = "."
    steps: int = 300
    save_every: int = 50
    keep: int = 3
    seed: int = 0
    kill_at: int | None = None
    storage_options: dict[str, Any] | None = None
    progress: bool = False


class _Run:
    """Everything one training run owns, built identically in every process."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        self.model = TinyLM()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-3, weight_decay=0.01)
        warmup = 20
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.1, 1.0 - s / 2000)
        )
        self.data = SyntheticCorpus(vocab=256, seq_len=32, batch_size=16, seed=seed + 100)
        self.progress = TrainingProgress()
        self.provider = SimpleStatefulProvider(
            {
                "optimizer": self.opt,
                "scheduler": self.sched,
                "data": self.data,
                "rng": RNGState(),
                "progress": self.progress,
            }
        )

    def step(self) -> float:
        tokens = self.data.next_batch()
        logits = self.model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.progress.global_step += 1
        self.progress.tokens_seen += tokens.numel()
        return float(loss.detach())

    def full_state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "data": self.data.state_dict(),
            "rng": RNGState().state_dict(),
            "progress": self.progress.state_dict(),
        }


def _deterministic() -> None:
    torch.set_num_threads(_THREADS)
    torch.use_deterministic_algorithms(True)


def _torch_save_s(state: dict[str, Any], directory: str) -> float:
    """Seconds for a synchronous ``torch.save`` of ``state`` made durable (fsync)."""
    fd, path = tempfile.mkstemp(prefix=".torch-save-baseline-", suffix=".pt", dir=directory)
    try:
        t0 = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0
    finally:
        os.unlink(path)


def _manager(s: DemoSettings, run: _Run) -> CheckpointManager:
    config = CheckpointConfig(
        output_dir=s.output, save_total_limit=s.keep, storage_options=s.storage_options
    )
    return CheckpointManager(config=config, stateful_provider=run.provider, model=run.model)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


class _SaveLog:
    """Per-save timings of one run, printed as they happen and summarised at the end."""

    def __init__(self, output: str, say: Callable[[str], None]) -> None:
        self.say = say
        self.baseline_dir = output if "://" not in output else tempfile.gettempdir()
        os.makedirs(self.baseline_dir, exist_ok=True)  # same disk as the checkpoints
        self.rows: list[tuple[float, float, Any]] = []

    def save(self, manager: CheckpointManager, run: _Run, loss: float) -> None:
        step = run.progress.global_step
        t0 = time.perf_counter()
        manager.save_checkpoint(checkpoint_id=step)
        blocked = time.perf_counter() - t0
        sync_s = _torch_save_s(run.full_state(), self.baseline_dir)
        self.rows.append((blocked, sync_s, manager.last_handle))
        self.say(
            f"  step {step:4d}  loss {loss:.4f}  save blocked training {_ms(blocked):>9}"
            f"   (torch.save+fsync of the same state: {_ms(sync_s)})"
        )

    def summary(self) -> None:
        if not self.rows:
            return
        blocked = sorted(r[0] for r in self.rows)
        sync = sorted(r[1] for r in self.rows)
        durable = sorted(r[2].timings.durable_s or 0.0 for r in self.rows)
        mid = len(self.rows) // 2
        self.say(
            f"  {len(self.rows)} saves: training blocked {_ms(blocked[mid])} (median; torch.save+fsync "
            f"{_ms(sync[mid])}); each became durable in the background {_ms(durable[mid])} after it started"
        )


def train(
    s: DemoSettings,
    *,
    resume: bool,
    save: bool,
    say: Callable[[str], None],
    on_loss: Callable[[int, float], None] | None = None,
) -> tuple[_Run, dict[int, float]]:
    """One run: build, maybe resume, train to ``s.steps`` (saving every ``save_every``
    steps and at the end when ``save``); returns the run and ``{step: loss}``."""
    _deterministic()
    run = _Run(s.seed)
    losses: dict[int, float] = {}
    manager = _manager(s, run) if save or resume else None
    bar: Any = None
    try:
        if manager is not None and resume:
            path = manager.load_checkpoint()
            say(f"  resumed from {path} at step {run.progress.global_step}")
        if manager is not None and save:
            manager.start()  # the writer's start-up is not part of the first save
        if s.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=s.steps,
                initial=run.progress.global_step,
                unit="step",
                leave=False,
                disable=None,
            )
        log = _SaveLog(s.output, bar.write if bar is not None else say)
        while run.progress.global_step < s.steps:
            loss = run.step()
            step = run.progress.global_step
            losses[step] = loss
            if on_loss is not None:
                on_loss(step, loss)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
            if manager is not None and save and (step % s.save_every == 0 or step == s.steps):
                log.save(manager, run, loss)
            if s.kill_at is not None and step == s.kill_at:
                log.say(f"  step {step:4d}  SIGKILL (a save may be in flight)")
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        if bar is not None:
            bar.close()
            bar = None
        if manager is not None:
            manager.wait()
            log.say = say
            log.summary()
    finally:
        if bar is not None:
            bar.close()
        if manager is not None:
            manager.close()
    return run, losses


def _child(argv: list[str]) -> int:
    """``python -m ckptsvc.tools.demo SETTINGS_JSON LOSSES_FILE [--resume]``: one training run
    whose losses are appended to LOSSES_FILE as they happen (hex floats, exact)."""
    settings = DemoSettings(**json.loads(argv[0]))
    with open(argv[1], "a", encoding="ascii") as out:

        def record(step: int, loss: float) -> None:
            out.write(json.dumps({"step": step, "loss": loss.hex()}) + "\n")
            out.flush()

        train(settings, resume="--resume" in argv, save=True, say=print, on_loss=record)
    return 0


def _spawn(s: DemoSettings, losses_file: str, *, resume: bool) -> int:
    settings = dataclasses.asdict(dataclasses.replace(s, kill_at=None) if resume else s)
    cmd = [sys.executable, "-m", "ckptsvc.tools.demo", json.dumps(settings), losses_file]
    sys.stdout.flush()  # the child writes to the same stdout
    return subprocess.call([*cmd, "--resume"] if resume else cmd)


def _read_losses(path: str) -> dict[int, float]:
    with open(path, encoding="ascii") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {int(r["step"]): float.fromhex(r["loss"]) for r in rows}


def _killed_and_resumed(s: DemoSettings) -> tuple[dict[int, float], int] | None:
    """Runs 1 (killed) and 2 (resumed) as child processes; merged losses and the resume step."""
    with tempfile.TemporaryDirectory(prefix="ckptsvc-demo-") as tmp:
        first, second = os.path.join(tmp, "run1.jsonl"), os.path.join(tmp, "run2.jsonl")
        print(f"[run 1] training in a child process that SIGKILLs itself at step {s.kill_at}")
        rc = _spawn(s, first, resume=False)
        if rc != -signal.SIGKILL:
            print(f"FAILED: run 1 exited with {rc}, not by SIGKILL")
            return None
        print(f"[run 1] killed by SIGKILL (exit status {rc})")
        latest = find_latest_checkpoint(s.output, storage_options=s.storage_options)
        if latest is None:
            print("FAILED: no complete checkpoint survived the kill")
            return None
        print(f"[run 2] resuming in a new process from the latest complete checkpoint, {latest}")
        rc = _spawn(s, second, resume=True)
        if rc != 0:
            print(f"FAILED: run 2 exited with {rc}")
            return None
        before, after = _read_losses(first), _read_losses(second)
    resumed_at = min(after) - 1
    replayed = [k for k in after if k in before]
    if any(before[k] != after[k] for k in replayed):
        print("FAILED: steps replayed after the resume differ from the killed run's")
        return None
    if replayed:
        print(
            f"  steps {min(replayed)}-{max(replayed)} ran twice (lost with the kill, replayed): identical losses"
        )
    return {**{k: v for k, v in before.items() if k <= resumed_at}, **after}, resumed_at


def _resume_check(s: DemoSettings, want: dict[str, Any]) -> bool:
    """Load the latest checkpoint into fresh objects and compare with ``want`` (the full
    state of the run that should have been saved, captured right after it ended)."""
    fresh = _Run(s.seed + 1)  # different initial values: a load that does nothing fails
    with _manager(s, fresh) as manager:
        path = manager.load_checkpoint()
    diff = _first_difference(want, fresh.full_state())
    tied = fresh.model.head.weight is fresh.model.embed.weight
    print(
        f"resume check: loaded {path} into a fresh model, optimizer, scheduler, data stream "
        f"and RNG: {'bitwise identical' if diff is None else f'DIFFERENT at {diff}'}; "
        f"tied embedding {'restored' if tied else 'NOT restored'}"
    )
    return diff is None and tied


def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The path of the first value that differs between two nested states, or ``None``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and torch.equal(a, b)
        )
        return None if same else path or "."
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{path} (keys)"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{path}.{k}"))), None)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length)"
        pairs = enumerate(zip(a, b, strict=True))
        return next(
            (d for i, (x, y) in pairs if (d := _first_difference(x, y, f"{path}[{i}]"))), None
        )
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return None if a == b or nan else path or "."


DEMO_MARKER_NAME = ".ckptsvc-demo"


def _make_room(output: str, storage_options: dict[str, Any] | None) -> bool:
    """Let the demo start: an empty output is marked as the demo's; the checkpoints of an
    earlier demo run (the marker says so) are deleted; anyone else's are never touched."""
    marker = Location.parse(output, storage_options).join(CHECKPOINTS_DIR, DEMO_MARKER_NAME)
    previous = list_checkpoints(output, storage_options=storage_options)
    if previous and not marker.exists():
        print(
            f"{output.rstrip('/')}/{CHECKPOINTS_DIR} already holds checkpoints that the demo did "
            "not write; the demo needs a directory of its own: pass --output somewhere else"
        )
        return False
    if previous:
        print(
            f"deleting the {len(previous)} checkpoint(s) of the previous `ckptsvc demo` run in "
            f"{output.rstrip('/')}/{CHECKPOINTS_DIR}"
        )
        for info in previous:
            delete_checkpoint(info.location)
    marker.publish(b"written by `ckptsvc demo`: a new demo run replaces these checkpoints\n")
    return True


def run_demo(
    *,
    output: str = ".",
    steps: int = 300,
    save_every: int = 50,
    kill_at: int | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> int:
    """Run the demo, print what happened; return a process exit code (0: all checks passed)."""
    if kill_at is not None and not 0 < kill_at < steps:
        print(f"ckptsvc demo: --kill-at must be between 1 and {steps - 1}", file=sys.stderr)
        return 2
    if steps < 1 or save_every < 1:
        print("ckptsvc demo: --steps and --save-every must be positive", file=sys.stderr)
        return 2
    s = DemoSettings(
        output=output, steps=steps, save_every=save_every, kill_at=kill_at,
        storage_options=storage_options, progress=progress,
    )  # fmt: skip
    if not _make_room(output, storage_options):
        return 2
    probe = _Run(0)
    nparams = sum(p.numel() for p in probe.model.parameters())
    print(
        f"ckptsvc demo: a {nparams / 1e6:.2f} M-parameter transformer learns a synthetic language; "
        f"{steps} steps, async checkpoint every {save_every} to {output.rstrip('/')}/checkpoints "
        f"(keeping {s.keep})"
    )
    t0 = time.perf_counter()
    ok = True
    if kill_at is None:
        run, losses = train(s, resume=False, save=True, say=print)
    else:
        merged = _killed_and_resumed(s)
        if merged is None:
            return 1
        losses, resumed_at = merged
        print("[run 3] uninterrupted reference run, same seeds, no checkpoints")
        plain = dataclasses.replace(s, kill_at=None)
        run, reference = train(plain, resume=False, save=False, say=print)
        identical = losses == reference
        ok &= identical
        print(
            f"loss curve of the killed + resumed run (resumed at step {resumed_at}): "
            + ("bitwise identical to" if identical else "DIFFERENT from")
            + f" the uninterrupted run's, steps 1-{steps}"
        )
    print(f"loss: {losses[1]:.3f} at step 1 -> {losses[steps]:.3f} at step {steps}")
    ok &= _resume_check(s, run.full_state())
    latest = find_latest_checkpoint(output, storage_options=storage_options)
    if latest is None:
        print("FAILED: no complete checkpoint found")
        return 1
    report = verify_checkpoint(latest, deep=True, storage_options=storage_options)
    print(
        f"ckptsvc verify --deep {latest}: {'OK' if report.ok else 'FAILED'} ({report.files_checked} files, sizes and CRC-32C)"
    )
    for p in report.problems:
        print(f"  {p.kind}: {p.path}: {p.detail}")
    ok &= report.ok
    print(
        f"done in {time.perf_counter() - t0:.1f} s; inspect: ckptsvc ls {output}   |   ckptsvc inspect {latest}"
    )
    return 0 if ok else 1


if __name__ == "__main__":  # the child training process of a demo with kill_at
    sys.exit(_child(sys.argv[1:]))
