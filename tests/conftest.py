"""Shared fixtures: real servers for the hub's stores and a running hub on loopback.

``hub_stack`` is parametrised over the two deployments the issue names: the embedded default
(SQLite + local object directory) and PostgreSQL + the S3 server (nanio). Each gives a hub
serving gRPC on 127.0.0.1 with a free port, a clinic site with its token, a second site, and
readers of both specialties.

The suite runs on pytest-xdist workers (``-n auto --dist loadfile`` in pyproject's addopts). Each
worker is a session of its own: its own PostgreSQL databases (named with the worker id) or private
cluster, its own nanio server and buckets, its own temporary folders; hubs and receivers bind free
ports. A file's tests run on one worker, one after another (its module fixtures are made once);
the longest files start first. A test marked ``exclusive`` (the gateway fault suite: real
processes, a tmpfs, timing) runs while no other test runs. ``--dist loadfile`` rather than
``loadgroup``: with pytest 9.2, pytest-xdist 3.8's ``xdist_group`` grouping silently has no effect
(pytest-xdist issue 1386).
"""

from __future__ import annotations

import fcntl
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generator, Iterator

import grpc
import pytest

pytest_plugins = ["fixtures_s3", "fixtures_pg", "fixtures_browser"]

# Files whose tests take longest, started first (the rest keep their order) so they do not finish last.
LONGEST_FIRST = ("test_gateway_faults.py", "test_model_evaluation.py", "test_ecg_measure.py")


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    """Without pytest-xdist (``-p no:xdist``, or a virtualenv without it) the suite runs in this one
    process: pyproject's worker options are then accepted and have no effect."""
    if pluginmanager.has_plugin("xdist"):
        return
    group = parser.getgroup("xdist", "distributed testing (pytest-xdist not loaded: one process)")
    # pytest keeps lowercase short options to itself; _addoption, as pytest-xdist uses for -n, lets this one in
    group._addoption("-n", "--numprocesses", dest="numprocesses", metavar="N", help="ignored without pytest-xdist")
    group.addoption("--dist", dest="dist", default="no", help="ignored without pytest-xdist")
    group.addoption("--no-loadscope-reorder", action="store_true", help="ignored without pytest-xdist")


@contextmanager
def _turn(item: pytest.Item) -> Iterator[None]:
    """On pytest-xdist workers, a test marked ``exclusive`` runs alone: it takes a lock shared by the
    workers of this run exclusively, every other test takes it shared (file locks in the run's
    temporary folder). An exclusive test waiting for its turn holds the turnstile, so no new test
    starts meanwhile."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    run_dir = Path(item.config.option.basetemp).parent  # a worker's is <the run's temporary folder>/<worker id>
    exclusive = item.get_closest_marker("exclusive") is not None
    with open(run_dir / "turnstile.lock", "a") as turnstile, open(run_dir / "exclusive.lock", "a") as lock:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        if not exclusive:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield  # closing the files releases the locks


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outside pytest-timeout's clock: the wait is not the test's
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    with _turn(item):
        return (yield)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # on every worker alike: xdist needs one collection order
        rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@dataclass
class HubStack:
    name: str
    hub: Any
    server: grpc.Server
    port: int
    tokens: dict[str, str] = field(default_factory=dict)
    channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self, who: str) -> grpc.Channel:
        from teleread.client import open_channel

        ch = open_channel(self.address, token=self.tokens[who])
        self.channels.append(ch)
        return ch

    def close(self) -> None:
        """Close its channels, stop the server, close the hub."""
        for ch in self.channels:
            ch.close()
        self.server.stop(grace=None).wait(10)
        self.hub.close()


def running(stack: HubStack) -> Iterator[HubStack]:
    """Yield a started stack, then close it (a fixture's body)."""
    try:
        yield stack
    finally:
        stack.close()


READER_PASSWORD = "correct horse battery"


def signed_in_stack(folder: Path, users: tuple[str, ...]) -> HubStack:
    """An embedded hub whose ``users`` (principal names) sign in with :data:`READER_PASSWORD`."""
    from teleread.signin import set_password

    stack = start_stack("embedded", make_settings(folder))
    for name in users:
        set_password(stack.hub.engine, name=name, password=READER_PASSWORD)
    return stack


def make_settings(
    tmp: Path, *, database_url: str = "", s3: Any = None, bucket: str = "teleread", cpu_workers: int = 0
) -> Any:
    from teleread.settings import Settings, StorageSettings

    storage = StorageSettings()
    if s3 is not None:
        storage = StorageSettings(
            backend="s3",
            endpoint=s3.endpoint,
            bucket=bucket,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            part_size=5 * 1024 * 1024,
        )
    # cpu_workers=0 parses in the hub's threads (fast hub start-up); the PostgreSQL + S3 stack uses
    # the worker processes, as production does.
    return Settings(data_dir=tmp, database_url=database_url, storage=storage, cpu_workers=cpu_workers)


def start_stack(name: str, settings: Any) -> HubStack:
    from teleread.auth import Role, add_principal, add_site
    from teleread.app.hub import build_hub, create_server

    hub = build_hub(settings)
    add_site(hub.engine, code="clinic-a", name="Township clinic A", lead_hospital="county-hosp")
    add_site(hub.engine, code="clinic-b", name="Township clinic B", lead_hospital="county-hosp")
    add_site(hub.engine, code="clinic-x", name="Clinic of another alliance", lead_hospital="city-hosp")
    tokens = {
        "site_a": add_principal(hub.engine, name="site-clinic-a", role=Role.SITE, site_code="clinic-a"),
        "site_b": add_principal(hub.engine, name="site-clinic-b", role=Role.SITE, site_code="clinic-b"),
        "site_x": add_principal(hub.engine, name="site-clinic-x", role=Role.SITE, site_code="clinic-x"),
        "tech_a": add_principal(hub.engine, name="tech-a", role=Role.TECHNICIAN, site_code="clinic-a"),
        "cardio": add_principal(hub.engine, name="dr-heart", role=Role.CARDIOLOGIST, hospital="county-hosp"),
        "cardio2": add_principal(hub.engine, name="dr-rhythm", role=Role.CARDIOLOGIST, hospital="county-hosp"),
        "radio": add_principal(hub.engine, name="dr-lung", role=Role.RADIOLOGIST, hospital="county-hosp"),
        "cardio_city": add_principal(hub.engine, name="dr-city", role=Role.CARDIOLOGIST, hospital="city-hosp"),
        "admin": add_principal(hub.engine, name="admin-1", role=Role.ADMIN),
    }
    server, port = create_server(hub, host="127.0.0.1", port=0)
    server.start()
    return HubStack(name=name, hub=hub, server=server, port=port, tokens=tokens)


@pytest.fixture(params=["embedded", "postgres_s3"])
def hub_stack(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HubStack]:
    if request.param == "embedded":
        settings = make_settings(tmp_path)
    else:
        pg_url = request.getfixturevalue("pg_url")
        s3 = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        settings = make_settings(tmp_path, database_url=pg_url, s3=s3, bucket=bucket, cpu_workers=1)
    yield from running(start_stack(request.param, settings))


@pytest.fixture
def pg_stack(tmp_path: Path, pg_url: str) -> Iterator[HubStack]:
    """The hub on PostgreSQL only: for what SQLite cannot show (write transactions that overlap)."""
    yield from running(start_stack("postgres", make_settings(tmp_path, database_url=pg_url)))


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Any]:
    """The gateway's DICOM receiver on a free loopback port, writing into a fresh outbox."""
    from teleread.gateway.clinic.outbox import Outbox
    from teleread.gateway.clinic.scp import ScpConfig, StoreScp

    from teleread.gateway.validate import resend_kind

    box = Outbox(tmp_path / "outbox", resend_kind=resend_kind)
    server = StoreScp(box, ScpConfig(port=0)).start()
    try:
        yield server
    finally:
        server.stop()
        box.close()


@pytest.fixture
def embedded_stack(tmp_path: Path) -> Iterator[HubStack]:
    yield from running(start_stack("embedded", make_settings(tmp_path)))


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    yield
    logging.getLogger().handlers.clear()
