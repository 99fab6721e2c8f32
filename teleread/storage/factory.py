"""Builds the configured object store from :class:`teleread.settings.Settings` (composition root
helper): a local directory by default, or an S3 bucket when ``storage.backend == "s3"``.

No network I/O happens here; the S3 bucket is created on first use or by ``check()``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import SecretStr

from teleread.errors import TelereadError
from teleread.settings import Settings
from teleread.storage import ObjectStore
from teleread.storage.local import LocalObjectStore
from teleread.storage.s3 import S3ObjectStore


class StorageConfigError(TelereadError):
    """The object store settings are incomplete or invalid (an operator must fix them)."""

    code: ClassVar[str] = "FAILED_PRECONDITION"
    default_reason: ClassVar[str] = "STORAGE_MISCONFIGURED"


def build_object_store(settings: Settings) -> ObjectStore:
    """The object store the settings ask for; StorageConfigError if they are incomplete."""
    if settings.storage.backend == "s3":
        return _build_s3(settings)
    return LocalObjectStore(settings.object_root())


def _build_s3(settings: Settings) -> S3ObjectStore:
    storage = settings.storage
    access_key = _secret(storage.access_key)
    secret_key = _secret(storage.secret_key)
    missing = [
        name
        for name, value in (
            ("TELEREAD_STORAGE__ENDPOINT", storage.endpoint),
            ("TELEREAD_STORAGE__BUCKET", storage.bucket),
            ("TELEREAD_STORAGE__ACCESS_KEY", access_key),
            ("TELEREAD_STORAGE__SECRET_KEY", secret_key),
        )
        if not value.strip()
    ]
    if missing:
        raise StorageConfigError(
            "S3 object storage needs these settings: " + ", ".join(missing),
            metadata={"missing": ",".join(missing)},
        )
    try:
        return S3ObjectStore(
            endpoint=storage.endpoint,
            access_key=access_key,
            secret_key=secret_key,
            bucket=storage.bucket,
            secure=storage.secure,
            region=storage.region,
            part_size=storage.part_size,
        )
    except ValueError:  # minio's endpoint check or our part-size check; text may quote settings
        raise StorageConfigError(
            "S3 object storage settings are invalid: check endpoint (host:port, no scheme), "
            "bucket and part_size (5 MiB to 5 GiB)"
        ) from None


def _secret(value: SecretStr | None) -> str:
    return value.get_secret_value() if value is not None else ""
