"""``ckptsvc bench`` end to end at tiny sizes: real worker processes, real files, real S3.

No timed assertions: the checks are on structure and on relations that hold on any
machine (durable >= blocking, GB/s = bytes / durable, loads hold the state in RSS, cold
reads start with nothing cached, scratch data removed, /dev/shm not leaked).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ckptsvc.tools import bench
from ckptsvc.tools.bench_probes import (
    IO_CHUNK_BYTES,
    _parts,
    cached_bytes,
    make_specs,
    read_file,
    recycle_memory,
    stream_read,
    write_file,
)
from ckptsvc.tools.bench_report import Row, evaluate_targets, format_table

MiB = 1 << 20


def run_bench(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ckptsvc.tools.bench", "--quiet", "--reps", "1", *args],
        capture_output=True, text=True, timeout=timeout_s, env=env, check=False,
    )  # fmt: skip


def rows_by_method(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["method"]: r for r in doc["rows"]}


# ---------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize(
    ("text", "nbytes"),
    [("1GiB", 1 << 30), ("256MiB", 256 << 20), ("8mib", 8 << 20), ("1.5G", 3 << 29),
     ("100MB", 100_000_000), ("4096", 4096), ("2 KiB", 2048)],
)  # fmt: skip
def test_parse_size(text: str, nbytes: int) -> None:
    assert bench.parse_size(text) == nbytes


@pytest.mark.parametrize("text", ["", "GiB", "1XB", "-1MiB", "1 GiB extra"])
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="cannot parse size"):
        bench.parse_size(text)


def test_recycle_memory_writes_its_file_once_and_leaves_it_uncached(tmp_path: Path) -> None:
    path = tmp_path / "recycle.bin"
    recycle_memory(str(path), nbytes=IO_CHUNK_BYTES + 12345)
    assert path.stat().st_size == IO_CHUNK_BYTES + 12345
    first = path.stat().st_mtime_ns
    recycle_memory(str(path), nbytes=IO_CHUNK_BYTES + 12345)
    assert path.stat().st_mtime_ns == first  # reused, not rewritten
    cached = cached_bytes(str(path))
    assert cached is None or cached < IO_CHUNK_BYTES // 2


def test_stream_read_reads_every_file_and_keeps_nothing(tmp_path: Path) -> None:
    (tmp_path / "d" / "e").mkdir(parents=True)
    (tmp_path / "d" / "a.bin").write_bytes(os.urandom(IO_CHUNK_BYTES + 4097))
    (tmp_path / "d" / "e" / "b.bin").write_bytes(b"x" * 10)
    (tmp_path / "d" / "e" / "empty").write_bytes(b"")
    assert stream_read(str(tmp_path / "d"), streams=3) == IO_CHUNK_BYTES + 4097 + 10
    assert stream_read(str(tmp_path / "d" / "e" / "b.bin"), streams=1) == 10


@pytest.mark.parametrize("total", [8 * MiB, 64 * MiB, 1 << 30])
def test_specs_are_a_realistic_mix(total: int) -> None:
    specs = make_specs(total)
    nbytes = [s.nbytes for s in specs]
    assert total - 4096 * 2 <= sum(nbytes) <= total
    assert sorted(nbytes, reverse=True)[0] == total // 4 // 4096 * 4096  # the largest: 25 %
    assert sum(n <= 64 * 1024 for n in nbytes) >= 10  # many tiny tensors
    assert {s.dtype for s in specs} == {"bfloat16", "float32"}
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        elem = 2 if s.dtype == "bfloat16" else 4
        count = 1
        for dim in s.shape:
            count *= dim
        assert count * elem == s.nbytes
    assert make_specs(total) == specs  # deterministic: every worker builds the same state


@pytest.mark.parametrize(
    ("nbytes", "streams"),
    [
        (1, 4),
        (IO_CHUNK_BYTES, 4),
        (5 * IO_CHUNK_BYTES + 7, 4),
        (8 * IO_CHUNK_BYTES, 3),
        (3 * IO_CHUNK_BYTES, 1),
    ],
)
def test_parts_cover_the_file_in_aligned_ranges(nbytes: int, streams: int) -> None:
    ranges = _parts(nbytes, streams)
    assert 1 <= len(ranges) <= streams
    assert ranges[0][0] == 0 and ranges[-1][1] == nbytes
    for (_, hi), (lo, _) in itertools.pairwise(ranges):
        assert hi == lo and lo % IO_CHUNK_BYTES == 0


def test_raw_floor_io_round_trips(tmp_path: Path) -> None:
    data = bytes(range(256)) * (3 * MiB // 256 + 1)
    path = str(tmp_path / "raw.bin")
    written_s, durable_s = write_file(path, memoryview(data), streams=4)
    assert 0 < written_s <= durable_s
    assert Path(path).read_bytes() == data
    read_s, got = read_file(path, streams=4)
    assert read_s > 0 and got == len(data)


def _row(method: str, blocking_s: float, durable_s: float, **extra: Any) -> Row:
    return Row(method, "save", method, "ok", nbytes=1 << 30, blocking_s=blocking_s,
               durable_s=durable_s, gb_per_s=(1 << 30) / durable_s / 1e9, **extra)  # fmt: skip


def test_targets_pass_fail_and_missing() -> None:
    rows = [
        _row("memcpy", 0.1, 0.1),
        _row("raw_write", 2.0, 2.5),
        _row("raw_read", 1.0, 1.0),
        _row(
            "ckptsvc_async",
            0.12,
            2.9,
            rss_extra_bytes=int(1.05 * (1 << 30)),
            extras={"arena_nbytes": 1 << 30, "first_blocking_s": 0.5},
        ),
        _row(
            "ckptsvc_async_reserved",
            0.12,
            2.9,
            extras={"arena_nbytes": 1 << 29, "first_blocking_s": 0.11, "warmup_s": 0.15},
        ),
        _row("dcp_async", 0.3, 5.0),
        _row("ckptsvc_save", 2.4, 2.6),
        _row("torch_save", 2.0, 2.9),
    ]
    verdicts = {t.formula: (t.verdict, t.value) for t in evaluate_targets(rows)}
    assert verdicts["ckptsvc_async.blocking / memcpy"] == ("PASS", pytest.approx(1.2))
    assert verdicts["ckptsvc_async.durable / (memcpy + raw_write)"] == (
        "PASS",
        pytest.approx(2.9 / 2.6),
    )
    assert verdicts["dcp_async.blocking / ckptsvc_async.blocking"] == ("FAIL", pytest.approx(2.5))
    assert verdicts["ckptsvc_save.GB/s / raw_write.GB/s"] == ("PASS", pytest.approx(2.5 / 2.6))
    assert verdicts["ckptsvc_save.GB/s / torch_save.GB/s"] == ("PASS", pytest.approx(2.9 / 2.6))
    assert verdicts["ckptsvc_load.GB/s / best raw read.GB/s"] == ("n/a", None)  # no load row
    assert verdicts["ckptsvc_async.RSS+ / arena bytes"] == ("PASS", pytest.approx(1.05))
    assert verdicts["ckptsvc_async.first blocking / memcpy"] == ("FAIL", pytest.approx(5.0))
    reserved = verdicts["ckptsvc_async_reserved.first blocking / memcpy"]
    assert reserved == ("PASS", pytest.approx(1.1))
    # per GiB: 0.15 s over a 0.5 GiB arena, against 0.1 s for 1 GiB of memcpy
    assert verdicts["warm-up s/GiB / memcpy s/GiB"] == ("FAIL", pytest.approx(3.0))
    text = format_table(rows, evaluate_targets(rows), "title")
    assert "ckptsvc_async.blocking / memcpy <= 1.25" in text and "missing ckptsvc_load" in text


def test_load_targets_use_the_best_read_floor() -> None:
    """The load is held to the fastest of the buffered, O_DIRECT and multi-object reads of
    the run, and to safetensors' load_file."""
    rows = [
        _row("raw_read", 1.0, 1.0),
        _row("raw_read_direct", 0.5, 0.5),
        _row("ckptsvc_load", 0.6, 0.6),
        _row("safetensors_load", 0.8, 0.8),
    ]
    targets = {t.formula: t for t in evaluate_targets(rows)}
    best = targets["ckptsvc_load.GB/s / best raw read.GB/s"]
    assert (best.verdict, best.value) == ("FAIL", pytest.approx(0.5 / 0.6))
    assert "raw_read_direct" in best.note
    faster = targets["ckptsvc_load.GB/s / safetensors_load.GB/s"]
    assert (faster.verdict, faster.value) == ("PASS", pytest.approx(0.8 / 0.6))
    rows[1] = _row("raw_read_direct", 2.0, 2.0)  # slower than buffered: buffered is the floor
    best = {t.formula: t for t in evaluate_targets(rows)}["ckptsvc_load.GB/s / best raw read.GB/s"]
    assert (best.verdict, best.value) == ("PASS", pytest.approx(1.0 / 0.6))


def _floor_with_reps(method: str, reps: list[float]) -> Row:
    """A floor row as the bench aggregates it: the fastest rep, the reps kept as samples."""
    samples = tuple({"blocking_s": r, "durable_s": r} for r in reps)
    return Row(method, "floor", method, "ok", nbytes=1 << 30, blocking_s=min(reps),
               durable_s=min(reps), samples=samples)  # fmt: skip


def test_targets_against_a_best_floor_compare_median_with_median() -> None:
    """On a noisy disk a floor's fastest rep against a method's median is unfair: the
    "best floor" targets divide by the floor's median rep and name the fastest-rep ratio."""
    rows = [
        _floor_with_reps("raw_write_direct", [1.0, 1.6, 1.5]),  # median 1.5
        _floor_with_reps("raw_write", [1.2, 1.8, 2.0]),  # fastest 1.2 is not the best median
        _row("ckptsvc_save", 1.6, 1.6),
        _row("ckptsvc_async", 0.1, 1.6, rss_extra_bytes=1 << 30),
        _floor_with_reps("raw_read", [0.5, 0.9, 1.0]),  # median 0.9
        _floor_with_reps("raw_read_direct", [0.6, 0.7, 0.8]),  # median 0.7: the best
        _row("ckptsvc_load", 0.75, 0.75),
    ]
    targets = {t.formula: t for t in evaluate_targets(rows)}
    save = targets["ckptsvc_save.durable / best raw write"]
    assert (save.verdict, save.value) == ("FAIL", pytest.approx(1.6 / 1.5))
    assert "raw_write_direct" in save.note and "fastest rep 1.60" in save.note
    phase = targets["(ckptsvc_async.durable - blocking) / best raw write"]
    assert (phase.verdict, phase.value) == ("PASS", pytest.approx(1.5 / 1.5))
    load = targets["ckptsvc_load.GB/s / best raw read.GB/s"]
    assert (load.verdict, load.value) == ("PASS", pytest.approx(0.7 / 0.75))
    assert "best read floor: raw_read_direct" in load.note and "fastest rep 0.80" in load.note


def _outcome(blocking_s: float, durable_s: float, peak: int) -> dict[str, Any]:
    sample = {"method": "m", "nbytes": 10**9, "blocking_s": blocking_s, "durable_s": durable_s,
              "rss_base_bytes": 100, "rss_peak_bytes": peak, "child_rss_peak_bytes": 0,
              "extras": {"tag": durable_s}}  # fmt: skip
    return {"status": "ok", "sample": sample}


def test_aggregate_takes_fastest_floor_and_median_method() -> None:
    outcomes = [_outcome(0.2, 0.9, 300), _outcome(0.1, 0.5, 200), _outcome(0.3, 0.7, 900)]
    floor = bench._aggregate(bench.Method("raw_write", "floor", "floor"), outcomes)
    assert (floor.blocking_s, floor.durable_s, floor.extras["tag"]) == (0.1, 0.5, 0.5)
    method = bench._aggregate(bench.Method("torch_save", "save", "save"), outcomes)
    assert (method.blocking_s, method.durable_s, method.extras["tag"]) == (0.2, 0.7, 0.7)
    assert method.gb_per_s == pytest.approx(1 / 0.7)
    assert method.rss_extra_bytes == floor.rss_extra_bytes == 800  # worst rep
    failed = bench._aggregate(
        bench.Method("torch_save", "save", "save"),
        [outcomes[0], {"status": "error", "reason": "boom"}],
    )
    assert failed.status == "ok" and failed.durable_s == 0.9 and "boom" in failed.reason


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--only", "memcpy,nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert bench.main(["--size", "10"]) == 2
    assert bench.main(["--size", "lots"]) == 2
    assert bench.main(["--storage-options", "{not json"]) == 2


# ---------------------------------------------------------------------------- end to end
def _big_shm_segments(min_nbytes: int) -> set[str]:
    """Shared memory segments at least the state's size (other tests' small ones ignored)."""
    if not os.path.isdir("/dev/shm"):
        return set()
    return {
        e.name for e in os.scandir("/dev/shm") if e.is_file() and e.stat().st_size >= min_nbytes
    }


@pytest.mark.slow
def test_full_run_json_is_complete_and_consistent(tmp_path: Path) -> None:
    nbytes = sum(s.nbytes for s in make_specs(8 * MiB))
    shm_before = _big_shm_segments(nbytes)
    proc = run_bench("--size", "8MiB", "--json", "--dir", str(tmp_path))
    doc = json.loads(proc.stdout)
    failed = {r["method"]: r["reason"] for r in doc["rows"] if r["status"] != "ok"}
    assert proc.returncode == 0 and not failed, f"{failed} {proc.stderr[-2000:]}"

    assert doc["schema"] == "ckptsvc-bench/1"
    assert doc["config"]["nbytes"] == nbytes and doc["config"]["cold_reads"] is True
    rows = rows_by_method(doc)
    assert list(rows) == [m.name for m in bench.METHODS if m.name not in bench.OBJECT_STORE_ONLY]
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['reason']}"
        assert row["nbytes"] == nbytes
        assert 0 < row["blocking_s"] <= row["durable_s"], name
        assert row["gb_per_s"] == pytest.approx(nbytes / row["durable_s"] / 1e9)
        assert row["rss_extra_bytes"] >= 0 and row["child_rss_peak_bytes"] >= 0
        assert len(row["samples"]) == 1

    # the RSS probe sees what must be resident: memcpy's buffer, every loaded state
    for name in ("memcpy", "raw_read", "torch_load", "safetensors_load", "ckptsvc_load"):
        assert rows[name]["rss_extra_bytes"] >= 0.9 * nbytes, name
    # cold reads: the parent dropped the files from the page cache before each load
    if shutil.which("fincore"):
        for name in ("raw_read", "raw_read_direct", "torch_load", "safetensors_load", "dcp_load",
                     "ckptsvc_load"):  # fmt: skip
            assert rows[name]["extras"]["cached_before_bytes"] < nbytes // 2, name

    assert rows["raw_write"]["extras"]["fsync_s"] == pytest.approx(
        rows["raw_write"]["durable_s"] - rows["raw_write"]["blocking_s"]
    )
    for name in ("dcp_async", "ckptsvc_async", "ckptsvc_async_reserved"):
        extras = rows[name]["extras"]
        assert 0 < extras["first_blocking_s"] <= extras["first_durable_s"], name
    reserved = rows["ckptsvc_async_reserved"]["extras"]
    assert reserved["reserve_blocking_s"] > 0 and reserved["warmup_s"] > 0
    assert reserved["arena_count"] == 1 and reserved["shm_leaked_nbytes"] == 0
    assert rows["dcp_async"]["extras"]["mode"] in ("process", "thread")
    async_extras = rows["ckptsvc_async"]["extras"]
    assert async_extras["arena_nbytes"] >= nbytes  # the staging arena was seen in /dev/shm
    assert async_extras["shm_leaked_nbytes"] == 0

    targets = doc["targets"]
    names = {t["name"] for t in targets}
    assert len(targets) >= 9 and "local durable (sync save) vs best raw write" in names
    for t in targets:
        assert t["verdict"] in ("PASS", "FAIL"), t
        assert t["value"] > 0
    assert os.listdir(tmp_path) == []  # scratch data removed
    assert _big_shm_segments(nbytes) - shm_before == set()  # arenas unlinked


@pytest.mark.slow
def test_only_runs_the_needed_save_and_table_output(tmp_path: Path) -> None:
    proc = run_bench("--size", "2MiB", "--only", "raw_read,memcpy", "--dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "memcpy floor (pre-touched)" in out and "raw read floor" in out
    assert "raw write floor" not in out  # prerequisite only, not a row
    assert "targets (ratios within this run):" in out
    assert "missing ckptsvc_async" in out
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_missing_library_makes_rows_unavailable(tmp_path: Path) -> None:
    """Workers that cannot import a method's library report "unavailable", not a crash, and
    a load whose save is unavailable says so. (torch.distributed.checkpoint is blocked:
    nothing else imports it, unlike ckptsvc's own modules, which the package may export.)"""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch.distributed.checkpoint':\n"
        "            raise ImportError('blocked by test_bench')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    pythonpath = [str(site), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in pythonpath if p))
    out_path = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = run_bench("--size", "2MiB", "--only", "memcpy,dcp_async,dcp_load", "--json", str(out_path),
                     "--dir", str(scratch), env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DCP async_save" in proc.stdout  # --json PATH keeps the table on stdout
    rows = rows_by_method(json.loads(out_path.read_text()))
    assert rows["memcpy"]["status"] == "ok"
    for name in ("dcp_async", "dcp_load"):
        assert rows[name]["status"] == "unavailable", name
        assert "blocked by test_bench" in rows[name]["reason"], name
        assert rows[name]["blocking_s"] is None
    assert rows["dcp_load"]["reason"].startswith("needs dcp_save")
    assert os.listdir(scratch) == []


@pytest.mark.slow
def test_object_store_run(s3_root: Any, tmp_path: Path) -> None:
    methods = "raw_read,raw_read_objects,dcp_save,ckptsvc_load"  # and their saves first
    proc = run_bench(
        "--size", "2MiB", "--only", methods, "--json", "--dir", str(tmp_path),
        "--storage", s3_root.url, "--storage-options", json.dumps(s3_root.storage_options),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    assert doc["config"]["remote"] is True and doc["config"]["root"].startswith(s3_root.url)
    rows = rows_by_method(doc)
    assert list(rows) == ["raw_read", "raw_read_objects", "dcp_save", "ckptsvc_load"]
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['reason']}"
        assert 0 < row["blocking_s"] <= row["durable_s"]
    fs = s3_root.fs()
    fs.invalidate_cache()
    assert fs.find(s3_root.url) == []  # the bench's prefix was removed


@pytest.mark.slow
def test_plot_writes_an_svg_bar_per_method_that_ran(tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    svg = tmp_path / "bench.svg"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    proc = run_bench(
        "--size", "2MiB", "--only", "memcpy,torch_save", "--dir", str(scratch), "--plot", str(svg)
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = ET.parse(svg).getroot()
    bars = [el for el in root.iter() if el.tag.endswith("rect") and el.get("class")]
    titles = sorted(el.findtext("{http://www.w3.org/2000/svg}title") or "" for el in bars)
    # two bars (blocking, durable) for each selected row: memcpy floor and torch.save
    assert len(bars) == 4, titles
    assert any(t.startswith("torch.save: durable") for t in titles)
    assert all(float(el.get("width", "0")) > 0 for el in bars)


# ---------------------------------------------------------------------------- remote saves
def test_remote_save_targets_compare_with_the_best_s3fs_upload() -> None:
    from ckptsvc.tools.bench_remote_save import remote_save_targets

    local = [_row("raw_write", 1.0, 1.0), _row("ckptsvc_save", 1.0, 1.0)]
    assert remote_save_targets(local) == []  # no s3fs row: not a remote run
    rows = [
        _row("raw_write", 4.0, 4.0),
        _row("s3fs_put", 3.0, 3.0),
        _row("raw_write_objects", 2.0, 2.0),  # the best
        _row("ckptsvc_save", 2.1, 2.1),
        _row("ckptsvc_async", 0.2, 3.2),
    ]
    sync, write_phase = remote_save_targets(rows)
    assert sync.value == pytest.approx(2.0 / 2.1) and sync.verdict == "PASS"
    assert write_phase.value == pytest.approx(2.0 / 3.0) and write_phase.verdict == "FAIL"
    assert "raw_write_objects" in sync.note
    rows[2] = _floor_with_reps("raw_write_objects", [1.0, 3.5, 3.6])  # fastest 1.0, median 3.5
    sync, _ = remote_save_targets(rows)  # s3fs_put (3.0) is the best by median
    assert sync.value == pytest.approx(3.0 / 2.1) and "s3fs_put" in sync.note
    (missing_sync, missing_async) = remote_save_targets(rows[:3])
    assert missing_sync.verdict == missing_async.verdict == "n/a"


@pytest.mark.slow
def test_object_store_run_reports_saves_against_s3fs(s3_root: Any, tmp_path: Path) -> None:
    proc = run_bench(
        "--size", "2MiB", "--only", "s3fs_put,raw_write_objects,ckptsvc_save", "--json",
        "--dir", str(tmp_path), "--storage", s3_root.url,
        "--storage-options", json.dumps(s3_root.storage_options),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    rows = rows_by_method(doc)
    for name in ("s3fs_put", "raw_write_objects", "ckptsvc_save"):
        assert rows[name]["status"] == "ok", f"{name}: {rows[name]['reason']}"
    assert rows["raw_write_objects"]["extras"]["objects"] > 1
    targets = {t["name"]: t for t in doc["targets"]}
    assert targets["remote sync save vs best s3fs upload"]["value"] > 0


def test_remote_only_rows_are_unavailable_locally(tmp_path: Path) -> None:
    proc = run_bench("--size", "1MiB", "--only", "s3fs_put", "--json", "--dir", str(tmp_path))
    row = rows_by_method(json.loads(proc.stdout))["s3fs_put"]
    assert row["status"] == "unavailable" and "--storage" in row["reason"]


@pytest.mark.slow
def test_dcp_mode_compares_both_writers_in_one_run(tmp_path: Path) -> None:
    """``--dcp``: dcp.save / async_save / load with DCP's FileSystemWriter/Reader and with
    ckptsvc's StorageWriter/Reader, every row measured, the three ratios computed."""
    proc = run_bench("--size", "2MiB", "--dcp", "--json", "--dir", str(tmp_path), timeout_s=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    rows = rows_by_method(doc)
    assert list(rows) == [
        "dcp_save", "dcp_async", "ckptsvc_dcp_save", "ckptsvc_dcp_async", "dcp_load",
        "ckptsvc_dcp_load",
    ]  # fmt: skip
    for name, row in rows.items():
        assert row["status"] == "ok", f"{name}: {row['reason']}"
        assert row["nbytes"] == doc["config"]["nbytes"]
        assert 0 < row["blocking_s"] <= row["durable_s"], name
    for name in ("dcp_async", "ckptsvc_dcp_async"):  # the same DCP executor for both writers
        assert rows[name]["extras"]["mode"] == rows["dcp_async"]["extras"]["mode"]
        assert (
            0 < rows[name]["extras"]["first_blocking_s"] <= rows[name]["extras"]["first_durable_s"]
        )
    targets = {t["formula"]: t for t in doc["targets"]}
    for formula in (
        "ckptsvc_dcp_async.blocking / dcp_async.blocking",
        "ckptsvc_dcp_async.durable / dcp_async.durable",
        "ckptsvc_dcp_save.durable / dcp_save.durable",
    ):
        assert targets[formula]["verdict"] in ("PASS", "FAIL") and targets[formula]["value"] > 0
    assert os.listdir(tmp_path) == []  # scratch data removed
