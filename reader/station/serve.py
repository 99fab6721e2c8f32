"""``teleread station``: run the reading station (uvicorn, one process, one event loop).

:class:`StationServer` runs it on a thread of its own for the demo, the tests and the benchmark;
:func:`serve` in the foreground for the command line.
"""

from __future__ import annotations

import argparse
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from teleread.reader.station.app import Station, create_app
from teleread.reader.station.hubclient import HubClient
from teleread.settings import StationSettings
from teleread.webserver import BackgroundServer, bound_socket

log = logging.getLogger("teleread.station")


def _config(settings: StationSettings, app: Any, sock: socket.socket | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # the station writes its own, without query strings or bodies
        log_config=None,  # the process's JSON logging stays as configured
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        lifespan="on",
        timeout_graceful_shutdown=2,
        ws="none",
    )


def build_station(settings: StationSettings, *, clock: Callable[[], float] | None = None) -> Station:
    hub = HubClient(
        settings.hub,
        ca_file=settings.hub_ca,
        client_cert=settings.hub_cert,
        client_key=settings.hub_key,
        server_name=settings.hub_server_name,
    )
    return Station(settings, hub=hub, **({"clock": clock} if clock else {}))


class StationServer:
    """The station on a background thread, bound before :meth:`start` returns."""

    def __init__(self, settings: StationSettings, *, clock: Callable[[], float] | None = None) -> None:
        sock = bound_socket(settings.host, settings.port)
        self.port = int(sock.getsockname()[1])
        self.settings = settings.model_copy(update={"port": self.port})
        self._clock = clock
        self.station: Station | None = None
        self._background = BackgroundServer(sock, self._make, name="station")

    def _make(self) -> uvicorn.Server:  # on the server's loop: the station's tasks live there
        self.station = build_station(self.settings, clock=self._clock)
        return uvicorn.Server(_config(self.settings, create_app(self.station)))

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.tls_cert else "http"
        return f"{scheme}://{self.settings.host}:{self.port}"

    def start(self) -> StationServer:
        self._background.start()
        return self

    def stop(self) -> None:
        self._background.stop()


def serve(settings: StationSettings) -> None:
    station = build_station(settings)
    scheme = "https" if settings.tls_cert else "http"
    log.info("station listening", extra={"url": f"{scheme}://{settings.host}:{settings.port}", "hub": settings.hub})
    uvicorn.Server(_config(settings, create_app(station))).run()


def cmd_station(args: argparse.Namespace) -> int:
    from teleread.logs import configure_logging
    from teleread.settings import build

    settings = build(station__host=args.host, station__port=args.port, station__hub=args.hub).station
    configure_logging("INFO")
    scheme = "https" if settings.tls_cert else "http"
    print(f"reading station on {scheme}://{settings.host}:{settings.port} (hub {settings.hub})", flush=True)
    serve(settings)
    return 0


def add_station_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("station", help="run the reading station (the readers' web process)")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default 8080)")
    p.add_argument("--hub", default=None, help="the hub's gRPC address (default 127.0.0.1:50051)")
    p.set_defaults(func=cmd_station)
