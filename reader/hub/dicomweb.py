"""The hub's DICOMweb face on its HTTP port (``TELEREAD_HTTP__PORT``), under ``/dicomweb``:
QIDO-RS for studies, a study's series and a series' instances (``reader/hub/qido.py``), with the
same identities as the gRPC API (``Authorization: Bearer`` with a machine token or a person's
session token) and the same tenancy.

Answers: ``application/dicom+json``; a refused query is 400 with the reason (``QIDO_...``), no or a
bad token 401, a role DICOMweb does not serve 403, a study the caller may not see 404 (the same as
one that does not exist). Each answer is logged with the caller, the route and how many datasets
it carried, never a query's values (they may name a patient).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from typing import Any, Callable

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from teleread.auth import Principal
from teleread.db.engine import reading
from teleread.errors import NotFound, TelereadError
from teleread.reader.hub import qido

log = logging.getLogger("teleread.dicomweb")
PREFIX = "/dicomweb"
MEDIA = "application/dicom+json"
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404}
ACCEPTED = ("application/dicom+json", "application/json", "*/*", "application/*")


def _error(exc: TelereadError) -> Response:
    status = HTTP_STATUS.get(exc.code, 500)
    body = {"reason": exc.reason, "message": str(exc) if status < 500 else "internal error"}
    headers = {"WWW-Authenticate": 'Bearer realm="teleread"'} if status == 401 else {}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _accepts(request: Request) -> bool:
    header = request.headers.get("accept", "*/*")
    return any(part.split(";")[0].strip() in ACCEPTED for part in header.split(","))


def create_app(engine: Any, authenticate: Callable[[str | None], Principal]) -> Starlette:
    """The DICOMweb routes over ``engine``'s index, callers resolved by ``authenticate``."""

    def answer(request: Request, level: str) -> Response:
        started = time.perf_counter()
        principal: Principal | None = None
        try:
            if not _accepts(request):
                return Response(status_code=406)
            principal = authenticate(request.headers.get("authorization"))
            study = request.path_params.get("study", "")
            series = request.path_params.get("series", "")
            q = qido.parse(level, list(request.query_params.multi_items()), study=study, series=series)
            base = f"{str(request.base_url).rstrip('/')}{PREFIX}"
            with reading(engine) as conn:
                if study and not qido.any_visible(conn, principal, study):
                    raise NotFound("no such study", reason="NO_STUDY")
                found = qido.search(conn, principal, q, base_url=base)
            headers = {"Warning": '299 teleread "fuzzymatching is not supported"'} if q.fuzzy else {}
            route = request.scope.get("route")
            log.info(
                "dicomweb query",
                extra={"user": principal.name, "route": getattr(route, "path", ""), "count": len(found),
                       "duration_ms": round((time.perf_counter() - started) * 1000, 1)},
            )  # fmt: skip
            return Response(json.dumps(found), media_type=MEDIA, headers=headers)
        except TelereadError as exc:
            route = request.scope.get("route")
            log.info("dicomweb refused", extra={"user": principal.name if principal else "", "reason": exc.reason,
                                                "route": getattr(route, "path", "")})  # fmt: skip
            return _error(exc)
        except Exception as exc:  # noqa: BLE001 - answered 500; the type is logged, never a value
            log.error("dicomweb failed", extra={"reason": type(exc).__name__})
            return Response(json.dumps({"reason": "INTERNAL", "message": "internal error"}), status_code=500,
                            media_type="application/json")  # fmt: skip

    def route(level: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(answer, request, level)

        return endpoint

    return Starlette(
        routes=[
            Route(f"{PREFIX}/studies", route("studies")),
            Route(f"{PREFIX}/studies/{{study}}/series", route("series")),
            Route(f"{PREFIX}/studies/{{study}}/series/{{series}}/instances", route("instances")),
        ]
    )


class DicomwebServer:
    """The hub's HTTP port on a background thread, bound before :meth:`start` returns."""

    def __init__(self, app: Starlette, *, host: str, port: int) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host = host
        self.port = int(self._sock.getsockname()[1])
        self._app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{PREFIX}"

    def start(self) -> DicomwebServer:
        ready = threading.Event()
        config = uvicorn.Config(
            self._app, access_log=False, log_config=None, lifespan="off", ws="none", timeout_graceful_shutdown=2
        )
        self._server = uvicorn.Server(config)

        def run() -> None:
            async def main() -> None:
                assert self._server is not None
                task = asyncio.create_task(self._server.serve(sockets=[self._sock]))
                while not self._server.started and not task.done():
                    await asyncio.sleep(0.01)
                ready.set()
                await task

            asyncio.run(main())

        self._thread = threading.Thread(target=run, name="dicomweb", daemon=True)
        self._thread.start()
        if not ready.wait(20):
            raise RuntimeError("the DICOMweb port did not start")
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self._sock.close()
