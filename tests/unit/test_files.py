"""The shared file plumbing (teleread/files.py): streaming SHA-256 equal to hashlib's at the block
edges, size limits as a typed error, copy-while-hashing wrappers, and atomic replacement that a
crash before the rename leaves the old file whole."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import stat
from pathlib import Path

import pytest

from teleread import files
from teleread.errors import InvalidInput
from teleread.files import (
    BLOCK_SIZE,
    Digest,
    Hasher,
    HashingReader,
    HashingWriter,
    SizeLimitExceeded,
    atomic_file,
    atomic_write_bytes,
    atomic_write_text,
    hash_file,
    hash_stream,
    sha256_hex,
)

SIZES = [0, 1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 7]


def _data(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


@pytest.mark.parametrize("size", SIZES)
def test_the_digest_is_hashlibs_at_every_block_edge(tmp_path: Path, size: int) -> None:
    data = _data(size)
    path = tmp_path / "f"
    path.write_bytes(data)
    want = Digest(hashlib.sha256(data).hexdigest(), size)
    assert hash_file(path) == want
    assert hash_stream(io.BytesIO(data)) == want
    copy = io.BytesIO()
    assert hash_stream(io.BytesIO(data), out=copy) == want and copy.getvalue() == data
    assert hash_stream(io.BytesIO(data), limit=size) == want  # exactly at the limit is fine


def test_a_stream_past_its_limit_is_a_typed_error_and_nothing_past_it_is_copied() -> None:
    data = _data(2 * BLOCK_SIZE + 10)
    copy = io.BytesIO()
    with pytest.raises(SizeLimitExceeded) as err:
        hash_stream(io.BytesIO(data), limit=BLOCK_SIZE + 5, out=copy)
    assert isinstance(err.value, InvalidInput) and err.value.reason == "SIZE_LIMIT_EXCEEDED"
    assert err.value.limit == BLOCK_SIZE + 5
    assert copy.getvalue() == data[:BLOCK_SIZE]  # the block that crossed the limit was not written
    again = pickle.loads(pickle.dumps(err.value))  # crosses a worker-process boundary intact
    assert (type(again), again.limit, again.reason) == (SizeLimitExceeded, BLOCK_SIZE + 5, "SIZE_LIMIT_EXCEEDED")


def test_a_hasher_passed_back_in_continues_the_same_digest() -> None:
    data = _data(BLOCK_SIZE + 300)
    head = io.BytesIO(data)
    hasher = Hasher()
    hasher.update(head.read(132))
    assert hash_stream(head, hasher=hasher) == Digest(hashlib.sha256(data).hexdigest(), len(data))
    with pytest.raises(SizeLimitExceeded):  # what the hasher already holds counts towards the limit
        hash_stream(io.BytesIO(data[132:]), hasher=_fed(data[:132]), limit=len(data) - 1)


def _fed(data: bytes) -> Hasher:
    hasher = Hasher()
    hasher.update(memoryview(data))
    return hasher


def test_the_writer_and_reader_hash_what_passes_through_them() -> None:
    data = _data(BLOCK_SIZE + 1)
    sink = io.BytesIO()
    writer = HashingWriter(sink)
    for at in range(0, len(data), 4096):
        writer.write(data[at : at + 4096])
    assert writer.digest() == (hashlib.sha256(data).hexdigest(), len(data)) and sink.getvalue() == data
    reader = HashingReader(io.BytesIO(data))
    got = b"".join(iter(lambda: reader.read(10_000), b""))
    assert got == data and reader.digest() == writer.digest()


def test_the_writer_refuses_a_write_past_its_limit_unwritten() -> None:
    sink = io.BytesIO()
    writer = HashingWriter(sink, limit=10)
    writer.write(b"12345678")
    with pytest.raises(SizeLimitExceeded):
        writer.write(b"abc")
    assert sink.getvalue() == b"12345678" and writer.size == 8
    reader = HashingReader(io.BytesIO(b"x" * 11), limit=10)
    with pytest.raises(SizeLimitExceeded):
        reader.read()


def test_a_partial_write_of_a_raw_file_is_finished(tmp_path: Path) -> None:
    class Trickle(io.RawIOBase):  # a raw writer that takes at most 3 bytes a call
        def __init__(self) -> None:
            self.got = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, b: object) -> int:
            chunk = bytes(memoryview(b)[:3])  # type: ignore[arg-type]
            self.got += chunk
            return len(chunk)

    raw = Trickle()
    HashingWriter(raw).write(b"0123456789")  # type: ignore[arg-type]
    assert bytes(raw.got) == b"0123456789"


def test_a_crash_before_the_rename_leaves_the_old_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "claims.json"
    path.write_bytes(b"old and whole")

    def power_cut(*_: object) -> None:
        raise OSError("power cut before the rename")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError, match="power cut"):
        atomic_write_bytes(path, b"new" * 100_000)
    with pytest.raises(OSError, match="power cut"):
        with atomic_file(path) as out:
            out.write(b"also new")
    assert path.read_bytes() == b"old and whole"
    assert [p.name for p in tmp_path.iterdir()] == ["claims.json"]  # no temporary file left


def test_an_error_inside_the_block_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(b"old")
    with pytest.raises(ValueError):
        with atomic_file(path) as out:
            out.write(b"half of the new")
            raise ValueError("the writer failed")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_an_atomic_write_replaces_with_the_mode_and_syncs_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    path = tmp_path / "sub" / "cursor"  # a missing folder is created
    atomic_write_text(path, "42\n", mode=0o600)
    assert path.read_text() == "42\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert synced == ["file", "dir"]  # the data before the rename, the rename after it
    atomic_write_text(path, "43\n")
    assert path.read_text() == "43\n" and stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_temporary_elsewhere_on_the_same_filesystem_is_renamed_into_place(tmp_path: Path) -> None:
    temp_dir = tmp_path / ".tmp"
    temp_dir.mkdir()
    target = tmp_path / "objects" / "ab"
    target.parent.mkdir()
    with atomic_file(target, mode=0o600, temp_dir=temp_dir) as out:
        out.write(b"object")
        assert [p.parent for p in temp_dir.iterdir()] == [temp_dir]  # written beside, not in place
        assert not target.exists()
    assert target.read_bytes() == b"object" and not any(temp_dir.iterdir())


def test_replace_durably_moves_and_syncs_the_target_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(files, "fsync_dir", synced.append)
    source, target = tmp_path / "a", tmp_path / "d" / "b"
    target.parent.mkdir()
    source.write_bytes(b"x")
    files.replace_durably(source, target)
    assert target.read_bytes() == b"x" and not source.exists() and synced == [target.parent]


def test_sha256_hex_of_small_values() -> None:
    assert sha256_hex("ab") == hashlib.sha256(b"ab").hexdigest() == sha256_hex(b"ab")
    assert sha256_hex("") == hashlib.sha256(b"").hexdigest()
