"""Settings are built once and frozen, secrets never print, command-line options override the
environment, and no module but the settings reads the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from teleread.settings import ClientSettings, Settings, build

ROOT = Path(__file__).resolve().parents[2]


def test_settings_are_frozen_and_a_changed_copy_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TELEREAD_GRPC__PORT", raising=False)
    s = Settings()
    with pytest.raises(ValidationError):
        s.grpc.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        s.data_dir = Path("/elsewhere")  # type: ignore[misc]
    copy = s.updated(grpc__port=6000, ingest__abandoned_hours=1.5)
    assert (copy.grpc.port, copy.ingest.abandoned_hours, s.grpc.port) == (6000, 1.5, 50051)
    with pytest.raises(ValidationError):
        s.updated(grpc__port="not a port")


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEREAD_GATEWAY__TOKEN", "site-token-f00d")
    monkeypatch.setenv("TELEREAD_DATABASE_URL", "postgresql://teleread:pa55word@db:5432/teleread")
    monkeypatch.setenv("TELEREAD_STORAGE__SECRET_KEY", "s3-secret-beef")
    monkeypatch.setenv("TELEREAD_TOKEN", "reader-token-cafe")
    s, c = Settings(), ClientSettings()
    shown = repr(s) + str(s) + repr(c) + str(s.model_dump()) + s.model_dump_json()
    for secret in ("site-token-f00d", "pa55word", "s3-secret-beef", "reader-token-cafe"):
        assert secret not in shown
    assert s.gateway.token.get_secret_value() == "site-token-f00d"
    assert s.resolved_database_url() == "postgresql://teleread:pa55word@db:5432/teleread"
    assert c.token.get_secret_value() == "reader-token-cafe"


def test_command_line_options_override_the_environment_and_keep_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TELEREAD_GRPC__HOST", "0.0.0.0")
    monkeypatch.setenv("TELEREAD_GRPC__PORT", "7000")
    s = build(grpc__port=7001, data_dir=None)
    assert (s.grpc.host, s.grpc.port, s.data_dir) == ("0.0.0.0", 7001, Path("./teleread-data"))


def test_no_module_but_the_settings_reads_the_environment() -> None:
    reads = re.compile(r"\bos\.environ\b|\bos\.getenv\b|\bgetenv\(")
    offenders = []
    for folder in ("gateway", "reader", "models", "teleread"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.relative_to(ROOT).as_posix() == "teleread/settings.py":
                continue
            offenders += [f"{path.relative_to(ROOT)}:{n}" for n, line in enumerate(path.read_text().splitlines(), 1)
                          if reads.search(line)]  # fmt: skip
    assert offenders == []
