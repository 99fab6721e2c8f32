"""pytest plugin: a real S3 server (nanio) on 127.0.0.1 for the S3 object-store tests.

Owns the ``s3_server`` session fixture (one nanio process, random credentials from ``secrets``,
a free loopback port, a temporary data directory, killed by PID at the end; ``stop()`` / ``start()``
simulate an outage on the same port) and the ``s3_bucket`` fixture (a fresh bucket name per test,
its data removed afterwards). Register with ``pytest_plugins = ["fixtures_s3"]``.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator

import pytest

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _nanio_command() -> list[str]:
    script = Path(sys.executable).parent / "nanio"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nanio"]


@dataclass
class NanioServer:
    """One nanio process serving ``data_dir`` on ``HOST:port`` with the given credentials."""

    data_dir: Path
    log_path: Path
    port: int = field(default_factory=_free_port)
    access_key: str = field(default_factory=lambda: "ak" + secrets.token_hex(10))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Start nanio (same port, data and credentials as before) and wait until it answers."""
        if self.running:
            return
        env = {k: v for k, v in os.environ.items() if not k.startswith("NANIO_")}
        env.update(NANIO_ACCESS_KEY=self.access_key, NANIO_SECRET_KEY=self.secret_key)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                *_nanio_command(),
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--host",
                HOST,
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._wait_until_answering()

    def stop(self) -> None:
        """Terminate this server's process by PID (kill if it lingers) and wait for it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        if self._log is not None:
            self._log.close()
            self._log = None

    def bucket_dir(self, bucket: str) -> Path:
        """Where nanio keeps a bucket's object files (``<bucket dir>/<key>`` holds the bytes)."""
        return self.data_dir / bucket

    def pending_uploads(self, bucket: str) -> list[Path]:
        """Multipart uploads for ``bucket`` that were neither completed nor aborted."""
        root = self.data_dir / ".nanio" / "multipart"
        found = []
        for init in root.glob("*/init.json") if root.is_dir() else []:
            if json.loads(init.read_text(encoding="utf-8")).get("bucket") == bucket:
                found.append(init.parent)
        return found

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"nanio exited early; see {self.log_path}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=1.0)
                conn.request("GET", "/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nanio did not answer within {START_TIMEOUT_S} s; see {self.log_path}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NanioServer]:
    """A running nanio S3 server on 127.0.0.1 for the whole session."""
    base = tmp_path_factory.mktemp("nanio")
    server = NanioServer(data_dir=base / "data", log_path=base / "nanio.log")
    server.data_dir.mkdir()
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
