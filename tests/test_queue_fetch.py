"""``teleread read fetch``: the object's bytes replace the output file only once their SHA-256 is
checked; a mismatch or a cut stream leaves the earlier file whole and no temporary behind."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest

from teleread.errors import IntegrityError
from teleread.reader.clients import queue_client
from teleread.v1 import worklist_pb2

DATA = bytes(range(256)) * 9000  # a little over 2 MiB: several chunks


class _Stub:
    def __init__(self, chunks: list[worklist_pb2.ObjectChunk], *, cut: bool = False) -> None:
        self.chunks, self.cut = chunks, cut

    def StreamObject(self, request: Any, timeout: float) -> Iterator[worklist_pb2.ObjectChunk]:  # noqa: N802
        yield from self.chunks
        if self.cut:
            raise grpc.RpcError("the stream was cut")


def _chunks(data: bytes, sha256: str) -> list[worklist_pb2.ObjectChunk]:
    size = 1024 * 1024
    return [
        worklist_pb2.ObjectChunk(data=data[at : at + size], offset=at, sha256=sha256 if at == 0 else "", size=len(data))
        for at in range(0, len(data), size)
    ]


def _fetch(monkeypatch: pytest.MonkeyPatch, stub: _Stub, out: Path) -> int:
    monkeypatch.setattr(queue_client, "_stub", lambda channel: stub)
    args = argparse.Namespace(exam_id="e1", object_id="o1", out=out, timeout=5.0)
    return int(queue_client.fetch_command.__wrapped__(args, object()))  # type: ignore[attr-defined]


def test_a_verified_fetch_replaces_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ct.dcm"
    out.write_bytes(b"an earlier download")
    assert _fetch(monkeypatch, _Stub(_chunks(DATA, hashlib.sha256(DATA).hexdigest())), out) == 0
    assert out.read_bytes() == DATA and [p.name for p in tmp_path.iterdir()] == ["ct.dcm"]


@pytest.mark.parametrize("failure", ["wrong digest", "cut stream", "chunks out of order"])
def test_a_failed_fetch_keeps_the_earlier_file_and_leaves_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    out = tmp_path / "ct.dcm"
    out.write_bytes(b"an earlier download")
    good = _chunks(DATA, hashlib.sha256(DATA).hexdigest())
    stub = {
        "wrong digest": _Stub(_chunks(DATA, "0" * 64)),
        "cut stream": _Stub(good[:1], cut=True),
        "chunks out of order": _Stub([good[0], good[2]]),
    }[failure]
    with pytest.raises((IntegrityError, grpc.RpcError)):
        _fetch(monkeypatch, stub, out)
    assert out.read_bytes() == b"an earlier download"
    assert [p.name for p in tmp_path.iterdir()] == ["ct.dcm"]
