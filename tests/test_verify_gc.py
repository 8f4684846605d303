"""``verify_checkpoint``, ``find_latest_verified`` and ``collect_garbage`` in detail, and the
``ckptsvc verify`` / ``ckptsvc gc`` commands through a real subprocess.

gc's promise: it removes exactly the debris (saves and deletions that never finished,
stray temp files, shard files no manifest lists, unfinished S3 uploads, shared memory of
dead processes) and never a complete checkpoint or anything that may still be in flight.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import StorageRoot

import ckptsvc.ops.gc as gc_module
from ckptsvc.format.manifest import MANIFEST_NAME, MARKER_NAME
from ckptsvc.format.skeleton import SKELETON_NAME
from ckptsvc.ops.gc import collect_garbage, unfinished_uploads
from ckptsvc.read.discovery import CheckpointStatus, checkpoint_info, next_checkpoint_path
from ckptsvc.read.latest import find_latest_verified
from ckptsvc.read.verify import verify_checkpoint
from ckptsvc.sharded_checkpoint import save_checkpoint
from ckptsvc.workers.shm import segment_prefix

SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def save(root: str, step: int, *, opts: dict[str, Any] | None = None) -> str:
    path = next_checkpoint_path(root, step)
    sd = {f"w{i}": torch.full((64,), float(step * 10 + i)) for i in range(4)}
    save_checkpoint(path, sd, safetensors=True, max_shard_size=512, storage_options=opts, step=step)
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def iso(delta_s: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=delta_s)).isoformat()


def marker(path: str, **fields: Any) -> None:
    Path(path, MARKER_NAME).write_text(json.dumps(fields))


def incomplete(root: str, step: int, **marker_fields: Any) -> str:
    """A save that stopped after its first shard: marker, one shard, no manifest."""
    path = save(root, step)
    Path(path, MANIFEST_NAME).unlink()
    Path(path, SHARD2).unlink()
    marker(path, **marker_fields)
    return path


def ckptsvc_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptsvc.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ckptsvc_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The CLI in this process (``ckptsvc_cli`` pays a torch import per call): its exit
    status and stdout."""
    from ckptsvc.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = int(e.code or 0)
    return int(code or 0), capsys.readouterr().out


# ---- verify ----------------------------------------------------------------------------------


def test_skeleton_name_matches_flatten() -> None:
    from ckptsvc.stage.flatten import SKELETON_NAME as FLATTEN_SKELETON

    assert SKELETON_NAME == FLATTEN_SKELETON


def test_verify_reads_every_byte_only_when_deep(tmp_path: Path) -> None:
    path = save(str(tmp_path), 1)
    deep, shallow = verify_checkpoint(path), verify_checkpoint(path, deep=False)
    assert deep.ok and shallow.ok and deep.deep and not shallow.deep
    assert deep.files_checked == shallow.files_checked == 3  # two shards and the index
    assert deep.to_dict()["ok"] is True and deep.to_dict()["problems"] == []


def test_verify_refuses_a_shard_that_is_a_symlink_out_of_the_checkpoint(tmp_path: Path) -> None:
    path = save(str(tmp_path), 1)
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(Path(path, SHARD1), outside)  # same bytes, same size, same CRC: only the link
    os.symlink(outside, Path(path, SHARD1))
    report = verify_checkpoint(path)
    assert [(p.path, p.kind) for p in report.problems] == [(SHARD1, "symlink")]
    assert str(outside) in report.problems[0].detail


def test_a_symlink_inside_the_checkpoint_is_fine(tmp_path: Path) -> None:
    path = save(str(tmp_path), 1)
    os.replace(Path(path, SHARD1), Path(path, "real.bin"))
    os.symlink("real.bin", Path(path, SHARD1))
    assert verify_checkpoint(path).ok


def test_verify_reports_a_bad_header_even_when_sizes_match(tmp_path: Path) -> None:
    path = save(str(tmp_path), 1)
    shard = Path(path, SHARD1)
    data = bytearray(shard.read_bytes())
    data[8] = ord("[")  # the JSON header is no longer an object
    shard.write_bytes(bytes(data))
    kinds = {(p.path, p.kind) for p in verify_checkpoint(path).problems}
    assert kinds == {(SHARD1, "checksum")}  # CRC first; the header is not parsed twice
    assert verify_checkpoint(path, deep=False).ok


@pytest.mark.parametrize("folded", [True, False], ids=["in-header", "json-file"])
def test_verify_a_component_document_naming_a_missing_tensor(
    node: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, folded: bool
) -> None:
    """The model's document in ``model.safetensors``'s header, or (over the fold limit)
    the file ``model_state.json``: verify finds what it names but does not hold."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ckptsvc.engine.async_checkpointer import AsyncCheckpointer
    from ckptsvc.format.checksum import crc32c_hex
    from ckptsvc.format.manifest import FileRecord, Manifest
    from ckptsvc.stage.parts import DOC_META_KEY

    if not folded:
        monkeypatch.setattr("ckptsvc.stage.component_plan.MAX_FOLDED_DOC_BYTES", 0)
    with AsyncCheckpointer(tmp_path) as ckpt:
        handle = ckpt.save(1, {"model": {"w": torch.ones(4)}, "step": 1})
        handle.wait(120)
    assert verify_checkpoint(handle.path).ok
    doc_name = "model.safetensors" if folded else "model_state.json"
    m = Manifest.from_json(Path(handle.path, MANIFEST_NAME).read_bytes(), where="t")
    assert m.components[0].metadata["ckptsvc"]["instances"][""]["doc"] == doc_name

    def rewrite(name: str, edit: Any) -> None:
        doc_path = Path(handle.path, name)
        if folded:  # the same tensors, the edited document in the header
            tensors = load_file(doc_path)
            with safe_open(str(doc_path), "pt") as f:
                meta = dict(f.metadata())
            doc = json.loads(meta[DOC_META_KEY])
            edit(doc)
            save_file(tensors, doc_path, metadata={**meta, DOC_META_KEY: json.dumps(doc)})
            raw = doc_path.read_bytes()
        else:
            doc = json.loads(doc_path.read_text())
            edit(doc)
            raw = json.dumps(doc).encode()
            doc_path.write_bytes(raw)
        m = Manifest.from_json(Path(handle.path, MANIFEST_NAME).read_bytes(), where="t")
        files = tuple(
            FileRecord(f.path, len(raw), crc32c_hex(raw)) if f.path == name else f for f in m.files
        )
        Path(handle.path, MANIFEST_NAME).write_bytes(dataclasses.replace(m, files=files).to_json())

    rewrite(doc_name, lambda d: d["state"].update(extra={"__tensor__": "not.saved"}))
    report = verify_checkpoint(handle.path)
    assert [(p.path, p.kind) for p in report.problems] == [(doc_name, "document")]
    assert "not.saved" in report.problems[0].detail
    assert verify_checkpoint(handle.path, deep=False).ok
    rewrite(
        doc_name,
        lambda d: d["tensors"].update(ghost={**d["tensors"]["w"]}) or d["state"].pop("extra"),
    )
    report = verify_checkpoint(handle.path)
    assert [(p.kind, "ghost" in p.detail) for p in report.problems] == [("document", True)]


def test_verify_of_incomplete_legacy_and_absent(tmp_path: Path) -> None:
    root = str(tmp_path)
    inc = incomplete(root, 1, pid=dead_pid(), host=socket.gethostname(), started=iso())
    assert verify_checkpoint(inc).status == "incomplete"
    assert [p.kind for p in verify_checkpoint(inc).problems] == ["incomplete"]
    legacy = save(root, 2)
    Path(legacy, MANIFEST_NAME).unlink()
    report = verify_checkpoint(legacy)
    assert report.status == "legacy" and not report.ok
    assert verify_checkpoint(str(tmp_path / "nothing")).status == "absent"


def test_verify_a_forgather_manifest_without_a_file_list(tmp_path: Path) -> None:
    path = save(str(tmp_path), 1)
    doc = json.loads(Path(path, MANIFEST_NAME).read_text())
    del doc["metadata"]["ckptsvc"]  # what Forgather's own manifest looks like
    Path(path, MANIFEST_NAME).write_text(json.dumps(doc))
    report = verify_checkpoint(path)
    assert report.ok and report.status == "complete" and report.files_checked == 0
    Path(path, SHARD2).unlink()
    assert [(p.path, p.kind) for p in verify_checkpoint(path).problems] == [(SHARD2, "missing")]
    assert find_latest_verified(str(tmp_path)) is None


# ---- find_latest_verified --------------------------------------------------------------------


def test_latest_verified_accepts_legacy_with_its_files(tmp_path: Path) -> None:
    root = str(tmp_path)
    save(root, 1)
    legacy = save(root, 2)
    Path(legacy, MANIFEST_NAME).unlink()
    os.utime(legacy)  # legacy checkpoints order by mtime: make it the newest
    assert find_latest_verified(root) == legacy
    Path(legacy, SHARD2).unlink()  # its index names a file that is gone: skipped
    assert find_latest_verified(root) == next_checkpoint_path(root, 1)


def test_latest_verified_keeps_the_callers_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    save("run", 1)
    assert find_latest_verified("run") == os.path.join("run", "checkpoints", "checkpoint-1")


def test_latest_verified_without_checkpoints_dir_checks_the_dir_itself(tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path), {"w": torch.ones(2)}, safetensors=True)
    assert find_latest_verified(str(tmp_path)) == str(tmp_path)
    Path(tmp_path, "model-00001-of-00001.safetensors").write_bytes(b"garbage")
    assert find_latest_verified(str(tmp_path)) is None
    assert find_latest_verified(str(tmp_path / "empty")) is None


def test_latest_verified_rejects_unknown_modes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="verify must be"):
        find_latest_verified(str(tmp_path), verify="thorough")  # type: ignore[arg-type]


# ---- gc: incomplete directories ---------------------------------------------------------------


def test_gc_removes_a_dead_local_writers_save_even_after_the_newest(tmp_path: Path) -> None:
    root = str(tmp_path)
    good = save(root, 1)
    debris = incomplete(root, 2, pid=dead_pid(), host=socket.gethostname(), started=iso())
    report = collect_garbage(root)
    assert report.removed == (debris,) and not os.path.exists(debris)
    assert checkpoint_info(good).status is CheckpointStatus.COMPLETE


def test_gc_removes_the_first_save_of_a_dead_writer(tmp_path: Path) -> None:
    root = str(tmp_path)
    debris = incomplete(root, 1, pid=dead_pid(), host=socket.gethostname(), started=iso())
    assert collect_garbage(root).removed == (debris,)


def test_gc_keeps_a_live_writers_save(tmp_path: Path) -> None:
    root = str(tmp_path)
    save(root, 1)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = incomplete(root, 2, pid=sleeper.pid, host=socket.gethostname(), started=iso(-999))
        report = collect_garbage(root)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert report.removed == ()
    assert report.kept == ((live, f"its writer (pid {sleeper.pid}) is still running"),)


def test_gc_on_another_hosts_saves_goes_by_time(tmp_path: Path) -> None:
    root = str(tmp_path)
    before = incomplete(root, 1, pid=1, host="other-host", started=iso(-3600))
    save(root, 2)
    after = incomplete(root, 3, pid=1, host="other-host", started=iso(+5))
    report = collect_garbage(root)
    assert report.removed == (before,)
    assert [u for u, _ in report.kept] == [after]
    assert "in flight on other-host" in report.kept[0][1]


def test_gc_keeps_the_first_save_of_another_host(tmp_path: Path) -> None:
    root = str(tmp_path)
    first = incomplete(root, 1, pid=1, host="other-host", started=iso(-3600))
    assert [u for u, _ in collect_garbage(root).kept] == [first]


def test_gc_min_age_keeps_young_debris(tmp_path: Path) -> None:
    root = str(tmp_path)
    save(root, 1)
    young = incomplete(root, 2, pid=dead_pid(), host=socket.gethostname(), started=iso(-5))
    report = collect_garbage(root, min_age_s=600)
    assert [u for u, _ in report.kept] == [young] and "min_age_s" in report.kept[0][1]
    assert collect_garbage(root, min_age_s=1).removed == (young,)


def test_gc_keeps_a_damaged_commit_without_marker(tmp_path: Path) -> None:
    """A manifest gone bad is not debris: a person decides (``ckptsvc verify``)."""
    root = str(tmp_path)
    damaged = save(root, 1)
    save(root, 2)
    Path(damaged, MANIFEST_NAME).write_text("{torn")
    report = collect_garbage(root)
    assert report.removed == ()
    assert [u for u, _ in report.kept] == [damaged] and "verify" in report.kept[0][1]


def test_gc_finishes_an_interrupted_retention(tmp_path: Path) -> None:
    root = str(tmp_path)
    marked = save(root, 1)  # retention wrote its marker, the manifest is still there
    marker(marked, deleting=True)
    half = save(root, 2)  # retention removed the manifest too
    marker(half, deleting=True)
    Path(half, MANIFEST_NAME).unlink()
    newest = save(root, 3)
    report = collect_garbage(root)
    assert sorted(report.removed) == sorted([marked, half])
    assert not os.path.exists(marked) and not os.path.exists(half)
    assert verify_checkpoint(newest).ok


def test_gc_removes_the_remains_of_a_cut_deletion_but_not_user_files(tmp_path: Path) -> None:
    root = str(tmp_path)
    remains = save(root, 1)
    for name in os.listdir(remains):
        if name != SHARD1:
            os.unlink(os.path.join(remains, name))
    user = next_checkpoint_path(root, 9)
    os.makedirs(user)
    Path(user, "notes.txt").write_text("mine")
    empty = next_checkpoint_path(root, 10)
    os.makedirs(empty)
    report = collect_garbage(root)
    assert sorted(report.removed) == sorted([remains, empty])
    assert Path(user, "notes.txt").exists()


# ---- gc: inside complete checkpoints ----------------------------------------------------------


def test_gc_cleans_inside_complete_checkpoints(tmp_path: Path) -> None:
    root = str(tmp_path)
    path = save(root, 1)
    old = time.time() - 3600
    stray_tmp = Path(path, f".{MANIFEST_NAME}.{'ab' * 6}.tmp")
    stray_tmp.write_text("x")
    orphan = Path(path, "model-00003-of-00004.safetensors")  # an older save's extra shard
    orphan.write_bytes(b"x")
    os.utime(orphan, (old, old))
    fresh_orphan = Path(path, "model-00004-of-00004.safetensors")  # newer than the manifest
    fresh_orphan.write_bytes(b"x")
    os.utime(fresh_orphan, (time.time() + 60, time.time() + 60))
    marker(path, pid=dead_pid(), host=socket.gethostname(), started=iso(-7200))
    user_file = Path(path, "eval_metrics.json")
    user_file.write_text("{}")
    dry = collect_garbage(root, dry_run=True)
    assert stray_tmp.exists() and orphan.exists()
    report = collect_garbage(root)
    assert sorted(report.removed) == sorted(dry.removed)
    assert sorted(os.path.basename(u) for u in report.removed) == sorted(
        [stray_tmp.name, orphan.name, MARKER_NAME]
    )
    assert fresh_orphan.exists() and user_file.exists()
    assert verify_checkpoint(path).ok


def test_gc_leaves_a_complete_checkpoint_being_overwritten_alone(tmp_path: Path) -> None:
    """An overwrite's marker is newer than the manifest: its new shards are not orphans."""
    root = str(tmp_path)
    path = save(root, 1)
    marker(path, pid=1, host="other-host", started=iso(+1))
    new_shard = Path(path, "model-00001-of-00003.safetensors")
    new_shard.write_bytes(b"x")
    os.utime(new_shard, (0, 0))
    report = collect_garbage(root)
    assert report.removed == () and new_shard.exists()
    assert "in progress" in report.kept[0][1]


def test_gc_dry_run_changes_nothing(tmp_path: Path) -> None:
    root = str(tmp_path)
    save(root, 1)
    debris = incomplete(root, 2, pid=dead_pid(), host=socket.gethostname(), started=iso())
    before = sorted(p for p in tmp_path.rglob("*"))
    report = collect_garbage(root, dry_run=True)
    assert report.dry_run and report.removed == (debris,) and report.reclaimed >= 1
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_gc_never_touches_complete_checkpoints(tmp_path: Path) -> None:
    root = str(tmp_path)
    paths = [save(root, s) for s in (1, 2, 3)]
    snapshot = {p: sorted(os.listdir(p)) for p in paths}
    report = collect_garbage(root, shared_memory=False)
    assert report.reclaimed == 0 and report.kept == ()
    assert {p: sorted(os.listdir(p)) for p in paths} == snapshot


# ---- gc: shared memory -----------------------------------------------------------------------


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
def test_gc_reclaims_arenas_of_dead_processes_only(tmp_path: Path) -> None:
    node = f"gc{uuid.uuid4().hex[:10]}"
    prefix = segment_prefix(node)
    dead = f"{prefix}{dead_pid()}-0"
    mine = f"{prefix}{os.getpid()}-0"
    other_node = f"{segment_prefix(node + 'x')}{dead_pid()}-0"
    for name in (dead, mine, other_node):
        Path("/dev/shm", name).write_bytes(b"\0" * 4096)
    try:
        dry = collect_garbage(str(tmp_path), node=node, dry_run=True)
        assert dry.reclaimed_segments == (dead,) and Path("/dev/shm", dead).exists()
        off = collect_garbage(str(tmp_path), node=node, shared_memory=False)
        assert off.reclaimed_segments == () and Path("/dev/shm", dead).exists()
        report = collect_garbage(str(tmp_path), node=node)
        assert report.reclaimed_segments == (dead,)
        assert not Path("/dev/shm", dead).exists()
        assert Path("/dev/shm", mine).exists() and Path("/dev/shm", other_node).exists()
    finally:
        for name in (dead, mine, other_node):
            Path("/dev/shm", name).unlink(missing_ok=True)


# ---- gc: S3 multipart uploads ----------------------------------------------------------------


def _start_upload(root: StorageRoot, rel: str) -> str:
    client = root.server.boto3_client()  # type: ignore[union-attr]
    key = f"{root.url.split('/', 3)[3]}/{rel}"
    up = client.create_multipart_upload(Bucket=root.bucket, Key=key)
    client.upload_part(
        Bucket=root.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    return f"s3://{root.bucket}/{key}"


def test_gc_aborts_unfinished_uploads(s3_root: StorageRoot) -> None:
    """Uploads of saves that cannot finish go; one of a live save and foreign ones stay."""
    opts = s3_root.storage_options
    gone_dir = _start_upload(s3_root, "checkpoints/checkpoint-1/model-00001-of-00001.safetensors")
    committed = save(s3_root.url, 2, opts=opts)
    in_complete = _start_upload(
        s3_root, "checkpoints/checkpoint-2/model-00009-of-00009.safetensors"
    )
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = s3_root.location("checkpoints", "checkpoint-3")
        live.join(MARKER_NAME).publish(
            json.dumps(
                {"pid": sleeper.pid, "host": socket.gethostname(), "started": iso()}
            ).encode()
        )
        inflight = _start_upload(
            s3_root, "checkpoints/checkpoint-3/model-00001-of-00001.safetensors"
        )
        outside = _start_upload(s3_root, "elsewhere/big.bin")  # not under checkpoints/: not ours
        assert len(unfinished_uploads(s3_root.url, storage_options=opts)) == 3
        dry = collect_garbage(s3_root.url, storage_options=opts, dry_run=True)
        assert sorted(u.split(" ")[0] for u in dry.aborted_uploads) == sorted(
            [gone_dir, in_complete]
        )
        report = collect_garbage(s3_root.url, storage_options=opts)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(u.split(" ")[0] for u in report.aborted_uploads) == sorted(
        [gone_dir, in_complete]
    )
    assert any(inflight in u and "still running" in why for u, why in report.kept)
    left = unfinished_uploads(s3_root.url, storage_options=opts)
    assert [u.split(" ")[0] for u in left] == [inflight]
    client = s3_root.server.boto3_client()  # type: ignore[union-attr]
    keys = [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_root.bucket)["Uploads"]]
    assert outside.split("/", 3)[3] in keys
    assert verify_checkpoint(committed, storage_options=opts).ok


def test_gc_aborts_unfinished_uploads_in_the_hf_trainer_layout(s3_root: StorageRoot) -> None:
    """``<root>/checkpoint-*`` (the HF Trainer layout) is a checkpoint folder too; other
    keys directly under the root are not ckptsvc's."""
    opts = s3_root.storage_options
    gone = _start_upload(s3_root, "checkpoint-5/model-00001-of-00001.safetensors")
    outside = _start_upload(s3_root, "runs.log")
    assert [u.split(" ")[0] for u in unfinished_uploads(s3_root.url, storage_options=opts)] == [
        gone
    ]
    report = collect_garbage(s3_root.url, storage_options=opts)
    assert [u.split(" ")[0] for u in report.aborted_uploads] == [gone]
    client = s3_root.server.boto3_client()  # type: ignore[union-attr]
    keys = [u["Key"] for u in client.list_multipart_uploads(Bucket=s3_root.bucket)["Uploads"]]
    assert keys == [outside.split("/", 3)[3]]


@pytest.fixture
def short_clock_slack(monkeypatch: pytest.MonkeyPatch) -> float:
    """gc's clock slack (2 s) shortened, so that uploads can predate gc without a 2.5 s
    sleep; moto's clock is this host's and its ``Initiated`` is never later than the truth."""
    monkeypatch.setattr(gc_module, "CLOCK_SLACK_S", 0.5)
    return 0.5


def test_gc_aborts_the_uploads_of_directories_it_removes(s3_root: StorageRoot) -> None:
    opts = s3_root.storage_options
    loc = s3_root.location("checkpoints", "checkpoint-1")
    loc.join(MARKER_NAME).publish(
        json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": iso()}).encode()
    )
    _start_upload(s3_root, "checkpoints/checkpoint-1/model-00001-of-00001.safetensors")
    report = collect_garbage(s3_root.url, storage_options=opts)
    assert report.removed == (loc.url,) and len(report.aborted_uploads) == 1
    assert unfinished_uploads(s3_root.url, storage_options=opts) == []


# ---- the commands ----------------------------------------------------------------------------


def test_cli_verify_human_json_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = str(tmp_path)
    good = save(root, 1)
    bad = save(root, 2)
    Path(bad, SHARD2).write_bytes(Path(bad, SHARD2).read_bytes()[:-1] + b"\x7f")

    code, out = ckptsvc_main(capsys, "verify", good)
    assert code == 0 and f"{good}: OK" in out, out
    code, out = ckptsvc_main(capsys, "verify", bad)
    assert code == 1
    assert f"checksum: {SHARD2}:" in out
    code, out = ckptsvc_main(capsys, "verify", bad, "--no-deep", "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out = ckptsvc_main(capsys, "verify", bad, "--deep", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["ok"] is False and doc["problems"][0]["path"] == SHARD2


def test_cli_verify_a_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    save(root, 1)
    incomplete(root, 2, pid=dead_pid(), host=socket.gethostname(), started=iso())
    code, out = ckptsvc_main(capsys, "verify", root)
    assert code == 0, out  # an uncommitted save is reported, not a failure
    assert "1 passed, 0 failed" in out and "INCOMPLETE" in out
    docs = json.loads(ckptsvc_main(capsys, "verify", root, "--json")[1])
    assert sorted(d["status"] for d in docs) == ["complete", "incomplete"]
    bad = save(root, 3)
    Path(bad, SHARD1).unlink()
    assert ckptsvc_main(capsys, "verify", root)[0] == 1


@pytest.mark.slow
def test_cli_verify_on_s3(s3_root: StorageRoot) -> None:
    path = save(s3_root.url, 1, opts=s3_root.storage_options)
    out = ckptsvc_cli("verify", path, "--storage-options", json.dumps(s3_root.storage_options))
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_cli_gc_dry_run_then_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    save(root, 1)
    debris = incomplete(root, 2, pid=dead_pid(), host=socket.gethostname(), started=iso())
    code, out = ckptsvc_main(capsys, "gc", root, "--dry-run")
    assert code == 0 and f"would remove {debris}" in out
    assert os.path.exists(debris)
    doc = json.loads(ckptsvc_main(capsys, "gc", root, "--json", "--no-shared-memory")[1])
    assert doc["removed"] == [debris] and doc["dry_run"] is False and doc["reclaimed"] == 1
    assert not os.path.exists(debris)
    code, out = ckptsvc_main(capsys, "gc", root)
    assert code == 0 and "removed 0 checkpoint dirs/files" in out


def test_cli_gc_min_age(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path)
    save(root, 1)
    incomplete(root, 2, pid=dead_pid(), host=socket.gethostname(), started=iso())
    doc = json.loads(ckptsvc_main(capsys, "gc", root, "--min-age-s", "3600", "--json")[1])
    assert doc["removed"] == [] and "min_age_s" in doc["kept"][0]["why"]


_ARENA_CHILD = """
import sys, time
from ckptsvc.stage.arena import ArenaPool
from ckptsvc.workers.identity import node_id
pool = ArenaPool(max_arenas=1, node=sys.argv[1] or node_id())
arena, _ = pool.acquire(8192)
print(arena.name, flush=True)
time.sleep(120)
"""


def _arena_child(env: dict[str, str], node: str = "") -> tuple[subprocess.Popen[str], str]:
    """A process that stages through the library's own arena pool, then waits."""
    child = subprocess.Popen(
        [sys.executable, "-c", _ARENA_CHILD, node], env=env, stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    return child, child.stdout.readline().strip()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.skipif(not os.path.isdir("/proc/self/ns"), reason="needs Linux pid namespaces")
def test_cli_gc_reclaims_arenas_of_killed_jobs_without_their_node_id(tmp_path: Path) -> None:
    """A trainer of a job whose node id gc was not told (one from CKPTSVC_NODE_ID, one
    with dashes) dies by SIGKILL: a plain `ckptsvc gc ROOT` unlinks its arena; a live
    process's arena stays."""
    shm = tmp_path / "shm"
    shm.mkdir()
    base = {k: v for k, v in os.environ.items() if k != "CKPTSVC_NODE_ID"}
    base["CKPTSVC_SHM_DIR"] = str(shm)
    job = f"job-{uuid.uuid4().hex[:6]}"
    children = [
        _arena_child({**base, "CKPTSVC_NODE_ID": job}),  # node_id() makes it job_<hex>
        _arena_child(base, node=f"{job}-7-x"),  # a node id given as is, dashes and all
        _arena_child({**base, "CKPTSVC_NODE_ID": "live-one"}),
    ]
    try:
        names = [name for _, name in children]
        assert all(name.startswith("ckptsvc-") for name in names), names
        assert names[1].startswith(f"ckptsvc-{job}-7-x-")
        for child, _ in children[:2]:
            child.kill()
            child.wait()
        assert sorted(os.listdir(shm)) == sorted(names)
        root = str(tmp_path / "run")
        dry = subprocess.run(
            [sys.executable, "-m", "ckptsvc.cli", "gc", root, "--dry-run"],
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        for name in names[:2]:
            assert f"would unlink stale shared memory {name}" in dry.stdout, dry.stdout
        assert names[2] not in dry.stdout and sorted(os.listdir(shm)) == sorted(names)
        out = subprocess.run(
            [sys.executable, "-m", "ckptsvc.cli", "gc", root, "--json"],
            env=base,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        assert sorted(json.loads(out.stdout)["reclaimed_segments"]) == sorted(names[:2])
        assert os.listdir(shm) == [names[2]]  # the live process's arena survives
    finally:
        for child, _ in children:
            child.kill()
            child.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self/ns"), reason="needs Linux pid namespaces")
def test_gc_keeps_other_pid_namespaces_and_foreign_names(tmp_path: Path) -> None:
    from ckptsvc.liveness import pid_namespace

    pid = dead_pid()
    ns = int(pid_namespace())
    names = {
        f"ckptsvc-a-b-{ns}-{pid}-0": True,  # ours, dead owner: reclaimed
        f"ckptsvc-a-b-{ns + 1}-{pid}-0": False,  # another pid namespace
        f"ckptsvc-a-{ns}-{os.getpid()}-0": False,  # this process
        f"ckptsvc-{ns}-{pid}-0": False,  # not our pattern (no node)
        f"other-a-{ns}-{pid}-0": False,
    }
    for name in names:
        (tmp_path / name).write_bytes(b"\0")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKPTSVC_SHM_DIR", str(tmp_path))
        report = collect_garbage(str(tmp_path / "run"))
    assert report.reclaimed_segments == tuple(n for n, gone in names.items() if gone)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, gone in names.items() if not gone)


def _uploads_left(root: StorageRoot) -> list[str]:
    return [
        u.split(" ")[0] for u in unfinished_uploads(root.url, storage_options=root.storage_options)
    ]


def test_gc_aborts_the_uploads_of_failed_saves_while_the_writer_lives(
    s3_root: StorageRoot, short_clock_slack: float
) -> None:
    """The writer lives on (a sleeper stands in), but its save failed: its trainer is
    dead, or the writer marked the save failed, or no marker claims the directory. Those
    uploads go; the upload of a save whose writer and trainer live stays."""
    from ckptsvc.workers.commit import abandon_checkpoint

    opts = s3_root.storage_options
    save(s3_root.url, 1, opts=opts)
    host = socket.gethostname()
    shard = "model-00001-of-00001.safetensors"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        writer = sleeper.pid
        dead_trainer = s3_root.location("checkpoints", "checkpoint-2")
        dead_trainer.join(MARKER_NAME).publish(
            json.dumps(
                {"pid": writer, "host": host, "trainer_pid": dead_pid(), "started": iso()}
            ).encode()
        )
        failed = s3_root.location("checkpoints", "checkpoint-3")
        failed.join(MARKER_NAME).publish(  # the claim of a trainer that lives on
            json.dumps({"pid": writer, "host": host, "claim": "c3", "started": iso()}).encode()
        )
        abandon_checkpoint(failed, "StorageTransientError: the store went away", claim_id="c3")
        assert json.loads(failed.join(MARKER_NAME).read_bytes())["failed"]
        no_marker = s3_root.location("checkpoints", "checkpoint-4")
        no_marker.join("notes.txt").publish(b"a user's file")
        live = s3_root.location("checkpoints", "checkpoint-5")
        live.join(MARKER_NAME).publish(
            json.dumps(
                {"pid": writer, "host": host, "trainer_pid": writer, "started": iso()}
            ).encode()
        )
        ups = {
            n: _start_upload(s3_root, f"checkpoints/checkpoint-{n}/{shard}") for n in (2, 3, 4, 5)
        }
        time.sleep(short_clock_slack + 0.5)  # the uploads predate gc
        dry = collect_garbage(s3_root.url, storage_options=opts, dry_run=True)
        assert sorted(u.split(" ")[0] for u in dry.aborted_uploads) == sorted(
            ups[n] for n in (2, 3, 4)
        )
        report = collect_garbage(s3_root.url, storage_options=opts)
        assert sorted(report.removed) == sorted([dead_trainer.url, failed.url])
        assert _uploads_left(s3_root) == [ups[5]]
        assert no_marker.join("notes.txt").exists()  # not debris: only its upload went
        assert any(ups[5] in u and "still running" in why for u, why in report.kept)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_gc_aborts_the_upload_of_a_damaged_commit_but_keeps_the_directory(
    s3_root: StorageRoot, short_clock_slack: float
) -> None:
    opts = s3_root.storage_options
    path = save(s3_root.url, 1, opts=opts)
    s3_root.location("checkpoints", "checkpoint-1").join(MANIFEST_NAME).publish(b"{not json")
    up = _start_upload(s3_root, "checkpoints/checkpoint-1/model-00009-of-00009.safetensors")
    time.sleep(short_clock_slack + 0.5)
    report = collect_garbage(s3_root.url, storage_options=opts)
    assert report.removed == () and any("damaged" in why for _, why in report.kept)
    assert [u.split(" ")[0] for u in report.aborted_uploads] == [up]
    assert _uploads_left(s3_root) == [] and checkpoint_info(path, storage_options=opts)
