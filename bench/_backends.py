"""The backing servers of the "postgres_s3" deployment in the spine benchmark.

The servers themselves are the test suite's launchers (``tests/local_servers.py``): a private
PostgreSQL cluster with PostgreSQL's default durability, and nanio with random credentials, both
on free loopback ports. This module adds what the benchmark needs on top: the process trees whose
CPU it meters, per-run databases, and clean-up of a run's bucket and folders.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import Any

from bench._hubproc import process_tree
from tests import local_servers


class PgCluster(local_servers.PgCluster):
    """A private, durable PostgreSQL cluster."""

    def __init__(self, base: Path) -> None:
        super().__init__(base=base, durable=True)

    def pids(self) -> list[int]:
        """The postmaster and all its children (backends, writers)."""
        return process_tree(self.postmaster_pid())

    def new_database(self) -> str:
        import psycopg

        name = "bench_" + secrets.token_hex(6)
        with psycopg.connect(self.server_url + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"{self.server_url}/{name}".replace("postgresql://", "postgresql+psycopg://")


class NanioServer(local_servers.NanioServer):
    """nanio with its data and log under ``base``; the folder is removed when it stops."""

    def __init__(self, base: Path) -> None:
        super().__init__(data_dir=base / "data", log_path=base / "nanio.log")
        self.base = base

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        super().start()

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process is not None else []

    def settings(self, bucket: str) -> dict[str, Any]:
        """Hub storage settings for ``bucket`` (the production default part size)."""
        return self.storage_settings(bucket)

    def remove_bucket(self, bucket: str) -> None:
        shutil.rmtree(self.bucket_dir(bucket), ignore_errors=True)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.base, ignore_errors=True)
