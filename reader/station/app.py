"""The reading station: the web process readers work from, between their browser and the hub.

It serves one page (``static/``: plain ES modules, no build step, nothing from a CDN) and a JSON
API under ``/api``; every API call becomes a gRPC call to the hub made with the signed-in person's
session token (:mod:`reader.station.hubclient`), so the hub decides what the reader may see and
do. The live worklist is the hub's Watch stream, forwarded to the page as server-sent events.

Security: the session cookie is HttpOnly and SameSite=Strict (and Secure under TLS); every
state-changing request must carry the session's CSRF token in ``X-CSRF-Token`` and come from this
origin; responses carry a strict Content-Security-Policy; API answers are never cached. The access
log records method, route, status and duration only: no query string, no body, no patient data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from teleread.logs import log_context
from teleread.reader.station import dicomweb, ecg, statements
from teleread.reader.station.dicomweb import DicomwebProxy
from teleread.reader.station.viewer import Viewer
from teleread.reader.station.hubclient import HubClient, HubError, as_dict
from teleread.reader.station.sessions import COOKIE, LOGIN_COOKIE, BrowserSession, BrowserSessions
from teleread.settings import StationSettings
from teleread.v1 import worklist_pb2

log = logging.getLogger("teleread.station")
access = logging.getLogger("teleread.station.access")
STATIC = resources.files("teleread.reader.station") / "static"
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; media-src 'self' data:; object-src 'none'; frame-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
HUB_RENEW_SECONDS = 60.0  # the hub session is renewed at most this often while the person works
SWEEP_SECONDS = 5.0


def _error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "message": message}}, status_code=status)


def load_templates() -> list[dict[str, Any]]:
    """The report templates (``templates.toml``): per exam kind, with text, impression and whether
    the finding is critical by default."""
    data = tomllib.loads((resources.files("teleread.reader.station") / "templates.toml").read_text("utf-8"))
    return list(data["template"])


class Station:
    """What the routes share: the settings, the hub client, the browser sessions."""

    def __init__(
        self, settings: StationSettings, *, hub: HubClient, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.hub = hub
        self.sessions = BrowserSessions(idle_seconds=settings.idle_minutes * 60, now=clock)
        self.secure = settings.tls_cert is not None
        self.templates = load_templates()
        self.sweep_seconds = SWEEP_SECONDS  # how often idle sessions are looked for
        self._sweeper: asyncio.Task[None] | None = None
        self.dicomweb = DicomwebProxy(settings.hub_http)
        self.viewer = Viewer(settings.viewer_dist)

    # ---- sessions ----------------------------------------------------------------------------
    def session_of(self, request: Request) -> BrowserSession | None:
        return self.sessions.get(request.cookies.get(COOKIE))

    async def end(self, session: BrowserSession, why: str) -> None:
        """Sign out at the hub (releasing the claims the page held first), then forget it."""
        self.sessions.end(session, why)
        for exam_id, fence in list(session.claims.items()):
            with contextlib.suppress(HubError):
                await self.hub.release(session.hub_token, exam_id, fence)
        with contextlib.suppress(HubError):
            await self.hub.sign_out(session.hub_token)
        log.info("station sign-out", extra={"user": session.identity.get("user", ""), "why": why})

    async def active(self, session: BrowserSession) -> None:
        """The person did something: the idle clock restarts, the hub session is renewed now and then."""
        self.sessions.touch(session)
        if self.sessions.now() - session.hub_renewed >= HUB_RENEW_SECONDS:
            session.hub_renewed = self.sessions.now()
            await self.hub.renew_session(session.hub_token)

    async def sweep(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_seconds)
            for session in self.sessions.idle_ones():
                await self.end(session, "idle")

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self.sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.hub.close()
        await self.dicomweb.close()


# ---- middleware ---------------------------------------------------------------------------------
class Guard(BaseHTTPMiddleware):
    """Security headers on every answer, the origin check on state-changing requests, and the
    access log."""

    async def dispatch(self, request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        started = time.perf_counter()
        if request.method not in ("GET", "HEAD") and not _same_origin(request):
            response: Response = _error(403, "CROSS_ORIGIN", "requests must come from the station's own pages")
        else:
            response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)  # the viewer's page sets its own
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers.setdefault("X-Frame-Options", "DENY")  # the viewer may be framed by the station
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
        if request.url.path.startswith("/api"):
            response.headers["Cache-Control"] = "no-store"
        route = request.scope.get("route")
        access.info(
            "http",
            extra={
                "method": request.method,
                "route": getattr(route, "path", "static" if request.url.path.startswith("/static") else "-"),
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        return response


def _same_origin(request: Request) -> bool:
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer", "")
        return referer.startswith(f"{request.url.scheme}://{request.url.netloc}/")
    return origin == f"{request.url.scheme}://{request.url.netloc}"


# ---- routes -------------------------------------------------------------------------------------
Handler = Callable[[Request, Station, BrowserSession], Awaitable[Response]]


def signed_in(*, activity: bool = True, state_changing: bool = True) -> Callable[[Handler], Any]:
    """A route for a signed-in person: 401 without a live session (ended when it went idle), 403
    when a state-changing request lacks the session's CSRF token; the person's activity restarts
    the idle clock unless ``activity`` is false (the page's timers: lease renewal, the stream)."""

    def wrap(handler: Handler) -> Any:
        async def route(request: Request) -> Response:
            station: Station = request.app.state.station
            session = station.session_of(request)
            if session is not None and station.sessions.is_idle(session):
                await station.end(session, "idle")
                return _error(401, "IDLE_SIGNED_OUT", "signed out after a time without activity; sign in again")
            if session is None:
                return _error(401, "SIGNED_OUT", "not signed in")
            if state_changing and not hmac.compare_digest(request.headers.get("x-csrf-token", ""), session.csrf):
                return _error(403, "CSRF", "the request lacks this session's CSRF token; reload the page")
            with log_context(user=session.identity.get("user")):
                try:
                    if activity:
                        await station.active(session)
                    return await handler(request, station, session)
                except HubError as err:
                    if err.code.name == "UNAUTHENTICATED":  # the hub ended the session
                        await station.end(session, "expired")
                    return _error(err.http_status, err.reason, err.message)

        return route

    return wrap


async def page(request: Request) -> Response:
    return FileResponse(str(STATIC / "index.html"), headers={"Cache-Control": "no-store"})


async def get_session(request: Request) -> Response:
    station: Station = request.app.state.station
    session = station.session_of(request)
    if session is not None and station.sessions.is_idle(session):
        await station.end(session, "idle")
        session = None
    if session is None:
        login_csrf = request.cookies.get(LOGIN_COOKIE) or _token()
        response = JSONResponse({"signed_in": False, "login_csrf": login_csrf})
        _cookie(response, LOGIN_COOKIE, login_csrf, secure=station.secure, max_age=3600)
        return response
    return JSONResponse(
        {
            "signed_in": True,
            "identity": session.identity,
            "csrf": session.csrf,
            "idle_seconds": station.sessions.idle_seconds,
            "lease_renew_seconds": station.settings.lease_renew_seconds,
        }
    )


async def login(request: Request) -> Response:
    station: Station = request.app.state.station
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not hmac.compare_digest(request.headers.get("x-csrf-token", ""), expected):
        return _error(403, "CSRF", "reload the sign-in page and try again")
    body = await _json(request)
    user, password = str(body.get("user", ""))[:64], str(body.get("password", ""))[:1024]
    try:
        hub_session = await station.hub.sign_in(user, password)
    except HubError as err:
        return _error(err.http_status, err.reason, err.message)
    identity = as_dict(hub_session.identity)
    if identity.get("role") not in ("cardiologist", "radiologist"):
        with contextlib.suppress(HubError):
            await station.hub.sign_out(hub_session.token)
        return _error(403, "NOT_A_READER", "the reading station is for cardiologists and radiologists")
    old = station.session_of(request)
    if old is not None:
        await station.end(old, "signed_out")
    session = station.sessions.open(hub_token=hub_session.token, identity=identity)
    log.info("station sign-in", extra={"user": identity.get("user", "")})
    response = JSONResponse({"signed_in": True, "identity": identity, "csrf": session.csrf})
    _cookie(response, COOKIE, session.id, secure=station.secure)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


@signed_in(activity=False)
async def logout(request: Request, station: Station, session: BrowserSession) -> Response:
    await station.end(session, "signed_out")
    response = JSONResponse({"signed_in": False})
    response.delete_cookie(COOKIE, path="/")
    return response


@signed_in()
async def activity(request: Request, station: Station, session: BrowserSession) -> Response:
    return JSONResponse({"idle_seconds": station.sessions.idle_seconds})


@signed_in(activity=False, state_changing=False)
async def templates(request: Request, station: Station, session: BrowserSession) -> Response:
    return JSONResponse({"templates": station.templates})


@signed_in(activity=False, state_changing=False)
async def events(request: Request, station: Station, session: BrowserSession) -> Response:
    """The worklist, live: ``reset``, then the hub's snapshot and every change as ``worklist``
    events; ``signed_out`` when the session ends; ``hub_error`` when the hub stream fails (the
    page's EventSource then reconnects and gets a fresh snapshot)."""
    inbox: asyncio.Queue[Any] = asyncio.Queue()
    session.listeners.add(inbox)

    async def stream() -> AsyncIterator[dict[str, Any]]:
        yield {"event": "reset", "data": "{}", "retry": 2000}
        watch = _pump(station, session, inbox)
        try:
            while True:
                item = await inbox.get()
                if item.get("type") == "signed_out":
                    yield {"event": "signed_out", "data": json.dumps({"why": item["why"]})}
                    return
                if item.get("type") == "hub_error":
                    yield {"event": "hub_error", "data": json.dumps(item)}
                    return
                yield {"event": "worklist", "data": json.dumps(item)}
        finally:
            watch.cancel()
            session.listeners.discard(inbox)

    return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _pump(station: Station, session: BrowserSession, inbox: asyncio.Queue[Any]) -> asyncio.Task[None]:
    """The hub's Watch into the page's inbox: the snapshot as one ``SNAPSHOT`` message with every
    exam (one message to parse for a queue of thousands), then each change as it comes."""

    async def run() -> None:
        snapshot: list[dict[str, Any]] | None = []
        try:
            async for event in station.hub.watch(session.hub_token):
                kind = worklist_pb2.WorklistEvent.Type.Name(event.type).removeprefix("TYPE_")
                if snapshot is not None:
                    if kind == "SNAPSHOT_BATCH":
                        snapshot.extend(as_dict(exam) for exam in event.exams)
                        continue
                    if kind == "SNAPSHOT":
                        snapshot.append(as_dict(event.exam))
                        continue
                    if kind == "SNAPSHOT_END":
                        inbox.put_nowait({"type": "SNAPSHOT", "exams": snapshot, "event_id": event.event_id})
                        snapshot = None
                        continue
                item = as_dict(event)
                item["type"] = kind
                inbox.put_nowait(item)
        except HubError as err:
            inbox.put_nowait({"type": "hub_error", "reason": err.reason, "message": err.message})

    return asyncio.get_running_loop().create_task(run())


@signed_in()
async def claim_next(request: Request, station: Station, session: BrowserSession) -> Response:
    return JSONResponse(await _claim_next(station, session))


async def _claim_next(station: Station, session: BrowserSession) -> dict[str, Any]:
    """Claim the most urgent exam and fetch its page in the same request: the reader's next exam
    opens after one round trip from the browser, not three."""
    claim = await station.hub.claim_next(session.hub_token)
    if claim is None:
        return {"claim": None}
    session.claims[claim.exam.exam_id] = int(claim.fence)
    found = await station.hub.details(session.hub_token, claim.exam.exam_id)
    return {"claim": as_dict(claim), "details": as_dict(found)}


@signed_in()
async def claim(request: Request, station: Station, session: BrowserSession) -> Response:
    body = await _json(request)
    exam_id = request.path_params["exam_id"]
    taken = await station.hub.claim(session.hub_token, exam_id, for_amendment=bool(body.get("for_amendment")))
    session.claims[exam_id] = int(taken.fence)
    return JSONResponse({"claim": as_dict(taken)})


@signed_in(activity=False)
async def renew(request: Request, station: Station, session: BrowserSession) -> Response:
    exam_id = request.path_params["exam_id"]
    renewed = await station.hub.renew(session.hub_token, exam_id, _fence(await _json(request)))
    return JSONResponse({"claim": as_dict(renewed)})


@signed_in(activity=False)
async def release(request: Request, station: Station, session: BrowserSession) -> Response:
    exam_id = request.path_params["exam_id"]
    await station.hub.release(session.hub_token, exam_id, _fence(await _json(request)))
    session.claims.pop(exam_id, None)
    return JSONResponse({"released": exam_id})


@signed_in(state_changing=False)
async def details(request: Request, station: Station, session: BrowserSession) -> Response:
    found = await station.hub.details(session.hub_token, request.path_params["exam_id"])
    return JSONResponse(as_dict(found))


@signed_in()
async def save(request: Request, station: Station, session: BrowserSession) -> Response:
    body = await _json(request)
    report = await station.hub.save(
        session.hub_token,
        request.path_params["exam_id"],
        _fence(body),
        text=str(body.get("text", "")),
        impression=str(body.get("impression", "")),
        critical=bool(body.get("critical")),
        ecg=statements.report_fields(body),
    )
    return JSONResponse({"report": as_dict(report)})


@signed_in()
async def sign(request: Request, station: Station, session: BrowserSession) -> Response:
    body = await _json(request)
    exam_id = request.path_params["exam_id"]
    fence = _fence(body)
    if "text" in body:  # what is on screen is what gets signed
        await station.hub.save(
            session.hub_token,
            exam_id,
            fence,
            text=str(body.get("text", "")),
            impression=str(body.get("impression", "")),
            critical=bool(body.get("critical")),
            ecg=statements.report_fields(body),
        )
    report = await station.hub.sign(session.hub_token, exam_id, fence)
    session.claims.pop(exam_id, None)  # signing ends the claim
    signed: dict[str, Any] = {"report": as_dict(report)}
    if body.get("next"):  # sign and next: the next exam comes with the answer
        try:
            signed["next"] = await _claim_next(station, session)
        except HubError as err:  # signed all the same; the reader is told why no next exam opened
            signed["next"] = {"claim": None, "error": {"reason": err.reason, "message": err.message}}
    return JSONResponse(signed)


@signed_in()
async def amend(request: Request, station: Station, session: BrowserSession) -> Response:
    body = await _json(request)
    exam_id = request.path_params["exam_id"]
    report = await station.hub.amend(
        session.hub_token,
        exam_id,
        fence=int(body.get("fence") or 0),
        reason=str(body.get("reason", "")),
        text=str(body.get("text", "")),
        impression=str(body.get("impression", "")),
        critical=bool(body.get("critical")),
        ecg=statements.report_fields(body),
    )
    session.claims.pop(exam_id, None)
    return JSONResponse({"report": as_dict(report)})


@signed_in(state_changing=False)
async def report_pdf(request: Request, station: Station, session: BrowserSession) -> Response:
    """A signed version's printed report, as the hub rendered it for the clinic (``?version=N``;
    none: the latest), shown in the browser's PDF viewer."""
    exam_id = request.path_params["exam_id"]
    try:
        wanted = int(request.query_params.get("version", "0"))
    except ValueError:
        return _error(400, "BAD_VERSION", "the version must be a number")
    version, data = await station.hub.report_pdf(session.hub_token, exam_id, wanted)
    name = f"report-{exam_id}-v{version}.pdf"
    headers = {"Content-Disposition": f'inline; filename="{name}"', "Cache-Control": "no-store"}
    return Response(data, media_type="application/pdf", headers=headers)


async def _json(request: Request) -> dict[str, Any]:
    if not request.headers.get("content-type", "").startswith("application/json"):
        return {}
    try:
        body = await request.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _fence(body: dict[str, Any]) -> int:
    try:
        return int(body.get("fence") or 0)
    except (TypeError, ValueError):
        return 0


def _token() -> str:
    import secrets

    return secrets.token_urlsafe(32)


def _cookie(response: Response, name: str, value: str, *, secure: bool, max_age: int | None = None) -> None:
    response.set_cookie(name, value, max_age=max_age, path="/", secure=secure, httponly=True, samesite="strict")


def create_app(station: Station) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        station.start()
        try:
            yield
        finally:
            await station.stop()

    routes = [
        Route("/", page),
        Route("/exam/{exam_id}", page),
        Route("/api/session", get_session),
        Route("/api/login", login, methods=["POST"]),
        Route("/api/logout", logout, methods=["POST"]),
        Route("/api/activity", activity, methods=["POST"]),
        Route("/api/templates", templates),
        Route("/api/statements", signed_in(activity=False, state_changing=False)(statements.library)),
        Route("/api/worklist/events", events),
        Route("/api/claim-next", claim_next, methods=["POST"]),
        Route("/api/exams/{exam_id}", details),
        Route("/api/exams/{exam_id}/ecg", signed_in(state_changing=False)(ecg.waveform)),
        Route("/api/exams/{exam_id}/claim", claim, methods=["POST"]),
        Route("/api/exams/{exam_id}/renew", renew, methods=["POST"]),
        Route("/api/exams/{exam_id}/release", release, methods=["POST"]),
        Route("/api/exams/{exam_id}/report", save, methods=["POST"]),
        Route("/api/exams/{exam_id}/sign", sign, methods=["POST"]),
        Route("/api/exams/{exam_id}/amend", amend, methods=["POST"]),
        Route("/api/exams/{exam_id}/report.pdf", report_pdf),
        Route("/dicomweb/{path:path}", signed_in(state_changing=False)(dicomweb.forward)),
        Mount("/static", app=StaticFiles(directory=str(STATIC)), name="static"),
        Route("/login", lambda request: RedirectResponse("/")),
        Route("/viewer", station.viewer.index),
        Route("/viewer/{rest:path}", station.viewer.index),  # the viewer's own routes: one page
        Route("/app-config.js", station.viewer.config),
        Route("/init-service-worker.js", station.viewer.no_service_worker),
        Route("/{path:path}", station.viewer.asset),  # OHIF's build, from the root; last
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)], lifespan=lifespan)
    app.state.station = station
    return app
