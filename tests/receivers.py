"""The gateway's receiver on either engine, for the receiver tests that run on both (the
event-driven ``reactor`` and pynetdicom's stock acceptor)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.clinic.scp import ENGINES, ScpConfig, StoreScp
from teleread.gateway.validate import resend_kind

__all__ = ["ENGINES", "running_receiver"]


@contextlib.contextmanager
def running_receiver(root: Path, engine: str) -> Iterator[StoreScp]:
    """A receiver of ``engine`` on a free loopback port, writing into a fresh outbox at ``root``."""
    box = Outbox(root, resend_kind=resend_kind)
    server = StoreScp(box, ScpConfig(port=0, engine=engine)).start()
    try:
        yield server
    finally:
        server.stop()
        box.close()
