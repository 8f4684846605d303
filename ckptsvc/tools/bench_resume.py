"""``ckptsvc bench --resume``: time from process start to the first training step after
loading the latest checkpoint, for ckptsvc, ``torch.load``, safetensors and DCP.

After a crash or preemption every GPU waits for this, so it is what users feel of a load.

1. The parent builds a small model (an MLP of ``--model-mb`` MiB of fp32 weights) with an
   Adam optimizer, takes one step (so the optimizer has state: 3x the model's bytes in
   all), and saves model and optimizer once per method under ``--dir`` (or ``--storage``):
   ckptsvc with ``AsyncCheckpointer.save`` (the latest of two saves), ``torch.save`` of
   both state dicts, safetensors (the model's and the optimizer's tensors, the param groups
   in a JSON file) and DCP (``get_state_dict`` + ``dcp.save``).
2. For each method and rep it starts a fresh Python process (``python -m
   ckptsvc.tools.bench_resume --worker ...``); "process start" is the parent's clock just
   before the spawn. The worker imports torch, builds the same model and a fresh optimizer,
   finds and loads the latest checkpoint the way a user of that library would (ckptsvc:
   ``find_latest_checkpoint`` + ``load_components`` into the live model and optimizer), runs
   one training step and reports ``start_to_step_s`` with its phases (``import_s``,
   ``load_s``, ``step_s``).
3. The parent drops the local files from the page cache before each worker (cold, like a
   restarted node), and prints the median per method and the ratio to the fastest peer.

Local disk or an object store (``--storage s3://...``; DCP then uses its fsspec reader).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

__all__ = ["RESUME_METHODS", "add_resume_options", "run_resume"]

RESUME_METHODS = ("ckptsvc", "torch_load", "safetensors", "dcp")
_LABELS = {
    "ckptsvc": "ckptsvc find_latest + load_components",
    "torch_load": "torch.load + load_state_dict",
    "safetensors": "safetensors load_file + load_state_dict",
    "dcp": "DCP load + set_state_dict",
}


# ---------------------------------------------------------------------------- both sides
def _build(model_mb: float) -> tuple[Any, Any, int]:
    """The model (4 square layers of ``model_mb`` MiB in all) and a fresh Adam."""
    import torch

    width = max(8, int((model_mb * 2**20 / 16) ** 0.5))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width, bias=False) for _ in range(4)))
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), width


def _step(model: Any, opt: Any, width: int) -> None:
    import torch

    loss = model(torch.ones(32, width)).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _fs(root: str, options: dict[str, Any]) -> Any:
    from ckptsvc.storage import url_to_fs

    return url_to_fs(root, **options)[0]


# ---------------------------------------------------------------------------- saving
def _save_all(root: str, options: dict[str, Any], model_mb: float, methods: list[str]) -> None:
    import torch

    from ckptsvc.engine.async_checkpointer import AsyncCheckpointer

    model, opt, width = _build(model_mb)
    _step(model, opt, width)
    remote = "://" in root
    fs = _fs(root, options)
    if not remote:
        for sub in ("torch", "safetensors"):
            os.makedirs(_join(root, sub), exist_ok=True)
    if "ckptsvc" in methods:
        ckpt = AsyncCheckpointer(_join(root, "ckptsvc"), storage_options=options or None)
        try:
            for step in (1, 2):  # the latest of several
                ckpt.save(step, {"model": model, "optimizer": opt}).wait()
        finally:
            ckpt.close()
    if "torch_load" in methods:
        with fs.open(_join(root, "torch", "ckpt.pt"), "wb") as f:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
    if "safetensors" in methods:
        from safetensors.torch import save

        osd = opt.state_dict()
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors |= {f"optim.{i}.{k}": v for i, s in osd["state"].items() for k, v in s.items()}
        fs.pipe_file(_join(root, "safetensors", "ckpt.safetensors"), save(tensors))
        fs.pipe_file(
            _join(root, "safetensors", "optim.json"), json.dumps(osd["param_groups"]).encode()
        )
    if "dcp" in methods:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, storage_writer=_dcp_io(root, options, write=True))
    if not remote:
        os.sync()


def _dcp_io(root: str, options: dict[str, Any], *, write: bool) -> Any:
    import torch.distributed.checkpoint as dcp

    path = _join(root, "dcp")
    if "://" not in root:
        return dcp.FileSystemWriter(path) if write else dcp.FileSystemReader(path)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    return FsspecWriter(path, **options) if write else FsspecReader(path, **options)


# ---------------------------------------------------------------------------- the worker
def _load(method: str, root: str, options: dict[str, Any], model: Any, opt: Any) -> None:
    """Load the latest checkpoint of ``method`` into ``model`` and ``opt``."""
    import torch

    if method == "ckptsvc":
        from ckptsvc.read.component_load import load_components
        from ckptsvc.read.latest import find_latest_checkpoint
        from ckptsvc.stage.components import SharingPattern, StateComponent

        path = find_latest_checkpoint(_join(root, "ckptsvc"), storage_options=options or None)
        comps = [
            StateComponent("model", model, SharingPattern.GLOBAL),
            StateComponent("optimizer", opt, SharingPattern.GLOBAL),
        ]
        load_components(path, comps, storage_options=options or None)  # type: ignore[arg-type]
        return
    fs = _fs(root, options)
    if method == "torch_load":
        with fs.open(_join(root, "torch", "ckpt.pt"), "rb") as f:
            state = torch.load(f, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    elif method == "safetensors":
        from safetensors.torch import load, load_file

        path = _join(root, "safetensors", "ckpt.safetensors")
        tensors = load_file(path) if "://" not in root else load(fs.cat_file(path))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt_state: dict[int, dict[str, Any]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                opt_state.setdefault(int(i), {})[name] = v
        groups = json.loads(fs.cat_file(_join(root, "safetensors", "optim.json")))
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
    elif method == "dcp":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.load({"model": msd, "optim": osd}, storage_reader=_dcp_io(root, options, write=False))
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    else:
        raise ValueError(f"unknown method {method!r}")


def _worker(argv: list[str]) -> None:
    method, root, options_json, model_mb, t0 = argv
    t_import0 = time.time()
    import torch  # noqa: F401

    t_import = time.time()
    model, opt, width = _build(float(model_mb))
    t_built = time.time()
    _load(method, root, json.loads(options_json), model, opt)
    t_loaded = time.time()
    _step(model, opt, width)
    t_step = time.time()
    print(json.dumps({
        "method": method,
        "start_to_step_s": t_step - float(t0),
        "interpreter_s": t_import0 - float(t0),
        "import_s": t_import - t_import0,
        "build_s": t_built - t_import,
        "load_s": t_loaded - t_built,
        "step_s": t_step - t_loaded,
    }))  # fmt: skip
    sys.stdout.flush()
    os._exit(0)  # DCP may leave threads behind


# ---------------------------------------------------------------------------- the parent
def add_resume_options(parser: argparse.ArgumentParser) -> None:
    """``--resume`` on the ``bench`` parser (``--reps``, ``--only``, ``--dir``, ``--storage``,
    ``--storage-options``, ``--json``, ``--quiet``, ``--timeout-s`` and ``--model-mb`` are
    shared with the other modes)."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help="time from process start to the first training step after loading the latest "
        f"checkpoint; --only picks from {', '.join(RESUME_METHODS)}",
    )


def _measure(
    method: str, root: str, options: dict[str, Any], model_mb: float, timeout_s: float
) -> dict[str, Any]:
    if "://" not in root:
        from ckptsvc.tools.bench_probes import drop_page_cache

        drop_page_cache(_join(root, "ckptsvc" if method == "ckptsvc" else method.split("_")[0]))
    cmd = [sys.executable, "-m", "ckptsvc.tools.bench_resume", "--worker", method, root,
           json.dumps(options), str(model_mb)]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(
        [*cmd, repr(t0)], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"status": "error", "reason": (proc.stderr or proc.stdout)[-800:]}
    return {"status": "ok", **json.loads(lines[-1])}


def resume_rows(
    root: str, options: dict[str, Any], *, methods: list[str], reps: int, model_mb: float,
    timeout_s: float, progress: Callable[[str], None],
) -> list[dict[str, Any]]:  # fmt: skip
    """Save with every method once, then measure ``reps`` fresh-process resumes each (the
    methods take turns, so a drift of a shared machine touches all alike)."""
    _save_all(root, options, model_mb, methods)
    samples: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    errors: dict[str, str] = {}
    for rep in range(reps):
        for m in methods:
            if m in errors:
                continue
            out = _measure(m, root, options, model_mb, timeout_s)
            progress(f"resume {m} rep {rep + 1}/{reps}: {out['status']}")
            if out["status"] == "ok":
                samples[m].append(out)
            else:
                errors[m] = out["reason"]
    rows: list[dict[str, Any]] = []
    for m in methods:
        got = samples[m]
        if not got:
            rows.append({"method": m, "label": _LABELS[m], "status": "error",
                         "reason": errors.get(m, "")})  # fmt: skip
            continue
        row: dict[str, Any] = {"method": m, "label": _LABELS[m], "status": "ok", "reps": len(got)}
        for key in ("start_to_step_s", "interpreter_s", "import_s", "build_s", "load_s", "step_s"):
            row[key] = statistics.median(s[key] for s in got)
        rows.append(row)
    peers = {r["method"]: float(r["start_to_step_s"]) for r in rows if r["status"] == "ok"}
    ours = next((r for r in rows if r["method"] == "ckptsvc" and r["status"] == "ok"), None)
    others = {m: t for m, t in peers.items() if m != "ckptsvc"}
    if ours is not None and others:
        best = min(others, key=others.__getitem__)
        ours["vs_best_peer"] = peers["ckptsvc"] / others[best]
        ours["best_peer"] = best
    return rows


def format_resume(rows: list[dict[str, Any]], title: str) -> str:
    """The rows as a table (seconds, medians over the reps)."""
    head = f"{'method':42} {'start->step s':>13} {'import s':>9} {'load s':>8} {'step s':>7}  notes"
    lines = [title, "", head]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"{r['label']:42} {'error':>13}  {r['reason'][-200:]!r}")
            continue
        note = (
            f"{r['vs_best_peer']:.2f}x the best peer ({r['best_peer']})"
            if "vs_best_peer" in r
            else ""
        )
        lines.append(
            f"{r['label']:42} {r['start_to_step_s']:13.3f} {r['import_s']:9.3f} "
            f"{r['load_s']:8.3f} {r['step_s']:7.3f}  {note}"
        )
    lines.append("")
    lines.append("medians over the reps; each a fresh process; cold page cache (local)")
    return "\n".join(lines)


def run_resume(args: argparse.Namespace) -> int:
    """``ckptsvc bench --resume``. Exit status: 0 ok, 1 a method failed, 2 bad usage."""
    progress: Callable[[str], None] = (
        (lambda _msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    )
    methods = [m.strip() for m in (args.only or "").split(",") if m.strip()] or list(RESUME_METHODS)
    unknown = [m for m in methods if m not in RESUME_METHODS]
    if unknown or args.reps < 1:
        print(f"ckptsvc bench --resume: choose --only from {', '.join(RESUME_METHODS)} and "
              "--reps >= 1", file=sys.stderr)  # fmt: skip
        return 2
    options = json.loads(args.storage_options) if args.storage_options else {}
    local = tempfile.mkdtemp(prefix="ckptsvc-bench-resume-", dir=args.dir)
    root = f"{args.storage.rstrip('/')}/resume-{os.getpid()}" if args.storage else local
    try:
        rows = resume_rows(
            root, options, methods=methods, reps=args.reps, model_mb=args.model_mb,
            timeout_s=args.timeout_s, progress=progress,
        )  # fmt: skip
    finally:
        if args.storage and not args.keep:
            _fs(root, options).rm(root, recursive=True)
        if not args.keep:
            shutil.rmtree(local, ignore_errors=True)
    title = (
        f"ckptsvc bench --resume: {args.model_mb:g} MiB model + Adam, "
        f"{'remote ' + args.storage if args.storage else 'local disk'}, reps {args.reps}"
    )
    if args.json:
        from ckptsvc.tools.bench_report import write_json

        write_json({"title": title, "rows": rows}, args.json)
    if args.json != "-":
        print(format_resume(rows, title))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
