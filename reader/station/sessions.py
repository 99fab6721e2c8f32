"""The station's signed-in browsers, kept server-side.

The browser holds only an opaque cookie (HttpOnly, SameSite=Strict, Secure under TLS); behind it
the station keeps the hub's session token, a CSRF token the page must echo on every state-changing
request, the claims the page holds (released when the person signs out or is signed out), and the
time of the person's last key or click. A session with no activity for ``idle_seconds`` is ended:
at the hub too, and its live worklist streams are told, so the page shows the sign-in screen.
Nothing here is written to disk: a restarted station signs everyone out.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

COOKIE = "teleread_station"
LOGIN_COOKIE = "teleread_login"


@dataclass
class BrowserSession:
    id: str
    hub_token: str
    csrf: str
    identity: dict[str, str]
    last_active: float
    hub_renewed: float
    claims: dict[str, int] = field(default_factory=dict)  # exam id -> fence
    listeners: set[asyncio.Queue[Any]] = field(default_factory=set)
    ended: str = ""  # why it ended: "signed_out", "idle"

    def tell(self, event: Any) -> None:
        for q in list(self.listeners):
            q.put_nowait(event)


class BrowserSessions:
    def __init__(self, *, idle_seconds: float, now: Callable[[], float] = time.monotonic) -> None:
        self.idle_seconds = idle_seconds
        self._now = now
        self._by_id: dict[str, BrowserSession] = {}

    def now(self) -> float:
        return self._now()

    def open(self, *, hub_token: str, identity: dict[str, str]) -> BrowserSession:
        now = self._now()
        session = BrowserSession(
            id=secrets.token_urlsafe(32),
            hub_token=hub_token,
            csrf=secrets.token_urlsafe(32),
            identity=identity,
            last_active=now,
            hub_renewed=now,
        )
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None) -> BrowserSession | None:
        """The live session of a cookie; None when there is none or it went idle (then it is ended
        by the caller through :meth:`idle`)."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None or session.ended:
            return None
        return session

    def is_idle(self, session: BrowserSession) -> bool:
        return self._now() - session.last_active >= self.idle_seconds

    def touch(self, session: BrowserSession) -> None:
        session.last_active = self._now()

    def end(self, session: BrowserSession, why: str) -> None:
        session.ended = why
        self._by_id.pop(session.id, None)
        session.tell({"type": "signed_out", "why": why})

    def idle_ones(self) -> list[BrowserSession]:
        return [s for s in self._by_id.values() if self.is_idle(s)]

    def __len__(self) -> int:
        return len(self._by_id)
