"""pytest plugin: a real PostgreSQL server (Debian's packages) for the database tests.

If ``TELEREAD_TEST_PG_URL`` is set (``postgresql://user:password@host:port``, no database; .ci/run
sets it to the Debian cluster it starts), that server is used. Otherwise a private cluster
(``local_servers.PgCluster``, fsync off) is started on a free loopback port and stopped at the
end. Each test gets a fresh database, named with the pytest-xdist worker id (``t_gw0_...``; ``t_main_...``
in a run without workers) so that workers sharing one server never collide; a worker drops the
databases it made at the end of its session. Each worker starts its own private cluster.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from local_servers import PgCluster, pg_bindir

WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")


class PgDatabases:
    """Fresh databases on one server, dropped again at the end."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.created: list[str] = []

    def new_database(self) -> str:
        import psycopg

        name = f"t_{WORKER}_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.base_url + "/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        return f"{self.base_url}/{name}".replace("postgresql://", "postgresql+psycopg://")

    def drop_created(self) -> None:
        import psycopg

        with psycopg.connect(self.base_url + "/postgres", autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgDatabases]:
    url = os.environ.get("TELEREAD_TEST_PG_URL")
    if url:
        databases = PgDatabases(url.rstrip("/"))  # server URL without a database name
        yield databases
        databases.drop_created()
        return
    if pg_bindir() is None:
        # No skip: the PostgreSQL half of the suite is part of what must pass.
        pytest.fail("PostgreSQL server binaries are missing: run scripts/test.sh, which installs them")
    cluster = PgCluster(Path(tempfile.mkdtemp(prefix=f"teleread-pg-{WORKER}-")), durable=False)
    cluster.start()
    try:
        yield PgDatabases(cluster.server_url)
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgDatabases) -> str:
    return pg_cluster.new_database()
