"""An ASGI app served by uvicorn on a thread of its own, its socket bound before :meth:`start`
returns (so a port of 0 gives the real port at once): the reading station in the demo and the
tests, and the hub's HTTP port."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable

import uvicorn


def bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class BackgroundServer:
    """``make_server`` is called on the server's own thread and event loop (an app may need that
    loop while it is built), then serves on ``sock`` until :meth:`stop`."""

    def __init__(self, sock: socket.socket, make_server: Callable[[], uvicorn.Server], *, name: str) -> None:
        self._sock = sock
        self._make = make_server
        self._name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            async def main() -> None:
                self._server = self._make()
                task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
                while not self._server.started and not task.done():
                    await asyncio.sleep(0.01)
                ready.set()
                await task

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name=self._name, daemon=True)
        self._thread.start()
        if not ready.wait(20):
            raise RuntimeError(f"the {self._name} server did not start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
