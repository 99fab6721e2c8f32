"""The backing servers of the "postgres_s3" deployment in the spine benchmark.

Owns :class:`PgCluster` (a private PostgreSQL cluster made with initdb and started with pg_ctl as
the postgres user, on a free loopback port, default durability settings, removed afterwards) and
:class:`NanioServer` (the nanio S3 server with random credentials on a free loopback port), both
stopped by their own PIDs, and the process trees whose CPU the benchmark meters.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._hubproc import HOST, START_TIMEOUT_S, STOP_TIMEOUT_S, free_port, process_tree


def _run(command: list[str]) -> None:
    """Run a PostgreSQL tool; a failure names the tool and the last lines it printed."""
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise RuntimeError(f"PostgreSQL command failed: {tail}")


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PgCluster:
    """A private PostgreSQL cluster (initdb, default durability settings) on a free port."""

    base: Path
    port: int = field(default_factory=free_port)
    bindir: Path | None = None

    def start(self) -> None:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if not found:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bindir = found[-1].parent
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o777)
        data = self.base / "data"
        _run(
            _as_postgres([str(self.bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"])
        )
        options = f"-p {self.port} -k {self.base} -h {HOST} -c max_connections=200"
        pg_ctl = str(self.bindir / "pg_ctl")
        _run(_as_postgres([pg_ctl, "-D", str(data), "-l", str(self.base / "pg.log"), "-w", "-o", options, "start"]))

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@{HOST}:{self.port}"

    def pids(self) -> list[int]:
        """The postmaster and all its children (backends, writers)."""
        postmaster = int((self.base / "data" / "postmaster.pid").read_text().split()[0])
        return process_tree(postmaster)

    def new_database(self) -> str:
        import psycopg

        name = "bench_" + secrets.token_hex(6)
        with psycopg.connect(self.server_url + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{name}"

    def stop(self) -> None:
        if self.bindir is not None:
            subprocess.run(
                _as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.base / "data"), "-m", "fast", "stop"]),
                capture_output=True,
            )
            self.bindir = None
        shutil.rmtree(self.base, ignore_errors=True)


@dataclass
class NanioServer:
    """The nanio S3 server on a free loopback port with random credentials."""

    base: Path
    port: int = field(default_factory=free_port)
    access_key: str = field(default_factory=lambda: "ak" + secrets.token_hex(10))
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        script = Path(sys.executable).parent / "nanio"
        command = [str(script)] if script.exists() else [sys.executable, "-m", "nanio"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("NANIO_")}
        env.update(NANIO_ACCESS_KEY=self.access_key, NANIO_SECRET_KEY=self.secret_key)
        with open(self.base / "nanio.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    *command,
                    "serve",
                    "--data-dir",
                    str(self.base / "data"),
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
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_until_answering()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"nanio exited early; see {self.base / 'nanio.log'}")
            try:
                with socket.create_connection((HOST, self.port), timeout=1.0):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("nanio did not answer in time")

    def pids(self) -> list[int]:
        return process_tree(self.process.pid) if self.process is not None else []

    def settings(self, bucket: str) -> dict[str, Any]:
        """Hub storage settings for ``bucket`` (the production default part size)."""
        return {
            "backend": "s3",
            "endpoint": self.endpoint,
            "bucket": bucket,
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }

    def remove_bucket(self, bucket: str) -> None:
        shutil.rmtree(self.base / "data" / bucket, ignore_errors=True)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
        shutil.rmtree(self.base, ignore_errors=True)
