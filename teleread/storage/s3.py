"""S3 object store through the minio SDK: the only module of teleread that imports minio.

Owns: the minio client and its bounded urllib3 connection policy (short connect timeout, a few
retries with backoff), streamed verified uploads (the file is hashed before upload and again while
minio reads it, and the SHA-256 is stored as ``x-amz-meta-sha256``), verified downloads into a
bounded spool file, lazy bucket creation, and the mapping of minio / urllib3 errors to
:class:`~teleread.errors.StorageError`, :class:`~teleread.errors.ObjectNotFound` and
:class:`~teleread.errors.IntegrityError` (messages carry an S3 error code at most: no URLs,
credentials or server text).
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, TypeVar, cast

import certifi
import urllib3
from minio import Minio
from minio.datatypes import Object as S3Object
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from urllib3.util import Retry, Timeout

from teleread.errors import IntegrityError, ObjectNotFound, StorageError, TelereadError
from teleread.files import HashingReader, HashingWriter, SizeLimitExceeded, hash_file
from teleread.storage.local import (
    CHUNK_SIZE,
    check_content,
    check_range,
    validate_expected,
    validate_key,
    validate_range,
)

logger = logging.getLogger("teleread.storage.s3")

MIN_PART_SIZE = 5 * 1024 * 1024
MAX_PART_SIZE = 5 * 1024**3
SPOOL_MAX_MEMORY = 8 * 1024 * 1024
SHA256_META = "x-amz-meta-sha256"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
RETRIES = 3

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})
_DENIED_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "RequestTimeTooSkewed"})
_BUCKET_EXISTS_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})

_T = TypeVar("_T")


def build_http_client() -> urllib3.PoolManager:
    """The urllib3 pool minio uses: bounded timeouts, 3 retries with backoff on connection
    errors and 5xx (idempotent methods only), no retry on read errors mid-body."""
    retries = Retry(
        total=RETRIES,
        connect=RETRIES,
        read=0,
        status=RETRIES,
        other=0,
        backoff_factor=0.5,
        backoff_max=5.0,
        status_forcelist=(500, 502, 503, 504),
        raise_on_status=False,
    )
    return urllib3.PoolManager(
        timeout=Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
        retries=retries,
        maxsize=10,
        cert_reqs="CERT_REQUIRED",
        ca_certs=certifi.where(),
    )


class _VerifyingReader(HashingReader):
    """The open source file as minio reads it: hashes every byte and raises IntegrityError at the
    last expected byte if the bytes differ, so minio aborts the upload instead of completing it."""

    def __init__(self, stream: BinaryIO, *, sha256: str, size: int) -> None:
        super().__init__(stream)
        self._sha256 = sha256
        self._size = size

    def read(self, n: int = -1) -> bytes:
        data = super().read(n)
        if self.size >= self._size or not data:
            check_content(
                actual_sha256=self.hasher.hexdigest(),
                actual_size=self.size,
                sha256=self._sha256,
                size=self._size,
                what="file being uploaded",
            )
        return data


class S3ObjectStore:
    """Objects in one S3 bucket; implements :class:`teleread.storage.ObjectStore`."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str,
        secure: bool = False,
        region: str = "us-east-1",
        part_size: int = 16 * 1024 * 1024,
    ) -> None:
        if not MIN_PART_SIZE <= part_size <= MAX_PART_SIZE:
            raise ValueError("part_size must be between 5 MiB and 5 GiB")
        if not bucket:
            raise ValueError("bucket must not be empty")
        self.endpoint = endpoint
        self.bucket = bucket
        self.part_size = part_size
        self._client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=build_http_client(),
        )
        self._bucket_ready = False

    def __repr__(self) -> str:  # never the credentials
        return f"S3ObjectStore(endpoint={self.endpoint!r}, bucket={self.bucket!r})"

    # -- writes ---------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (idempotent, safe against a concurrent creator)."""
        if self._bucket_ready:
            return
        if not _call(lambda: self._client.bucket_exists(self.bucket)):
            try:
                _call(lambda: self._client.make_bucket(self.bucket))
            except StorageError as exc:
                if exc.metadata.get("s3_code") not in _BUCKET_EXISTS_CODES:
                    raise
            logger.info("object store bucket created")
        self._bucket_ready = True

    def put_file(self, key: str, path: Path, *, sha256: str, size: int, consume: bool = False) -> None:
        """Upload ``path`` under ``key`` after checking its SHA-256 and size; the upload itself is
        verified again as it streams, so a source changing underneath never lands in the bucket."""
        validate_key(key)
        validate_expected(sha256=sha256, size=size)
        try:
            actual_sha256, actual_size = hash_file(path)
        except OSError:
            raise StorageError("file to store could not be read", reason="SOURCE_UNREADABLE") from None
        check_content(
            actual_sha256=actual_sha256,
            actual_size=actual_size,
            sha256=sha256,
            size=size,
            what="file to store",
        )
        if self._holds(key, sha256=sha256, size=size):
            logger.debug("object already stored", extra={"object_id": key})
            return
        self.ensure_bucket()
        self._upload(key, path, sha256=sha256, size=size)
        logger.info("object stored", extra={"object_id": key, "bytes": size})

    def delete(self, key: str) -> None:
        """Remove the object under ``key``; an absent object (or bucket) is fine."""
        validate_key(key)
        try:
            _call(lambda: self._client.remove_object(self.bucket, key))
        except ObjectNotFound:
            return
        logger.info("object deleted", extra={"object_id": key})

    # -- reads ----------------------------------------------------------------------------------

    def exists(self, key: str) -> bool:
        try:
            self._stat(key)
        except ObjectNotFound:
            return False
        return True

    def size(self, key: str) -> int:
        """Stored size in bytes; ObjectNotFound if absent."""
        return int(self._stat(key).size or 0)

    def iter_keys(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """Every key of the bucket starting with ``prefix`` and its last modification (UTC), listed
        page by page as the caller goes; a missing bucket holds no keys. Multipart uploads not yet
        completed are not objects and are not listed."""
        if prefix:
            validate_key(prefix[:-1] if prefix.endswith("/") else prefix)
        listing = iter(self._client.list_objects(self.bucket, prefix=prefix or None, recursive=True))
        while True:
            try:
                item = _call(lambda: next(listing, None))
            except ObjectNotFound:  # NoSuchBucket: nothing was ever stored
                return
            if item is None:
                return
            if item.is_dir or not item.object_name:
                continue
            modified = item.last_modified or datetime.now(timezone.utc)  # unknown: as young as can be
            yield item.object_name, modified.astimezone(timezone.utc)

    @contextmanager
    def open_verified(self, key: str, *, sha256: str, size: int) -> Iterator[BinaryIO]:
        """Download the object into a spool file (memory up to 8 MiB, then disk) while hashing it,
        and yield the spool positioned at 0 only if SHA-256 and size match (IntegrityError)."""
        validate_key(key)
        validate_expected(sha256=sha256, size=size)
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_MEMORY, prefix="teleread-s3-")
        with spool:
            try:
                self._download_verified(key, cast(BinaryIO, spool), sha256=sha256, size=size)
            except IntegrityError as exc:
                logger.error(
                    "stored object failed verification",
                    extra={"object_id": key, "reason": exc.reason},
                )
                raise
            spool.seek(0)
            yield cast(BinaryIO, spool)

    def read_range(self, key: str, *, offset: int, length: int, sha256: str) -> bytes:
        """A ranged GET of the part, verified against its own digest."""
        validate_key(key)
        validate_range(offset=offset, length=length, sha256=sha256)
        if length == 0:
            data = b""
        else:

            def get() -> Any:
                try:
                    return self._client.get_object(self.bucket, key, offset=offset, length=length)
                except S3Error as exc:
                    if exc.code in ("InvalidRange", "InvalidArgument"):  # the object ends before the range does
                        raise IntegrityError(
                            "stored object's range size does not match", reason="SIZE_MISMATCH"
                        ) from None
                    raise

            response = _call(get)
            try:
                data = response.read(length + 1)  # one more byte than asked: a server ignoring the range is caught
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                raise _storage_error(exc) from None
            finally:
                response.close()
                response.release_conn()
        check_range(data, key=key, length=length, sha256=sha256)
        return data

    def check(self) -> None:
        """Raise StorageError unless the server answers and the bucket exists (or was created)."""
        self._bucket_ready = False
        self.ensure_bucket()

    # -- internals ------------------------------------------------------------------------------

    def _stat(self, key: str) -> S3Object:
        validate_key(key)
        return _call(lambda: self._client.stat_object(self.bucket, key))

    def _holds(self, key: str, *, sha256: str, size: int) -> bool:
        """True when the bucket already has ``key`` with the expected size and recorded SHA-256."""
        try:
            stat = self._stat(key)
        except ObjectNotFound:
            return False
        recorded = (stat.metadata or {}).get(SHA256_META)
        if stat.size == size and recorded == sha256:
            return True
        logger.warning(
            "stored object differs from its expected content; replacing it",
            extra={"object_id": key, "reason": "CHECKSUM_MISMATCH"},
        )
        return False

    def _upload(self, key: str, path: Path, *, sha256: str, size: int) -> None:
        try:
            source = open(path, "rb")
        except OSError:
            raise StorageError("file to store could not be read", reason="SOURCE_UNREADABLE") from None
        with source:
            reader = _VerifyingReader(source, sha256=sha256, size=size)
            _call(
                lambda: self._client.put_object(
                    self.bucket,
                    key,
                    cast(BinaryIO, reader),
                    length=size,
                    content_type="application/octet-stream",
                    metadata={SHA256_META: sha256},
                    part_size=self.part_size,
                    num_parallel_uploads=1,  # bounded memory: one part in flight
                )
            )

    def _download_verified(self, key: str, spool: BinaryIO, *, sha256: str, size: int) -> None:
        response = _call(lambda: self._client.get_object(self.bucket, key))
        try:
            announced = response.headers.get("content-length")
            if announced is not None and int(announced) != size:
                raise IntegrityError("stored object size does not match the expected size", reason="SIZE_MISMATCH")
            recorded = response.headers.get(SHA256_META)
            if recorded is not None and recorded != sha256:
                raise IntegrityError("stored object's recorded SHA-256 differs from the expected one")
            writer = HashingWriter(spool, limit=size)
            try:
                for chunk in response.stream(CHUNK_SIZE):
                    writer.write(chunk)
            except SizeLimitExceeded:
                raise IntegrityError(
                    "stored object size does not match the expected size", reason="SIZE_MISMATCH"
                ) from None
            check_content(
                actual_sha256=writer.hasher.hexdigest(),
                actual_size=writer.size,
                sha256=sha256,
                size=size,
                what="stored object",
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _storage_error(exc) from None
        finally:
            response.close()
            response.release_conn()


def _call(operation: Callable[[], _T]) -> _T:
    """Run one minio operation, translating its errors (and urllib3's) into ours."""
    try:
        return operation()
    except TelereadError:
        raise
    except S3Error as exc:
        raise _s3_error(exc) from None
    except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
        raise _storage_error(exc) from None


def _s3_error(exc: S3Error) -> TelereadError:
    code = str(exc.code or "Unknown")
    meta = {"s3_code": code}
    if code in _NOT_FOUND_CODES or code == "NoSuchBucket":
        return ObjectNotFound("object not found in the object store", metadata=meta)
    if code in _DENIED_CODES:
        logger.error("object store refused our credentials or signature", extra={"reason": code})
        return StorageError(
            f"object store refused the request ({code})",
            reason="STORAGE_ACCESS_DENIED",
            metadata=meta,
        )
    logger.warning("object store request failed", extra={"reason": code})
    return StorageError(f"object store request failed ({code})", reason="STORAGE_REFUSED", metadata=meta)


def _storage_error(exc: BaseException) -> StorageError:
    """A StorageError for transport failures; only the exception's type is recorded."""
    kind = type(exc).__name__
    logger.warning("object store unreachable or failed", extra={"reason": kind})
    if isinstance(exc, (ServerError, InvalidResponseError)):
        return StorageError("object store returned a server error", reason="STORAGE_SERVER_ERROR")
    if isinstance(exc, ValueError):
        return StorageError("object store client rejected the request", reason="STORAGE_REFUSED")
    return StorageError(f"object store is unreachable ({kind})", reason="STORAGE_UNAVAILABLE")
