"""Real servers on 127.0.0.1 for the tests and the benchmark: nanio (S3) and a private PostgreSQL.

Owns :class:`NanioServer` (random credentials, a free port, its own data directory; ``stop()`` /
``start()`` on the same port simulate an outage) and :class:`PgCluster` (a cluster made with
initdb and started with pg_ctl as the ``postgres`` user, on a free port). Both are stopped by
their own PIDs. No pytest here: ``fixtures_s3`` / ``fixtures_pg`` wrap them for the tests and
``bench/_backends.py`` for the benchmark.
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
from typing import IO, Any

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def free_port() -> int:
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
    port: int = field(default_factory=free_port)
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
        self.data_dir.mkdir(parents=True, exist_ok=True)
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

    def storage_settings(self, bucket: str) -> dict[str, Any]:
        """Hub storage settings (``TELEREAD_STORAGE__*``) for ``bucket`` on this server."""
        return {
            "backend": "s3",
            "endpoint": self.endpoint,
            "bucket": bucket,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }

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


def pg_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (Debian layout), if any."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(command: list[str]) -> None:
    """Run a PostgreSQL tool; a failure names the last lines it printed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"PostgreSQL command failed: {tail}")


@dataclass
class PgCluster:
    """A private PostgreSQL cluster in ``base`` on a free port. ``durable=False`` turns fsync off
    (tests); the benchmark keeps PostgreSQL's default durability."""

    base: Path
    durable: bool = True
    port: int = field(default_factory=free_port)
    bindir: Path | None = None

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}"

    def start(self) -> None:
        self.bindir = pg_bindir()
        if self.bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o777)
        data = self.base / "data"
        initdb = [str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        _run(_as_postgres(initdb if self.durable else [*initdb, "--no-sync"]))
        options = f"-p {self.port} -k {self.base} -h {HOST} -c max_connections=200"
        if not self.durable:
            options += " -c fsync=off"
        pg_ctl = str(self.bindir / "pg_ctl")
        _run(_as_postgres([pg_ctl, "-D", str(data), "-l", str(self.base / "pg.log"), "-w", "-o", options, "start"]))

    def postmaster_pid(self) -> int:
        return int((self.base / "data" / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.bindir is not None:
            subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "fast", "stop"]),
                capture_output=True,
            )
            self.bindir = None
        shutil.rmtree(self.base, ignore_errors=True)
