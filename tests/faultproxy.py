"""A TCP proxy for fault tests: it sits between the gateway and the hub on loopback and cuts, stalls
and throttles the link on command, at byte offsets the test chooses.

- ``cut_after(n)``: after ``n`` more bytes upstream (gateway to hub), every open connection is reset
  (RST, as a dropped rural link or a NAT timeout looks to the sender);
- ``stall(seconds)``: nothing is forwarded either way for a while, connections stay open;
- ``throttle(bytes_per_s, seconds)``: upstream is slowed to a rate for a while;
- ``down(seconds)``: new connections are refused and open ones reset (the link is gone).

Counters tell the test how many bytes crossed and how many connections were cut.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class ProxyStats:
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    resets: int = 0


class FaultProxy:
    def __init__(self, target_port: int, *, host: str = "127.0.0.1") -> None:
        self.target = (host, target_port)
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._cut_budget: int | None = None
        self._stall_until = 0.0
        self._down_until = 0.0
        self._throttle_until = 0.0
        self._throttle_rate = 0.0
        self._closed = threading.Event()
        self._listener = socket.create_server((host, 0))
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, name="proxy-accept", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ faults

    def cut_after(self, nbytes: int) -> None:
        with self._lock:
            self._cut_budget = max(0, nbytes)
        if nbytes <= 0:
            self._reset_all()

    def stall(self, seconds: float) -> None:
        self._stall_until = time.monotonic() + seconds

    def throttle(self, bytes_per_s: float, seconds: float) -> None:
        self._throttle_rate = bytes_per_s
        self._throttle_until = time.monotonic() + seconds

    def down(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds
        self._reset_all()

    def heal(self) -> None:
        with self._lock:
            self._cut_budget = None
        self._stall_until = self._down_until = self._throttle_until = 0.0

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._reset_all()

    # ------------------------------------------------------------------ plumbing

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:  # the hub is down: the client sees a refused/reset connection
                _reset(client)
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.append((client, upstream))
                self.stats.connections += 1
            for src, dst, up in ((client, upstream, True), (upstream, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                while time.monotonic() < self._stall_until:
                    time.sleep(0.01)
                cut = False
                if up:
                    data, cut = self._spend(data)
                    if time.monotonic() < self._throttle_until and self._throttle_rate > 0:
                        time.sleep(len(data) / self._throttle_rate)
                if data:
                    dst.sendall(data)
                with self._lock:
                    if up:
                        self.stats.bytes_up += len(data)
                    else:
                        self.stats.bytes_down += len(data)
                if cut:
                    self._reset_all()
                    return
        except OSError:
            pass
        finally:
            self._drop(src, dst)

    def _spend(self, data: bytes) -> tuple[bytes, bool]:
        """Apply an armed cut: the bytes the budget still allows, and whether to reset after them."""
        with self._lock:
            if self._cut_budget is None:
                return data, False
            if len(data) < self._cut_budget:
                self._cut_budget -= len(data)
                return data, False
            head, self._cut_budget = data[: self._cut_budget], None
            return head, True

    def _drop(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            if (a, b) in self._conns:
                self._conns.remove((a, b))
            elif (b, a) in self._conns:
                self._conns.remove((b, a))
        for s in (a, b):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _reset_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            self.stats.resets += len(conns)
        for client, upstream in conns:
            _reset(client)
            _reset(upstream)


def _reset(s: socket.socket) -> None:
    """Close with RST rather than FIN: the peer sees the connection die mid-stream."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
