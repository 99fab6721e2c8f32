"""Notifications to the hooks: a critical exam's alert and its escalations leave the hub for SMS, a
pager or an enterprise chat, by an HTTP webhook and/or a command (``NotifySettings``).

A notification is a row of ``notifications``, written in the transaction of what makes it necessary
(``notify``: the exam queued critical, an escalation step fired), with a payload that names the
exam, the site, the level, the audience and the step, never the patient. Every hub process runs a
:class:`Notifier`: it takes the earliest due notification with a row lock that skips locked rows on
PostgreSQL (one process per row), delivers it while it holds the row (the webhook gets the JSON as
a POST with an ``Idempotency-Key`` header of the notification's id; the command gets it on its
standard input and must exit 0), and marks it sent in the same transaction. A failed delivery is
tried again after a doubling delay (5 s, 10 s, ... at most 5 min) up to ``max_attempts``, then the
notification is ``failed`` and logged at ERROR; with no hook configured it is ``failed`` at once
(``NO_HOOK``), so the register shows that nobody was paged. A hub that stops between a delivery and
its commit delivers it again after the restart: the hook sees the same Idempotency-Key.
"""

from __future__ import annotations

import json
import logging
import subprocess
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Connection, Engine

from teleread import lifecycle
from teleread.clock import Clock
from teleread.db.schema import notifications
from teleread.reader.hub.due_rows import RowPass, earliest_due
from teleread.settings import NotifySettings
from teleread.vocab import NotificationStatus

log = logging.getLogger("teleread.notify")
FIRST_RETRY_S, MAX_RETRY_S = 5.0, 300.0


def notify(
    conn: Connection, *, kind: str, exam_id: str, audience: str, at: datetime, step: int = 0,
    payload: Mapping[str, Any] | None = None, ref: str = "",
) -> None:  # fmt: skip
    """A notification, in the caller's transaction (once per kind, exam, step and ``ref``: what of
    the exam it is about, such as a result's id)."""
    body = {"kind": kind, "exam_id": exam_id, "audience": audience, "step": step, **dict(payload or {})}
    values = {
        "id": uuid.uuid4().hex, "kind": kind, "exam_id": exam_id, "step": step, "audience": audience,
        "payload": json.dumps(body, sort_keys=True), "attempts": 0, "next_attempt_at": at, "created_at": at,
        "ref": ref,
    }  # fmt: skip
    lifecycle.open_notification(conn, values=values)


class Notifier(RowPass):
    name = "notifier"

    def __init__(self, *, engine: Engine, clock: Clock, settings: NotifySettings) -> None:
        super().__init__(clock=clock, interval_seconds=settings.interval_seconds)
        self._engine = engine
        self._settings = settings
        self._http = httpx.Client(timeout=settings.timeout_seconds) if settings.webhook_url else None

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        if self._http is not None:
            self._http.close()

    def _one(self, at: datetime, seen: set[str]) -> int | None:
        query = earliest_due(notifications, notifications.c.next_attempt_at, at=at, passed_over=seen)
        with self._engine.begin() as conn:
            row = conn.execute(query).mappings().first()
            if row is None:
                return None
            seen.add(str(row["id"]))
            error = self._send(str(row["id"]), str(row["payload"]))
            if error is None:
                lifecycle.move_notification(conn, row["id"], NotificationStatus.SENT, values={"sent_at": at,
                                            "attempts": int(row["attempts"]) + 1})  # fmt: skip
                log.info("notification sent", extra={"kind": row["kind"], "exam_id": row["exam_id"]})
                return 1
            attempts = int(row["attempts"]) + 1
            give_up = error == "NO_HOOK" or attempts >= self._settings.max_attempts
            delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempts - 1))
            target = NotificationStatus.FAILED if give_up else NotificationStatus.PENDING
            retry = {"attempts": attempts, "last_error": error, "next_attempt_at": at + timedelta(seconds=delay)}
            lifecycle.move_notification(conn, row["id"], target, values=retry)
            level = logging.ERROR if give_up else logging.WARNING
            log.log(level, "notification not delivered", extra={"kind": row["kind"], "exam_id": row["exam_id"],
                                                                "reason": error})  # fmt: skip
            return 0

    def _send(self, notification_id: str, payload: str) -> str | None:
        """Deliver to every hook configured; None when all took it, else the first failure's reason."""
        if not self._settings.webhook_url and not self._settings.command:
            return "NO_HOOK"
        if self._http is not None:
            try:
                answer = self._http.post(self._settings.webhook_url, content=payload.encode(), headers={
                    "Content-Type": "application/json", "Idempotency-Key": notification_id})  # fmt: skip
            except httpx.HTTPError as exc:
                return f"WEBHOOK_{type(exc).__name__}"[:64]
            if answer.status_code >= 300:
                return f"WEBHOOK_HTTP_{answer.status_code}"
        if self._settings.command:
            try:
                done = subprocess.run(self._settings.command, input=payload.encode(), capture_output=True,
                                      timeout=self._settings.timeout_seconds, check=False)  # fmt: skip
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"COMMAND_{type(exc).__name__}"[:64]
            if done.returncode != 0:
                return f"COMMAND_EXIT_{done.returncode}"
        return None
