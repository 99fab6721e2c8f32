"""Several DICOM receiver processes behind one port, for a gateway that takes many associations at once.

One Python process receives on one core at most (the GIL). With ``receivers = N`` (N > 1) the
gateway process listens on the DICOM port itself and hands each accepted connection (its file
descriptor, over a Unix socket pair) to the receiver process that has the fewest associations open;
each receiver runs the same :class:`StoreScp`, on the configured engine (``ScpConfig.engine``), on
the connections it is given and writes into the same outbox (SQLite WAL is safe across processes;
placing a file and pruning one are serialised by SQLite write transactions, see
:meth:`Outbox._place`). A receiver dies with the gateway
(``PR_SET_PDEATHSIG``); one that dies alone is started again, and a modality whose association it
held simply retries, as after any dropped connection.

Handing connections out, rather than letting the kernel spread them (``SO_REUSEPORT`` hashes the
addresses, so four associations often land 3 + 1 on two processes), keeps the receivers evenly loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import select
import signal
import socket
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from teleread.gateway.clinic.scp import ScpConfig
from teleread.gateway.validate import resend_kind

log = logging.getLogger("teleread.gateway.clinic.scp")
PR_SET_PDEATHSIG = 1
CLOSED = b"-"  # a receiver tells the gateway that one of its associations ended


class _Receiver:
    def __init__(self, ctx: Any, root: Path, config: ScpConfig, log_level: str) -> None:
        self.chan, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.active = 0
        self.proc = ctx.Process(target=_receiver_main, args=(str(root), asdict(config), child, log_level), daemon=True)
        self.proc.start()
        child.close()


class ReceiverPool:
    """``receivers`` processes each running a :class:`StoreScp`, fed by one listening socket here."""

    def __init__(self, outbox_root: Path, config: ScpConfig, receivers: int, *, log_level: str = "INFO") -> None:
        if receivers < 2:
            raise ValueError("a pool has at least two receivers; one runs in the gateway process")
        self.root, self.config, self.count, self.log_level = Path(outbox_root), config, receivers, log_level
        self._ctx = multiprocessing.get_context("spawn")  # a clean interpreter: no threads or locks inherited
        self._listener: socket.socket | None = None
        self._receivers: list[_Receiver] = []
        self._stop_r, self._stop_w = socket.socketpair()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1]) if self._listener is not None else self.config.port

    def start(self) -> ReceiverPool:
        self._receivers = [_Receiver(self._ctx, self.root, self.config, self.log_level) for _ in range(self.count)]
        listener = socket.create_server((self.config.host, self.config.port), backlog=64, reuse_port=False)
        self._listener = listener
        self._thread = threading.Thread(target=self._serve, name="dicom-receiver-pool", daemon=True)
        self._thread.start()
        log.info(
            "DICOM receiver listening",
            extra={"ae_title": self.config.ae_title, "port": self.port, "receivers": self.count},
        )
        return self

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._stop_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for r in self._receivers:
            r.chan.close()  # the receiver sees EOF, lets its associations finish and exits
        for r in self._receivers:
            r.proc.join(timeout=15)
            if r.proc.is_alive():
                r.proc.kill()
                r.proc.join()
        self._receivers = []

    def _serve(self) -> None:
        assert self._listener is not None
        while True:
            chans = {r.chan: r for r in self._receivers}
            ready, _, _ = select.select([self._listener, self._stop_r, *chans], [], [], 1.0)
            if self._stop_r in ready:
                return
            for chan in ready:
                if chan in chans:
                    self._on_receiver_message(chans[chan])
            self._restart_dead()
            if self._listener in ready:
                try:
                    conn, _addr = self._listener.accept()
                except OSError:
                    continue
                self._hand_out(conn)

    def _on_receiver_message(self, receiver: _Receiver) -> None:
        try:
            data = receiver.chan.recv(4096)
        except OSError:
            data = b""
        if not data:  # the receiver died: restarted below
            return
        receiver.active = max(0, receiver.active - data.count(CLOSED))

    def _restart_dead(self) -> None:
        for i, r in enumerate(self._receivers):
            if not r.proc.is_alive():
                log.error("DICOM receiver process died; starting another", extra={"exit_code": r.proc.exitcode})
                r.chan.close()
                self._receivers[i] = _Receiver(self._ctx, self.root, self.config, self.log_level)

    def _hand_out(self, conn: socket.socket) -> None:
        try:
            for r in sorted(self._receivers, key=lambda r: r.active):
                try:
                    socket.send_fds(r.chan, [b"c"], [conn.fileno()])
                except OSError:
                    continue  # that receiver is gone; the next one takes it
                r.active += 1
                return
            log.error("no DICOM receiver could take an association")
        finally:
            conn.close()  # the receiver holds its own descriptor now


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _receiver_main(root: str, config: dict[str, Any], chan: socket.socket, log_level: str) -> None:
    """One receiver process: a :class:`StoreScp` serving the connections the gateway hands it."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway stops us by closing the channel
    from teleread.gateway.clinic.outbox import Outbox
    from teleread.gateway.clinic.scp import StoreScp
    from teleread.logs import configure_logging

    configure_logging(log_level)
    box = Outbox(Path(root), maintenance=False, resend_kind=resend_kind)
    send_lock = threading.Lock()

    def closed(_event: Any) -> None:
        with send_lock, contextlib.suppress(OSError):
            chan.send(CLOSED)

    scp = StoreScp(box, ScpConfig(**config), on_close=closed).start(listen=False)
    try:
        while True:
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(chan, 16, 4)
            except OSError:
                break
            if not fds:
                break  # EOF: the gateway is stopping
            for fd in fds:
                sock = socket.socket(fileno=fd)
                try:
                    peer = sock.getpeername()
                except OSError:
                    sock.close()
                    continue
                scp.accept(sock, peer)
    finally:
        scp.stop()
        box.close()
        os._exit(0)  # association threads of pynetdicom are not daemons: do not wait for a stuck peer
