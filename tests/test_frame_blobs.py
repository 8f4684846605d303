"""Large byte strings of save jobs are sent once per connection (protocol 7,
``workers/frame_blobs.py``): later frames name them, the receiver resolves the names, and
the two sides stay consistent while the sender drops old ones. Frames go through a real
socket pair with the writer's restricted unpickler."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest

from ckptsvc.format.safetensors_stream import plan_shard
from ckptsvc.workers.frame_blobs import MIN_BYTES, ReceivedBlobs, SentBlobs
from ckptsvc.workers.protocol import (
    FileJob,
    ProtocolError,
    SaveJob,
    SmallFile,
    WriterOptions,
    recv_message,
    send_message,
)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _job(job_id: int, *docs: bytes) -> SaveJob:
    return SaveJob(
        job_id=job_id,
        ckpt_url="file:///tmp/x",
        storage_options={},
        arena_name="",
        files=(),
        small_files=tuple(SmallFile(f"doc{i}.json", d) for i, d in enumerate(docs)),
        commit=None,
        options=WriterOptions(),
    )


def _exchange(
    pair: tuple[socket.socket, socket.socket], sent: SentBlobs, got: ReceivedBlobs, msg: object
) -> tuple[object, int]:
    """``msg`` sent on ``pair[0]`` and received on ``pair[1]``; and its frame's length."""
    box: dict[str, object] = {}

    def read() -> None:
        head = pair[1].recv(8, socket.MSG_PEEK | socket.MSG_WAITALL)
        box["nbytes"] = int.from_bytes(head, "little")
        box["msg"] = recv_message(pair[1], blobs=got)

    reader = threading.Thread(target=read)
    reader.start()
    send_message(pair[0], msg, blobs=sent)
    reader.join(60)
    nbytes = box["nbytes"]
    assert isinstance(nbytes, int)
    return box["msg"], nbytes


def test_a_byte_string_sent_before_travels_as_its_name(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sent, got = SentBlobs(), ReceivedBlobs()
    doc = b"{" + b"x" * MIN_BYTES + b"}"
    first, nbytes = _exchange(pair, sent, got, _job(1, doc, b"small"))
    assert isinstance(first, SaveJob) and first.small_files[0].data == doc
    assert nbytes > MIN_BYTES
    # equal bytes in a new object (a re-encoded document) and the same object: both named
    again = bytes(bytearray(doc))
    second, nbytes = _exchange(pair, sent, got, _job(2, again, doc))
    assert isinstance(second, SaveJob) and nbytes < 4096
    assert [f.data for f in second.small_files] == [doc, doc]
    changed = doc[:-2] + b"y}"  # same length, other bytes: sent whole
    third, nbytes = _exchange(pair, sent, got, _job(3, changed))
    assert isinstance(third, SaveJob) and third.small_files[0].data == changed
    assert nbytes > MIN_BYTES


def test_the_sender_drops_old_byte_strings_and_the_receiver_follows(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sent, got = SentBlobs(capacity_bytes=2 * MIN_BYTES), ReceivedBlobs()
    keep = b"k" * MIN_BYTES
    for i in range(6):
        doc = bytes([i]) * MIN_BYTES
        msg, _ = _exchange(pair, sent, got, _job(i, doc, keep))
        assert isinstance(msg, SaveJob)
        assert [f.data for f in msg.small_files] == [doc, keep]
        assert sent.nbytes <= 2 * MIN_BYTES
        assert got.nbytes <= 3 * MIN_BYTES  # one drop behind: it travels with the next new one


def test_a_frame_that_names_an_unknown_byte_string_is_a_protocol_error(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    sent = SentBlobs()
    doc = b"d" * MIN_BYTES
    sent.dumps(_job(1, doc))  # the peer never got this frame
    send_message(pair[0], _job(2, doc), blobs=sent)
    with pytest.raises(ProtocolError, match="never sent"):
        recv_message(pair[1], blobs=ReceivedBlobs())


def test_a_frame_with_names_needs_the_receivers_blobs(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    errors: list[BaseException] = []

    def read() -> None:
        try:
            recv_message(pair[1])
        except ProtocolError as e:
            errors.append(e)

    reader = threading.Thread(target=read)  # reads while the frame is sent (bigger than
    reader.start()  # the socket's buffer)
    send_message(pair[0], _job(1, b"d" * MIN_BYTES), blobs=SentBlobs())
    reader.join(60)
    assert len(errors) == 1


def test_file_layouts_headers_are_named_too(pair: tuple[socket.socket, socket.socket]) -> None:
    layout = plan_shard((f"t{i}", "F32", (16,)) for i in range(10_000))
    assert len(layout.header) >= MIN_BYTES
    job = _job(1)
    files = (FileJob("a.safetensors", layout, 0),)
    sent, got = SentBlobs(), ReceivedBlobs()
    first, nbytes = _exchange(pair, sent, got, replace(job, files=files))
    assert nbytes > MIN_BYTES
    second, nbytes = _exchange(pair, sent, got, replace(job, job_id=2, files=files))
    assert isinstance(first, SaveJob) and isinstance(second, SaveJob) and nbytes < 4096
    assert second.files[0].layout.header == layout.header
