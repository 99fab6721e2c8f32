"""Contract tests of the ObjectStore port, one suite run against both adapters (a local directory
in tmp_path; S3 against a real nanio server on 127.0.0.1 with a fresh bucket per test), plus the
few adapter-specific behaviours (local path safety and disk-full mapping, S3 outage, multipart,
credentials) and the settings factory.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import stat
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import pytest
from pydantic import SecretStr

import teleread.storage.s3 as s3_module
from teleread.errors import IntegrityError, InvalidInput, ObjectNotFound, ResourceExhausted
from teleread.errors import StorageError
from teleread.settings import Settings, StorageSettings
from teleread.storage import ObjectStore, object_key
from teleread.storage.factory import StorageConfigError, build_object_store
from teleread.storage.local import LocalObjectStore
from teleread.storage.s3 import S3ObjectStore

if TYPE_CHECKING:  # imported by pytest as a plugin; importing it here would skip its rewrite
    from local_servers import NanioServer

# The lead registers this in tests/conftest.py; kept here so this module also runs on its own.
pytest_plugins = ["fixtures_s3"]

MIB = 1024 * 1024
PART_SIZE = 5 * MIB  # minio's minimum part size
OUTAGE_BOUND_S = 15.0


@dataclass
class StoreCase:
    """One adapter under test plus a window onto where its backend keeps the bytes."""

    store: ObjectStore
    stored_file: Callable[[str], Path]  # the backend's file holding a key's bytes
    leftovers: Callable[[], list[Path]]  # partial writes the backend still holds


def _random_bytes(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _source(tmp_path: Path, data: bytes, name: str = "source.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _key(data: bytes, tenant_id: int = 1) -> str:
    return object_key(tenant_id=tenant_id, sha256=_sha(data))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([original[0] ^ 0x01]))


def _local_case(tmp_path: Path) -> StoreCase:
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    return StoreCase(
        store=store,
        stored_file=lambda key: root / key,
        leftovers=lambda: sorted((root / ".tmp").iterdir()),
    )


def _s3_store(server: NanioServer, bucket: str, *, secret_key: str | None = None) -> S3ObjectStore:
    return S3ObjectStore(
        endpoint=server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key if secret_key is None else secret_key,
        bucket=bucket,
        part_size=PART_SIZE,
    )


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> StoreCase:
    if request.param == "local":
        return _local_case(tmp_path)
    server: NanioServer = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")

    def leftovers() -> list[Path]:
        bucket_dir = server.bucket_dir(bucket)
        temp_files = list(bucket_dir.rglob(".tmp.*")) if bucket_dir.is_dir() else []
        return sorted(server.pending_uploads(bucket) + temp_files)

    return StoreCase(
        store=_s3_store(server, bucket),
        stored_file=lambda key: server.bucket_dir(bucket) / key,
        leftovers=leftovers,
    )


def _assert_absent(case: StoreCase, key: str) -> None:
    assert not case.store.exists(key)
    assert not case.stored_file(key).exists()
    assert case.leftovers() == []
    with pytest.raises(ObjectNotFound):
        with case.store.open_verified(key, sha256=key.rsplit("/", 1)[1], size=1):
            pass


# --- contract: both adapters ------------------------------------------------------------------


def test_multipart_sized_object_round_trips(case: StoreCase, tmp_path: Path) -> None:
    data = _random_bytes(12 * MIB)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))

    assert case.store.exists(key)
    assert case.store.size(key) == len(data)
    with case.store.open_verified(key, sha256=_sha(data), size=len(data)) as handle:
        assert handle.read() == data
    assert case.stored_file(key).read_bytes() == data
    assert case.leftovers() == []


@pytest.mark.parametrize("lie", [None, "sha256", "size_minus_one"])
def test_consuming_put_stores_verified_bytes_or_nothing(case: StoreCase, tmp_path: Path, lie: str | None) -> None:
    data = _random_bytes(2 * MIB + 5)
    claimed_sha = _sha(data + b"x") if lie == "sha256" else _sha(data)
    claimed_size = len(data) - 1 if lie == "size_minus_one" else len(data)
    key = object_key(tenant_id=1, sha256=claimed_sha)
    if lie is None:
        case.store.put_file(key, _source(tmp_path, data), sha256=claimed_sha, size=claimed_size, consume=True)
        with case.store.open_verified(key, sha256=claimed_sha, size=claimed_size) as handle:
            assert handle.read() == data
        assert case.leftovers() == []
        return
    with pytest.raises(IntegrityError):
        case.store.put_file(key, _source(tmp_path, data), sha256=claimed_sha, size=claimed_size, consume=True)
    _assert_absent(case, key)


def test_empty_object_round_trips(case: StoreCase, tmp_path: Path) -> None:
    key = _key(b"")
    case.store.put_file(key, _source(tmp_path, b""), sha256=_sha(b""), size=0)
    with case.store.open_verified(key, sha256=_sha(b""), size=0) as handle:
        assert handle.read() == b""


@pytest.mark.parametrize("lie", ["sha256", "size_plus_one", "size_minus_one"])
def test_put_refuses_content_not_matching_expectation(case: StoreCase, tmp_path: Path, lie: str) -> None:
    data = _random_bytes(3 * MIB + 17)
    claimed_sha = _sha(data + b"x") if lie == "sha256" else _sha(data)
    claimed_size = {"sha256": len(data), "size_plus_one": len(data) + 1}.get(lie, len(data) - 1)
    key = object_key(tenant_id=1, sha256=claimed_sha)

    with pytest.raises(IntegrityError) as raised:
        case.store.put_file(key, _source(tmp_path, data), sha256=claimed_sha, size=claimed_size)

    assert raised.value.code == "DATA_LOSS"
    assert raised.value.reason == ("CHECKSUM_MISMATCH" if lie == "sha256" else "SIZE_MISMATCH")
    _assert_absent(case, key)


def test_reput_of_identical_content_is_a_no_op(case: StoreCase, tmp_path: Path) -> None:
    data = _random_bytes(2 * MIB)
    key = _key(data)
    source = _source(tmp_path, data)
    case.store.put_file(key, source, sha256=_sha(data), size=len(data))
    first = case.stored_file(key).stat()

    for _ in range(3):
        case.store.put_file(key, source, sha256=_sha(data), size=len(data))

    again = case.stored_file(key).stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    with case.store.open_verified(key, sha256=_sha(data), size=len(data)) as handle:
        assert handle.read() == data


def test_reput_from_a_wrong_source_fails_and_keeps_the_stored_object(case: StoreCase, tmp_path: Path) -> None:
    data = _random_bytes(MIB + 1)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    impostor = _source(tmp_path, _random_bytes(len(data), seed=8), name="impostor.bin")

    with pytest.raises(IntegrityError):
        case.store.put_file(key, impostor, sha256=_sha(data), size=len(data))

    with case.store.open_verified(key, sha256=_sha(data), size=len(data)) as handle:
        assert handle.read() == data


def test_missing_key_is_object_not_found(case: StoreCase) -> None:
    key = _key(b"never stored")
    assert not case.store.exists(key)
    with pytest.raises(ObjectNotFound):
        case.store.size(key)
    with pytest.raises(ObjectNotFound) as raised:
        with case.store.open_verified(key, sha256=_sha(b"never stored"), size=12):
            pass
    assert raised.value.code == "NOT_FOUND"


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_bit_flip_in_stored_bytes_is_never_served(case: StoreCase, tmp_path: Path, where: str) -> None:
    data = _random_bytes(3 * MIB + 5)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    offset = {"first": 0, "middle": len(data) // 2, "last": len(data) - 1}[where]
    _flip_byte(case.stored_file(key), offset)

    served = False
    with pytest.raises(IntegrityError) as raised:
        with case.store.open_verified(key, sha256=_sha(data), size=len(data)):
            served = True
    assert not served
    assert raised.value.reason == "CHECKSUM_MISMATCH"


def test_open_with_wrong_expected_size_is_refused(case: StoreCase, tmp_path: Path) -> None:
    data = _random_bytes(4096)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    with pytest.raises(IntegrityError):
        with case.store.open_verified(key, sha256=_sha(data), size=len(data) - 1):
            pytest.fail("bytes served despite a size mismatch")


def test_delete_removes_and_is_idempotent(case: StoreCase, tmp_path: Path) -> None:
    data = _random_bytes(1000)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    case.store.delete(key)
    _assert_absent(case, key)
    case.store.delete(key)  # absent is fine
    case.store.delete(_key(b"never stored"))


def test_tenants_do_not_share_objects(case: StoreCase, tmp_path: Path) -> None:
    data = _random_bytes(100)
    case.store.put_file(_key(data, 1), _source(tmp_path, data), sha256=_sha(data), size=100)
    assert case.store.exists(_key(data, 1))
    assert not case.store.exists(_key(data, 2))


def test_check_passes_on_a_healthy_store(case: StoreCase) -> None:
    case.store.check()


def _listed(store: ObjectStore, prefix: str = "") -> dict[str, datetime]:
    listed = dict(store.iter_keys(prefix))
    assert all(when.utcoffset() == timedelta(0) for when in listed.values())  # aware, UTC
    return listed


def test_iter_keys_lists_stored_keys_with_their_modification_times(case: StoreCase, tmp_path: Path) -> None:
    assert _listed(case.store) == {}  # nothing stored yet (for S3: not even a bucket)
    before = datetime.now(timezone.utc)
    stored = {}
    for tenant, size in ((1, 10), (1, 2000), (2, 30), (10, 40)):
        data = _random_bytes(size, seed=size)
        key = _key(data, tenant)
        case.store.put_file(key, _source(tmp_path, data, name=f"{tenant}-{size}.bin"), sha256=_sha(data), size=size)
        stored[key] = data
    after = datetime.now(timezone.utc)

    listed = _listed(case.store)
    assert sorted(listed) == sorted(stored)
    for when in listed.values():  # S3 keeps whole seconds
        assert before - timedelta(seconds=1) <= when <= after + timedelta(seconds=1)
    assert sorted(_listed(case.store, "t1/")) == sorted(k for k in stored if k.startswith("t1/"))  # not t10/
    assert sorted(_listed(case.store, "t2/objects/")) == [k for k in stored if k.startswith("t2/")]
    assert _listed(case.store, "t3/") == {}


def test_iter_keys_does_not_list_deleted_or_unfinished_objects(case: StoreCase, tmp_path: Path) -> None:
    kept, gone = _random_bytes(100, seed=1), _random_bytes(100, seed=2)
    for data in (kept, gone):
        case.store.put_file(_key(data), _source(tmp_path, data), sha256=_sha(data), size=len(data))
    case.store.delete(_key(gone))
    bad = _random_bytes(MIB, seed=3)
    with pytest.raises(IntegrityError):  # a put that fails leaves nothing to list
        case.store.put_file(_key(bad), _source(tmp_path, bad), sha256=_sha(bad), size=len(bad) + 1)
    assert list(_listed(case.store)) == [_key(kept)]


@pytest.mark.parametrize("prefix", ["../", "/etc/", "t1/../../", ".tmp/", "t1/.hidden"])
def test_iter_keys_refuses_unsafe_prefixes(case: StoreCase, prefix: str) -> None:
    with pytest.raises(InvalidInput):
        list(case.store.iter_keys(prefix))


UNSAFE_KEYS = [
    "../outside",
    "t1/../../outside",
    "t1/objects/..",
    "/etc/passwd",
    "",
    "t1//x",
    "t1/./x",
    "t1\\x",
    "t1/a b",
    "t1/é",
    ".tmp/x",
    "t1/.hidden",
    "t1/x\x00y",
    "x" * 1025,
]


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_unsafe_keys_are_rejected(case: StoreCase, tmp_path: Path, key: str) -> None:
    data = b"payload"
    source = _source(tmp_path, data)
    with pytest.raises(InvalidInput) as raised:
        case.store.put_file(key, source, sha256=_sha(data), size=len(data))
    assert raised.value.reason == "INVALID_OBJECT_KEY"
    for operation in (case.store.exists, case.store.size, case.store.delete):
        with pytest.raises(InvalidInput):
            operation(key)
    with pytest.raises(InvalidInput):
        with case.store.open_verified(key, sha256=_sha(data), size=len(data)):
            pass
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize(
    ("tenant_id", "sha256"),
    [
        (0, "a" * 64),
        (-3, "a" * 64),
        ("1", "a" * 64),
        (1.0, "a" * 64),
        (1, "A" * 64),
        (1, "a" * 63),
        (1, "a" * 65),
        (1, "g" * 64),
        (1, "../" + "a" * 61),
    ],
)
def test_object_key_rejects_bad_input(tenant_id: object, sha256: str) -> None:
    with pytest.raises(ValueError):
        object_key(tenant_id=tenant_id, sha256=sha256)  # type: ignore[arg-type]


def test_object_key_is_tenant_prefixed_and_content_addressed() -> None:
    digest = _sha(b"abc")
    assert object_key(tenant_id=42, sha256=digest) == f"t42/objects/{digest[:2]}/{digest}"


# --- local adapter specifics ------------------------------------------------------------------


def test_local_symlink_out_of_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    root = tmp_path / "objects"
    store = LocalObjectStore(root)
    (root / "t1").symlink_to(outside, target_is_directory=True)
    data = b"payload"
    with pytest.raises(InvalidInput):
        store.put_file(_key(data), _source(tmp_path, data), sha256=_sha(data), size=len(data))
    assert list(outside.iterdir()) == []


def test_local_disk_full_is_resource_exhausted_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = _local_case(tmp_path)
    data = _random_bytes(2 * MIB)
    key = _key(data)

    def full_disk(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(ResourceExhausted) as raised:
        case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    monkeypatch.undo()

    assert raised.value.reason == "STORAGE_FULL" and raised.value.retryable
    assert "ENOSPC" in raised.value.message
    _assert_absent(case, key)


def test_local_reput_heals_a_corrupted_object(tmp_path: Path) -> None:
    case = _local_case(tmp_path)
    data = _random_bytes(MIB + 3)
    key = _key(data)
    source = _source(tmp_path, data)
    case.store.put_file(key, source, sha256=_sha(data), size=len(data))
    _flip_byte(case.stored_file(key), 10)

    case.store.put_file(key, source, sha256=_sha(data), size=len(data))

    with case.store.open_verified(key, sha256=_sha(data), size=len(data)) as handle:
        assert handle.read() == data


def test_local_truncated_object_is_refused(tmp_path: Path) -> None:
    case = _local_case(tmp_path)
    data = _random_bytes(MIB)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    os.truncate(case.stored_file(key), len(data) // 2)
    with pytest.raises(IntegrityError) as raised:
        with case.store.open_verified(key, sha256=_sha(data), size=len(data)):
            pytest.fail("truncated bytes served")
    assert raised.value.reason == "SIZE_MISMATCH"


def test_local_listing_skips_writes_in_progress_and_links(tmp_path: Path) -> None:
    case = _local_case(tmp_path)
    data = b"listed"
    case.store.put_file(_key(data), _source(tmp_path, data), sha256=_sha(data), size=len(data))
    root = tmp_path / "objects"
    (root / ".tmp" / "put-inprogress").write_bytes(b"partial")
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not the store's")
    (root / "t1" / "objects" / "link").symlink_to(outside)
    assert list(dict(case.store.iter_keys())) == [_key(data)]


def test_local_folders_and_files_are_owner_only(tmp_path: Path) -> None:
    root = tmp_path / "data" / "objects"
    store = LocalObjectStore(root)
    data = _random_bytes(300)
    key = _key(data)
    store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    other = _random_bytes(301)
    consumed = _source(tmp_path, other, name="consumed.bin")
    os.chmod(consumed, 0o644)
    store.put_file(_key(other), consumed, sha256=_sha(other), size=len(other), consume=True)
    for stored in (root / key, root / _key(other)):
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    folder = (root / key).parent
    while folder != tmp_path:  # down to the data folder the store created
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        folder = folder.parent
    assert stat.S_IMODE((root / ".tmp").stat().st_mode) == 0o700
    os.chmod(root, 0o755)  # as an older version left it
    LocalObjectStore(root)
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_local_sweep_removes_only_stale_temp_files(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    stale = tmp_path / "objects" / ".tmp" / "put-stale"
    fresh = tmp_path / "objects" / ".tmp" / "put-fresh"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert store.sweep_temp_files(older_than_seconds=3600) == 1
    assert not stale.exists() and fresh.exists()


# --- S3 adapter specifics ---------------------------------------------------------------------


@pytest.mark.s3
def test_s3_large_object_is_uploaded_in_parts_with_its_sha256(
    s3_server: NanioServer, s3_bucket: str, tmp_path: Path
) -> None:
    store = _s3_store(s3_server, s3_bucket)
    data = _random_bytes(12 * MIB)
    key = _key(data)
    store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    sidecar = s3_server.bucket_dir(s3_bucket) / ".nanio-meta" / f"{key}.json"
    meta = json.loads(sidecar.read_text(encoding="utf-8"))
    assert meta["etag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB parts
    assert meta["user_metadata"]["x-amz-meta-sha256"] == _sha(data)


@pytest.mark.s3
def test_s3_source_changing_during_upload_never_lands(
    s3_server: NanioServer, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is verified before upload; if it changes afterwards, the streaming check aborts
    the multipart upload at its last part: no object, no pending upload."""
    store = _s3_store(s3_server, s3_bucket)
    data = _random_bytes(12 * MIB)
    key = _key(data)
    source = _source(tmp_path, data)
    real_hash_file = s3_module.hash_file

    def hash_then_tamper(path: Path) -> tuple[str, int]:
        result = real_hash_file(path)
        _flip_byte(path, len(data) - 100)
        return result

    monkeypatch.setattr(s3_module, "hash_file", hash_then_tamper)
    with pytest.raises(IntegrityError):
        store.put_file(key, source, sha256=_sha(data), size=len(data))
    assert not store.exists(key)
    assert s3_server.pending_uploads(s3_bucket) == []


@pytest.mark.s3
@pytest.mark.timeout(120)
def test_s3_outage_is_a_quick_retryable_storage_error(s3_server: NanioServer, s3_bucket: str, tmp_path: Path) -> None:
    store = _s3_store(s3_server, s3_bucket)
    data = _random_bytes(1000)
    key = _key(data)
    source = _source(tmp_path, data)
    store.put_file(key, source, sha256=_sha(data), size=len(data))
    secrets_ = (s3_server.access_key, s3_server.secret_key)

    s3_server.stop()
    try:
        for operation in _s3_operations(store, key, source, data):
            started = time.monotonic()
            with pytest.raises(StorageError) as raised:
                operation()
            assert time.monotonic() - started < OUTAGE_BOUND_S
            assert raised.value.retryable and raised.value.code == "UNAVAILABLE"
            assert not any(secret in str(raised.value) for secret in secrets_)
    finally:
        s3_server.start()

    store.check()
    with store.open_verified(key, sha256=_sha(data), size=len(data)) as handle:
        assert handle.read() == data


def _s3_operations(store: S3ObjectStore, key: str, source: Path, data: bytes) -> Iterator[Callable[[], object]]:
    other = _random_bytes(10, seed=99)
    other_source = source.with_name("other.bin")
    other_source.write_bytes(other)
    yield lambda: store.exists(key)
    yield lambda: store.put_file(_key(other), other_source, sha256=_sha(other), size=len(other))

    def read() -> None:
        with store.open_verified(key, sha256=_sha(data), size=len(data)):
            pytest.fail("bytes served during an outage")

    yield read
    yield store.check


@pytest.mark.s3
def test_s3_wrong_credentials_are_refused_without_leaking_them(s3_server: NanioServer, s3_bucket: str) -> None:
    wrong_secret = "wrong-" + "s" * 30
    store = _s3_store(s3_server, s3_bucket, secret_key=wrong_secret)
    with pytest.raises(StorageError) as raised:
        store.check()
    assert raised.value.reason == "STORAGE_ACCESS_DENIED"
    assert wrong_secret not in str(raised.value) and wrong_secret not in repr(store)


# --- factory ----------------------------------------------------------------------------------


def test_factory_defaults_to_a_local_store_under_data_dir(tmp_path: Path) -> None:
    store = build_object_store(Settings(data_dir=tmp_path))
    assert isinstance(store, LocalObjectStore)
    assert store.root == (tmp_path / "objects").resolve()


@pytest.mark.parametrize(
    ("storage", "named"),
    [
        (StorageSettings(backend="s3", endpoint="127.0.0.1:9"), "TELEREAD_STORAGE__SECRET_KEY"),
        (StorageSettings(backend="s3", access_key=SecretStr("ak")), "TELEREAD_STORAGE__ENDPOINT"),
        (
            StorageSettings(
                backend="s3",
                endpoint="http://127.0.0.1:9/path",
                access_key=SecretStr("ak"),
                secret_key=SecretStr("sk-secret-value"),
            ),
            "endpoint",
        ),
    ],
)
def test_factory_s3_misconfiguration_is_a_config_error(tmp_path: Path, storage: StorageSettings, named: str) -> None:
    with pytest.raises(StorageConfigError) as raised:
        build_object_store(Settings(data_dir=tmp_path, storage=storage))
    assert raised.value.code == "FAILED_PRECONDITION"
    assert named in raised.value.message
    assert "sk-secret-value" not in str(raised.value)


@pytest.mark.s3
def test_factory_builds_a_working_s3_store(s3_server: NanioServer, s3_bucket: str, tmp_path: Path) -> None:
    storage = StorageSettings(
        backend="s3",
        endpoint=s3_server.endpoint,
        bucket=s3_bucket,
        access_key=SecretStr(s3_server.access_key),
        secret_key=SecretStr(s3_server.secret_key),
        part_size=PART_SIZE,
    )
    store = build_object_store(Settings(data_dir=tmp_path, storage=storage))
    assert isinstance(store, S3ObjectStore)
    assert s3_server.secret_key not in repr(store)
    data = b"factory-built"
    store.put_file(_key(data), _source(tmp_path, data), sha256=_sha(data), size=len(data))
    with store.open_verified(_key(data), sha256=_sha(data), size=len(data)) as handle:
        assert handle.read() == data


def test_a_range_is_served_only_as_its_digest_says(case: StoreCase, tmp_path: Path) -> None:
    """A part of an object (a DICOM instance's pixel data) is read alone and verified by the digest
    recorded for that part: a flip inside it is never served, one outside it does not concern it."""
    data = _random_bytes(2 * MIB + 7)
    key = _key(data)
    case.store.put_file(key, _source(tmp_path, data), sha256=_sha(data), size=len(data))
    offset, length = 1000, MIB
    part = data[offset : offset + length]
    assert case.store.read_range(key, offset=offset, length=length, sha256=_sha(part)) == part
    assert case.store.read_range(key, offset=len(data), length=0, sha256=_sha(b"")) == b""

    with pytest.raises(IntegrityError) as raised:  # past the end: shorter than asked
        case.store.read_range(key, offset=len(data) - 10, length=20, sha256=_sha(data[-10:]))
    assert raised.value.reason == "SIZE_MISMATCH"
    with pytest.raises(InvalidInput):
        case.store.read_range(key, offset=-1, length=10, sha256=_sha(part))
    with pytest.raises(InvalidInput):
        case.store.read_range(key, offset=0, length=10, sha256="not a digest")
    with pytest.raises(ObjectNotFound):
        case.store.read_range(_key(b"never stored"), offset=0, length=12, sha256=_sha(b"never stored"))

    _flip_byte(case.stored_file(key), 10)  # outside the part
    assert case.store.read_range(key, offset=offset, length=length, sha256=_sha(part)) == part
    _flip_byte(case.stored_file(key), offset + length // 2)  # inside it
    with pytest.raises(IntegrityError) as raised:
        case.store.read_range(key, offset=offset, length=length, sha256=_sha(part))
    assert raised.value.reason == "CHECKSUM_MISMATCH"
