"""pytest plugin: a real S3 server (nanio) on 127.0.0.1 for the S3 object-store tests.

Owns the ``s3_server`` session fixture (one nanio process per session, so one per pytest-xdist
worker, in that worker's temporary folder; random credentials from ``secrets``,
a free loopback port, a temporary data directory, killed by PID at the end; ``stop()`` / ``start()``
simulate an outage on the same port) and the ``s3_bucket`` fixture (a fresh bucket name per test,
its data removed afterwards). Register with ``pytest_plugins = ["fixtures_s3"]``.
"""

from __future__ import annotations

import secrets
import shutil
from typing import Iterator

import pytest

from local_servers import NanioServer


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanioServer]:
    """A running nanio S3 server on 127.0.0.1 for the whole session."""
    base = tmp_path_factory.mktemp("nanio")
    server = NanioServer(data_dir=base / "data", log_path=base / "nanio.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: NanioServer) -> Iterator[str]:
    """A fresh bucket name (not yet created) for one test; its data is removed afterwards."""
    name = f"t-{secrets.token_hex(8)}"
    yield name
    if not s3_server.running:  # a test that simulated an outage failed before restarting it
        s3_server.start()
    shutil.rmtree(s3_server.bucket_dir(name), ignore_errors=True)
