"""Alembic migrations: upgrade to head matches the schema the code declares, on SQLite and
PostgreSQL, and downgrade/upgrade round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from teleread.db.engine import alembic_config, make_engine, upgrade
from teleread.db.schema import metadata


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'm.db'}"
    return request.getfixturevalue("pg_url")


def test_head_matches_declared_schema_and_round_trips(db_url: str) -> None:
    upgrade(db_url)
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []
    command.downgrade(alembic_config(db_url), "0001")
    upgrade(db_url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() == "0014"
    engine.dispose()
