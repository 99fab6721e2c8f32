"""People's sign-in: passwords hashed with argon2id, and short-lived sessions.

A person (a reader, a technician, an administrator) signs in with a user name and password and gets
a session token (``ts_`` and 32 random bytes; only its SHA-256 is stored). The token is a bearer
token like a machine's: :class:`teleread.auth.Authenticator` resolves it through
:meth:`Sessions.resolve`, so every tenancy and specialty rule holds unchanged for a person who
signed in. A session lapses ``idle`` after its last use (each use renews it, at most once per
``touch`` interval so a busy reader costs no write per call) and never lives longer than ``max_age``;
sign-out ends it at once. The web station keeps the token server-side; ``teleread login`` keeps it in
a file only its user can read.

Sign-in failures are alike for an unknown name, a wrong password, a disabled identity and one
without a password (UNAUTHENTICATED, ``BAD_CREDENTIALS``), and an unknown name costs the same
argon2 verification as a known one, so neither the answer nor its time tells which names exist.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import grpc
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Engine, and_, insert, select, update

from teleread.auth import hash_token
from teleread.clock import Clock, SystemClock
from teleread.db.engine import as_utc, reading
from teleread.db.schema import principals, sessions, sites
from teleread.errors import InvalidInput, NotFound, Unauthenticated
from teleread.messages import ts
from teleread.rpc import current_principal
from teleread.v1 import auth_pb2, auth_pb2_grpc
from teleread.vocab import Role

log = logging.getLogger("teleread.signin")

SESSION_PREFIX = "ts_"
PEOPLE = frozenset({Role.TECHNICIAN, Role.CARDIOLOGIST, Role.RADIOLOGIST, Role.ADMIN})
"""Roles a person holds: they may have a password and sign in. Site and result-puller identities
are machines and keep their tokens."""
CLIENTS = frozenset({"station", "cli", ""})
_HASHER = PasswordHasher()  # argon2id, RFC 9106's second recommended parameters (argon2-cffi's default)
# Verified when the name is unknown, so that answer takes as long as a wrong password.
_DUMMY_HASH = _HASHER.hash(secrets.token_urlsafe(16))


def _bad_credentials() -> Unauthenticated:
    return Unauthenticated("wrong user name or password", reason="BAD_CREDENTIALS")


def hash_password(password: str, *, min_length: int = 10) -> str:
    """The argon2id hash of ``password`` (PHC string), after the length rule."""
    if len(password) < min_length:
        raise InvalidInput(f"a password needs at least {min_length} characters", reason="WEAK_PASSWORD")
    if len(password) > 1024:
        raise InvalidInput("a password may have at most 1024 characters", reason="WEAK_PASSWORD")
    return _HASHER.hash(password)


def set_password(engine: Engine, *, name: str, password: str, min_length: int = 10) -> None:
    """Give the person ``name`` a (new) password; their open sessions stay open."""
    digest = hash_password(password, min_length=min_length)
    with engine.begin() as conn:
        row = conn.execute(select(principals.c.id, principals.c.role).where(principals.c.name == name)).first()
        if row is None:
            raise NotFound("no such user", reason="PRINCIPAL_NOT_FOUND")
        if Role(row.role) not in PEOPLE:
            raise InvalidInput(
                f"a {row.role} identity is a machine: it keeps its token and has no password", reason="NOT_A_PERSON"
            )
        conn.execute(update(principals).where(principals.c.id == row.id).values(password_hash=digest))


@dataclass(frozen=True)
class SessionGrant:
    token: str
    principal_id: int
    session_id: int
    expires_at: datetime


@dataclass(frozen=True)
class SessionState:
    principal_id: int
    session_id: int
    expires_at: datetime


class Sessions:
    """Sign-in, renewal, sign-out and the lookup of a session token, on the hub's database."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Clock | None = None,
        idle_seconds: int = 900,
        max_hours: float = 12.0,
        touch_seconds: float = 30.0,
    ) -> None:
        self._engine = engine
        self._clock = clock or SystemClock()
        self.idle = timedelta(seconds=idle_seconds)
        self.max_age = timedelta(hours=max_hours)
        self._touch = timedelta(seconds=min(touch_seconds, idle_seconds / 4))

    @property
    def clock(self) -> Clock:
        return self._clock

    def sign_in(self, user: str, password: str, *, client: str = "") -> SessionGrant:
        if client not in CLIENTS:
            raise InvalidInput("client must be 'station' or 'cli'", reason="BAD_CLIENT")
        if not user or len(user) > 64 or len(password) > 1024:
            _verify(_DUMMY_HASH, password[:1024])
            log.info("sign-in refused", extra={"reason": "BAD_CREDENTIALS", "known_user": False})
            raise _bad_credentials()
        with reading(self._engine) as conn:
            row = conn.execute(
                select(principals.c.id, principals.c.role, principals.c.disabled, principals.c.password_hash).where(
                    principals.c.name == user
                )
            ).first()
        if row is None or not row.password_hash:
            _verify(_DUMMY_HASH, password)
            log.info("sign-in refused", extra={"reason": "BAD_CREDENTIALS", "known_user": row is not None})
            raise _bad_credentials()
        ok = _verify(row.password_hash, password)
        if not ok or row.disabled or Role(row.role) not in PEOPLE:
            log.info("sign-in refused", extra={"reason": "BAD_CREDENTIALS", "user": user})
            raise _bad_credentials()
        if _HASHER.check_needs_rehash(row.password_hash):
            with self._engine.begin() as conn:
                conn.execute(
                    update(principals).where(principals.c.id == row.id).values(password_hash=_HASHER.hash(password))
                )
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = self._clock.now()
        expires = now + self.idle
        with self._engine.begin() as conn:
            session_id = conn.execute(
                insert(sessions)
                .values(
                    principal_id=row.id,
                    token_sha256=hash_token(token),
                    client=client,
                    created_at=now,
                    last_used_at=now,
                    expires_at=expires,
                )
                .returning(sessions.c.id)
            ).scalar_one()
        log.info("signed in", extra={"user": user, "client": client})
        return SessionGrant(token=token, principal_id=int(row.id), session_id=int(session_id), expires_at=expires)

    def resolve(self, digest: str) -> SessionState:
        """The live session with token hash ``digest``, renewed if its last renewal is older than
        the touch interval; Unauthenticated when it is unknown, ended or lapsed."""
        with reading(self._engine) as conn:
            row = conn.execute(select(sessions).where(sessions.c.token_sha256 == digest)).first()
        now = self._clock.now()
        if row is None:
            raise Unauthenticated("unknown session; sign in again", reason="BAD_TOKEN")
        expires = as_utc(row.expires_at)
        assert expires is not None
        if row.ended_at is not None or expires <= now:
            raise Unauthenticated("the session has ended or lapsed; sign in again", reason="SESSION_EXPIRED")
        last = as_utc(row.last_used_at)
        assert last is not None
        if now - last >= self._touch:
            expires = self._renew(int(row.id), as_utc(row.created_at), now)
        return SessionState(principal_id=int(row.principal_id), session_id=int(row.id), expires_at=expires)

    def renew(self, session_id: int) -> datetime:
        """Renew the session now; its new expiry."""
        with reading(self._engine) as conn:
            row = conn.execute(select(sessions).where(sessions.c.id == session_id)).first()
        now = self._clock.now()
        if row is None or row.ended_at is not None or as_utc(row.expires_at) <= now:  # type: ignore[operator]
            raise Unauthenticated("the session has ended or lapsed; sign in again", reason="SESSION_EXPIRED")
        return self._renew(session_id, as_utc(row.created_at), now)

    def _renew(self, session_id: int, created: datetime | None, now: datetime) -> datetime:
        assert created is not None
        expires = min(now + self.idle, created + self.max_age)
        with self._engine.begin() as conn:
            conn.execute(
                update(sessions)
                .where(and_(sessions.c.id == session_id, sessions.c.ended_at.is_(None)))
                .values(last_used_at=now, expires_at=expires)
            )
        return expires

    def end(self, session_id: int) -> None:
        with self._engine.begin() as conn:
            conn.execute(
                update(sessions)
                .where(and_(sessions.c.id == session_id, sessions.c.ended_at.is_(None)))
                .values(ended_at=self._clock.now())
            )

    def identity(self, principal_id: int) -> dict[str, str]:
        query = (
            select(principals, sites.c.code.label("site_code"))
            .select_from(principals.outerjoin(sites, principals.c.site_id == sites.c.id))
            .where(principals.c.id == principal_id)
        )
        with reading(self._engine) as conn:
            row = conn.execute(query).first()
        if row is None:
            raise NotFound("no such user", reason="PRINCIPAL_NOT_FOUND")
        return {
            "user": row.name,
            "role": row.role,
            "site": row.site_code or "",
            "hospital": row.hospital or "",
            "specialty": row.specialty or "",
        }


def _verify(digest: str, password: str) -> bool:
    try:
        return bool(_HASHER.verify(digest, password))
    except (VerificationError, InvalidHashError):
        return False


class AuthServicer(auth_pb2_grpc.AuthServicer):
    """``teleread.v1.Auth``: sign-in (the one call without a bearer token), renewal, sign-out."""

    def __init__(self, sessions_: Sessions, *, on_end: Callable[[int], None] | None = None) -> None:
        self._sessions = sessions_
        self._on_end = on_end  # told the id of each session signed out (the authenticator's cache)

    def _session(self, expires: datetime, identity: dict[str, str], token: str = "") -> auth_pb2.Session:
        msg = auth_pb2.Session(
            token=token, identity=auth_pb2.Identity(**identity), idle_seconds=int(self._sessions.idle.total_seconds())
        )
        stamp = ts(expires)
        if stamp is not None:
            msg.expires_at.CopyFrom(stamp)
        return msg

    def SignIn(self, request: auth_pb2.SignInRequest, context: grpc.ServicerContext) -> auth_pb2.Session:
        grant = self._sessions.sign_in(request.user, request.password, client=request.client)
        return self._session(grant.expires_at, self._sessions.identity(grant.principal_id), grant.token)

    def RenewSession(self, request: auth_pb2.RenewSessionRequest, context: grpc.ServicerContext) -> auth_pb2.Session:
        principal_id, session_id = _caller_session()
        return self._session(self._sessions.renew(session_id), self._sessions.identity(principal_id))

    def SignOut(self, request: auth_pb2.SignOutRequest, context: grpc.ServicerContext) -> auth_pb2.SignOutResponse:
        _, session_id = _caller_session()
        self._sessions.end(session_id)
        if self._on_end is not None:
            self._on_end(session_id)
        return auth_pb2.SignOutResponse()

    def WhoAmI(self, request: auth_pb2.WhoAmIRequest, context: grpc.ServicerContext) -> auth_pb2.Identity:
        return auth_pb2.Identity(**self._sessions.identity(current_principal().id))


def _caller_session() -> tuple[int, int]:
    p = current_principal()
    if p.session_id is None:
        raise InvalidInput("this call needs a session token from SignIn, not a machine token", reason="NOT_A_SESSION")
    return p.id, p.session_id
