"""``storage.part_buffer``: parts cut from a stream of chunks, copied or gathered as views,
and read back as botocore reads a body."""

from __future__ import annotations

import io
import os

import pytest

from ckptsvc.storage.part_buffer import PartBody, PartFiller, PartGatherer


def _cut(chunk_sizes: list[int], part_nbytes: int) -> tuple[bytes, list[bytes], list[int]]:
    data = os.urandom(sum(chunk_sizes))
    parts: list[bytes] = []
    sizes: list[int] = []

    def on_full(views: tuple[memoryview, ...], nbytes: int) -> None:
        assert sum(v.nbytes for v in views) == nbytes
        parts.append(b"".join(views))
        sizes.append(nbytes)

    gatherer = PartGatherer(part_nbytes=part_nbytes, on_full=on_full)
    view, pos = memoryview(data), 0
    for n in chunk_sizes:
        gatherer.write(view[pos : pos + n])
        pos += n
    last, fill = gatherer.take_last()
    parts.append(b"".join(last))
    sizes.append(fill)
    return data, parts, sizes


@pytest.mark.parametrize(
    ("chunk_sizes", "part_nbytes", "expect"),
    [
        ([10, 10, 10], 10, [10, 10, 10]),  # exact parts: the last stays for close
        ([25], 10, [10, 10, 5]),
        ([3, 3, 3, 3], 10, [10, 2]),
        ([0, 7, 0, 7], 5, [5, 5, 4]),
        ([], 10, [0]),
    ],
)
def test_gatherer_cuts_parts_across_chunks(
    chunk_sizes: list[int], part_nbytes: int, expect: list[int]
) -> None:
    data, parts, sizes = _cut(chunk_sizes, part_nbytes)
    assert sizes == expect
    assert b"".join(parts) == data


def test_gatherer_keeps_views_not_copies() -> None:
    source = bytearray(b"a" * 12)
    full: list[tuple[memoryview, ...]] = []
    gatherer = PartGatherer(part_nbytes=8, on_full=lambda views, _n: full.append(views))
    gatherer.write(memoryview(source))
    gatherer.write(b"tail")  # the first part is full and more bytes follow: handed over
    source[0:1] = b"Z"
    assert bytes(full[0][0][:2]) == b"Za"  # a view of the caller's memory, not a copy
    last, fill = gatherer.take_last()
    assert fill == 8 and b"".join(last) == b"aaaatail"
    assert gatherer.take_last() == ((), 0)


def test_filler_copies() -> None:
    parts: list[bytes] = []
    filler = PartFiller(take=lambda: bytearray(4), on_full=lambda b, n: parts.append(bytes(b[:n])))
    source = bytearray(b"abcdefghij")
    filler.write(memoryview(source))
    source[0:1] = b"Z"
    buf, fill = filler.take_last()
    assert parts == [b"abcd", b"efgh"] and buf is not None and bytes(buf[:fill]) == b"ij"


@pytest.mark.parametrize("sizes", [[100], [1, 99], [30, 0, 30, 40], [7] * 14 + [2]])
def test_body_reads_like_one_file(sizes: list[int]) -> None:
    data = os.urandom(sum(sizes))
    views, pos = [], 0
    for n in sizes:
        views.append(memoryview(data)[pos : pos + n])
        pos += n
    body = PartBody(views)
    assert body.read(13) == data[:13] and body.tell() == 13
    assert body.read(50) == data[13:63]
    assert body.read() == data[63:] and body.read(5) == b""
    assert body.seek(0) == 0 and body.read(-1) == data
    body.seek(-10, io.SEEK_END)
    out = bytearray(64)
    assert body.readinto(out) == 10 and bytes(out[:10]) == data[-10:]
    body.seek(5)
    body.seek(20, io.SEEK_CUR)
    assert body.read(3) == data[25:28]
    assert PartBody(memoryview(data)).read() == data  # one buffer, as before
    assert PartBody(()).read() == b""
