"""People sign in with a password and work with a session token: over real gRPC on loopback (the
session obeys the reader's tenancy and specialty like a machine token; wrong credentials are refused
alike; sign-out ends the token at once), the CLI's ``users add --password`` / ``login`` /
``logout``, and the session rules (idle lapse, renewal by use, maximum age) on a fake clock."""

from __future__ import annotations

import io
import json
import os
import stat
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from helpers import error_reason
from teleread.app.cli import main
from teleread.client import open_channel
from teleread.clock import FakeClock
from teleread.db.engine import make_engine, upgrade
from teleread.db.schema import sessions as sessions_table
from teleread.errors import InvalidInput, Unauthenticated
from teleread.logs import configure_logging
from teleread.signin import Sessions, hash_password, set_password
from teleread.v1 import auth_pb2, auth_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(120)
PASSWORD = "correct horse battery"


def _sign_in(stack, user: str, password: str) -> auth_pb2.Session:
    channel = open_channel(stack.address, token="")
    stack.channels.append(channel)
    return auth_pb2_grpc.AuthStub(channel).SignIn(
        auth_pb2.SignInRequest(user=user, password=password, client="station"), timeout=10
    )


def _as(stack, token: str) -> grpc.Channel:
    channel = open_channel(stack.address, token=token)
    stack.channels.append(channel)
    return channel


def test_a_signed_in_reader_works_under_the_same_rules_and_sign_out_ends_the_token(embedded_stack) -> None:
    set_password(embedded_stack.hub.engine, name="dr-heart", password=PASSWORD)
    session = _sign_in(embedded_stack, "dr-heart", PASSWORD)
    assert session.token.startswith("ts_") and session.idle_seconds == 900
    assert (session.identity.user, session.identity.role, session.identity.hospital) == (
        "dr-heart",
        "cardiologist",
        "county-hosp",
    )
    channel = _as(embedded_stack, session.token)
    who = auth_pb2_grpc.AuthStub(channel).WhoAmI(auth_pb2.WhoAmIRequest(), timeout=10)
    assert (who.user, who.specialty) == ("dr-heart", "cardiology")
    worklist = worklist_pb2_grpc.WorklistStub(channel)
    assert list(worklist.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams) == []
    renewed = auth_pb2_grpc.AuthStub(channel).RenewSession(auth_pb2.RenewSessionRequest(), timeout=10)
    assert renewed.token == "" and renewed.expires_at.ToDatetime() >= session.expires_at.ToDatetime()

    auth_pb2_grpc.AuthStub(channel).SignOut(auth_pb2.SignOutRequest(), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        worklist.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(err.value) == "SESSION_EXPIRED"


def test_a_technicians_session_cannot_read_and_a_machine_token_cannot_renew(embedded_stack) -> None:
    set_password(embedded_stack.hub.engine, name="tech-a", password=PASSWORD)
    tech = _as(embedded_stack, _sign_in(embedded_stack, "tech-a", PASSWORD).token)
    with pytest.raises(grpc.RpcError) as err:
        worklist_pb2_grpc.WorklistStub(tech).ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10)
    assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.PERMISSION_DENIED, "ROLE_DENIED")
    machine = embedded_stack.channel("cardio")
    with pytest.raises(grpc.RpcError) as err:
        auth_pb2_grpc.AuthStub(machine).RenewSession(auth_pb2.RenewSessionRequest(), timeout=10)
    assert (err.value.code(), error_reason(err.value)) == (grpc.StatusCode.INVALID_ARGUMENT, "NOT_A_SESSION")


def test_wrong_password_unknown_user_and_machines_are_refused_alike_and_never_logged(embedded_stack) -> None:
    set_password(embedded_stack.hub.engine, name="dr-heart", password=PASSWORD)
    stream = io.StringIO()
    configure_logging("INFO", stream=stream)
    answers = []
    for user, password in [
        ("dr-heart", "wrong password 123"),
        ("nobody-here", PASSWORD),
        ("site-clinic-a", PASSWORD),  # a machine identity has no password
        ("dr-rhythm", PASSWORD),  # a person without a password yet
        ("", ""),
    ]:
        with pytest.raises(grpc.RpcError) as err:
            _sign_in(embedded_stack, user, password)
        answers.append((err.value.code(), error_reason(err.value), err.value.details()))
    assert set(answers) == {(grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS", "wrong user name or password")}
    logs = stream.getvalue()
    assert "wrong password 123" not in logs and PASSWORD not in logs and "nobody-here" not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert sum(1 for line in lines if line.get("msg") == "sign-in refused") == 5


def test_passwords_are_argon2id_and_machines_have_none(tmp_path: Path) -> None:
    digest = hash_password(PASSWORD)
    assert digest.startswith("$argon2id$") and PASSWORD not in digest
    with pytest.raises(InvalidInput) as err:
        hash_password("short")
    assert err.value.reason == "WEAK_PASSWORD"
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    engine = make_engine(url)
    from teleread.auth import Role, add_principal, add_site

    add_site(engine, code="clinic-a", name="A", lead_hospital="county")
    add_principal(engine, name="site-clinic-a", role=Role.SITE, site_code="clinic-a")
    with pytest.raises(InvalidInput) as err:
        set_password(engine, name="site-clinic-a", password=PASSWORD)
    assert err.value.reason == "NOT_A_PERSON"


def _sessions(tmp_path: Path, clock: FakeClock) -> tuple[Sessions, object]:
    from teleread.auth import Role, add_principal

    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(url)
    engine = make_engine(url)
    add_principal(engine, name="dr-li", role=Role.CARDIOLOGIST, hospital="county")
    set_password(engine, name="dr-li", password=PASSWORD)
    return Sessions(engine, clock=clock, idle_seconds=900, max_hours=1.0, touch_seconds=30), engine


def test_a_session_lapses_when_idle_is_renewed_by_use_and_never_outlives_its_maximum(tmp_path: Path) -> None:
    from teleread.auth import hash_token

    clock = FakeClock()
    sessions, engine = _sessions(tmp_path, clock)
    grant = sessions.sign_in("dr-li", PASSWORD, client="cli")
    digest = hash_token(grant.token)
    assert grant.expires_at == clock.now() + timedelta(seconds=900)
    clock.advance(10)
    assert sessions.resolve(digest).expires_at == grant.expires_at  # within the touch interval: no write
    clock.advance(600)
    renewed = sessions.resolve(digest).expires_at
    assert renewed == clock.now() + timedelta(seconds=900)  # used: renewed from now
    for _ in range(3):  # used every 14 minutes: alive, until the 1 h maximum caps the expiry
        clock.advance(14 * 60)
        sessions.resolve(digest)
    with engine.connect() as conn:  # type: ignore[attr-defined]
        row = conn.execute(sessions_table.select()).one()
    assert row.expires_at.replace(tzinfo=None) == (row.created_at + timedelta(hours=1)).replace(tzinfo=None)
    clock.advance(15 * 60)
    with pytest.raises(Unauthenticated) as err:
        sessions.resolve(digest)
    assert err.value.reason == "SESSION_EXPIRED"

    idle = sessions.sign_in("dr-li", PASSWORD, client="station")
    clock.advance(900)
    with pytest.raises(Unauthenticated) as err:
        sessions.resolve(hash_token(idle.token))
    assert err.value.reason == "SESSION_EXPIRED"


def test_users_add_with_password_then_login_read_and_logout(
    embedded_stack, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("TELEREAD_SESSION_FILE", str(tmp_path / "cfg" / "session.json"))
    monkeypatch.setenv("TELEREAD_DATA_DIR", str(embedded_stack.hub.settings.data_dir))
    monkeypatch.delenv("TELEREAD_TOKEN", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    rc = main(["users", "add", "dr-new", "--role", "cardiologist", "--hospital", "county-hosp", "--password"])
    assert rc == 0 and "signs in with the password" in capsys.readouterr().out

    monkeypatch.setattr("sys.stdin", io.StringIO("not the password\n"))
    assert main(["login", "--hub", embedded_stack.address, "--user", "dr-new"]) == 1
    assert "BAD_CREDENTIALS" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["login", "--hub", embedded_stack.address, "--user", "dr-new"]) == 0
    assert "signed in as dr-new (cardiologist at county-hosp)" in capsys.readouterr().out
    saved = tmp_path / "cfg" / "session.json"
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o600
    assert json.loads(saved.read_text())["token"].startswith("ts_")

    assert main(["whoami"]) == 0  # no --token, no TELEREAD_TOKEN: the saved session
    assert json.loads(capsys.readouterr().out)["user"] == "dr-new"
    assert main(["read", "worklist"]) == 0
    capsys.readouterr()
    assert main(["logout"]) == 0 and not saved.exists()
    assert main(["whoami"]) == 2  # no token any more
    assert "teleread login" in capsys.readouterr().err
