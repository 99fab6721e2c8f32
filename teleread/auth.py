"""Identity: sites and users, their tokens, and the access rules every RPC goes through.

Machine tokens (``tr_``) are random 32-byte secrets issued by the hub's CLI; people sign in with a
password and get a session token (``ts_``, :mod:`teleread.signin`). Only SHA-256 hashes of either
are stored, and both resolve here to the same :class:`Principal`, so every rule below holds alike
for a gateway, a command-line client and the web station. A principal has one role; technicians
and result pullers are bound to a site, readers to a lead hospital and a specialty. The checks here
are the one choke point the servicers call (deny by default).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, insert, select

from teleread.db.engine import reading, utcnow
from teleread.db.schema import principals, sites
from teleread.errors import AlreadyExists, InvalidInput, NotFound, PermissionDenied, Unauthenticated
from teleread.vocab import Role

if TYPE_CHECKING:
    from teleread.signin import Sessions

READER_SPECIALTY = {Role.CARDIOLOGIST: "cardiology", Role.RADIOLOGIST: "radiology"}
UPLOAD_ROLES = frozenset({Role.SITE, Role.TECHNICIAN})
RESULT_ROLES = frozenset({Role.SITE, Role.RESULT_PULLER, Role.TECHNICIAN})
_CODE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


@dataclass(frozen=True)
class Principal:
    id: int
    name: str
    role: Role
    site_id: int | None
    site_code: str | None
    hospital: str | None
    specialty: str | None
    session_id: int | None = None  # set when the caller presented a session token (signed in)

    @property
    def is_reader(self) -> bool:
        return self.role in READER_SPECIALTY


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_code(value: str, *, field: str) -> str:
    if not _CODE.match(value):
        raise InvalidInput(f"{field} must be 1-32 characters of a-z, 0-9 and '-'", reason="BAD_IDENTIFIER")
    return value


def add_site(engine: Engine, *, code: str, name: str, lead_hospital: str) -> int:
    check_code(code, field="site code")
    check_code(lead_hospital, field="lead hospital code")
    with engine.begin() as conn:
        if conn.execute(select(sites.c.id).where(sites.c.code == code)).first():
            raise AlreadyExists("site already exists", reason="SITE_EXISTS")
        site_id = conn.execute(
            insert(sites)
            .values(code=code, name=name, lead_hospital=lead_hospital, result_seq=0, created_at=utcnow())
            .returning(sites.c.id)
        ).scalar_one()
        return int(site_id)


def add_principal(
    engine: Engine,
    *,
    name: str,
    role: Role,
    site_code: str | None = None,
    hospital: str | None = None,
    password_hash: str | None = None,
) -> str:
    """Create a principal and return its token (shown once; only its hash is kept);
    ``password_hash`` (:func:`teleread.signin.hash_password`) lets a person sign in."""
    check_code(name, field="name")
    site_id = None
    if role in (Role.SITE, Role.TECHNICIAN, Role.RESULT_PULLER):
        if not site_code:
            raise InvalidInput(f"a {role.value} needs --site", reason="SITE_REQUIRED")
        with reading(engine) as conn:
            row = conn.execute(select(sites.c.id).where(sites.c.code == site_code)).first()
        if row is None:
            raise NotFound("no such site", reason="SITE_NOT_FOUND")
        site_id = int(row.id)
    if role in READER_SPECIALTY:
        if not hospital:
            raise InvalidInput("a reader needs --hospital", reason="HOSPITAL_REQUIRED")
        check_code(hospital, field="hospital code")
    token = "tr_" + secrets.token_urlsafe(32)
    with engine.begin() as conn:
        if conn.execute(select(principals.c.id).where(principals.c.name == name)).first():
            raise AlreadyExists("a principal with that name exists", reason="PRINCIPAL_EXISTS")
        conn.execute(
            insert(principals).values(
                name=name,
                role=role.value,
                site_id=site_id,
                hospital=hospital if role in READER_SPECIALTY else None,
                specialty=READER_SPECIALTY.get(role),
                token_sha256=hash_token(token),
                disabled=False,
                created_at=utcnow(),
                password_hash=password_hash,
            )
        )
    return token


class Authenticator:
    """Resolves bearer tokens to principals, with a short cache (tokens are checked per call): a
    machine token by its hash, a session token (``ts_``) through :class:`Sessions`, which also
    renews it. A session signed out on this process is forgotten at once; on another hub process
    sharing the database within ``cache_seconds``."""

    def __init__(self, engine: Engine, *, cache_seconds: float = 5.0, sessions: Sessions | None = None) -> None:
        self._engine = engine
        self._cache: dict[str, tuple[float, Principal]] = {}
        self._ttl = cache_seconds
        self._lock = threading.Lock()
        self._sessions = sessions

    def forget_session(self, session_id: int) -> None:
        with self._lock:
            for digest in [d for d, (_, p) in self._cache.items() if p.session_id == session_id]:
                del self._cache[digest]

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise Unauthenticated("missing bearer token", reason="NO_TOKEN")
        digest = hash_token(authorization[len("Bearer ") :].strip())
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit and hit[0] > now:
                return hit[1]
        token = authorization[len("Bearer ") :].strip()
        if token.startswith("ts_"):
            if self._sessions is None:
                raise Unauthenticated("this hub takes no session tokens", reason="BAD_TOKEN")
            session = self._sessions.resolve(digest)
            principal = self._load(principals.c.id == session.principal_id, session_id=session.session_id)
        else:
            principal = self._load(principals.c.token_sha256 == digest)
        with self._lock:
            self._cache[digest] = (now + self._ttl, principal)
        return principal

    def _load(self, which: Any, *, session_id: int | None = None) -> Principal:
        query = (
            select(principals, sites.c.code.label("site_code"))
            .select_from(principals.outerjoin(sites, principals.c.site_id == sites.c.id))
            .where(which)
        )
        with reading(self._engine) as conn:
            row = conn.execute(query).first()
        if row is None or row.disabled:
            raise Unauthenticated("unknown or disabled token", reason="BAD_TOKEN")
        return Principal(
            id=int(row.id),
            name=row.name,
            role=Role(row.role),
            site_id=row.site_id,
            site_code=row.site_code,
            hospital=row.hospital,
            specialty=row.specialty,
            session_id=session_id,
        )


def require_uploader(p: Principal) -> int:
    if p.role not in UPLOAD_ROLES or p.site_id is None:
        raise PermissionDenied("this identity may not upload", reason="ROLE_DENIED")
    return p.site_id


def require_result_reader(p: Principal) -> int:
    if p.role not in RESULT_ROLES or p.site_id is None:
        raise PermissionDenied("this identity may not read results", reason="ROLE_DENIED")
    return p.site_id


def require_reader(p: Principal) -> tuple[str, str]:
    """(hospital, specialty) of a reader; everyone else is denied."""
    if not p.is_reader or not p.hospital or not p.specialty:
        raise PermissionDenied("only cardiologists and radiologists read", reason="ROLE_DENIED")
    return p.hospital, p.specialty
