"""Composition root of the hub: builds the adapters and services from settings and serves gRPC.

``build_hub(settings)`` wires the database, object store, event bus, ingest, queue, reports, the
printed reports (``reader/hub/report_pdfs.py``), results, the watch feed (``reader/hub/feed.py``),
the triage workers and the clean-up thread (``gateway/hub/janitor.py``); ``create_server(hub)``
returns a ready-to-start gRPC server and its port (port 0 picks a free one, as tests do);
``serve(settings)`` runs until interrupted.

The server is gRPC's asyncio server on an event loop of its own thread (:class:`HubServer`, with
the synchronous ``start``/``stop``/``wait_for_termination`` of ``grpc.Server``). Unary handlers
stay synchronous and run in a bounded pool (``max_workers``); streams are coroutines on the loop
and hold no thread while they wait, their blocking work going to a second pool
(``stream_workers``, the loop's default executor).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Coroutine
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine

from teleread.clock import clock_for
from teleread.auth import Authenticator
from teleread.cpu import CpuPool, default_workers
from teleread.db.engine import make_engine, upgrade
from teleread.events import EventBus
from teleread.gateway.hub.ingest import IngestService
from teleread.gateway.hub.janitor import Janitor
from teleread.gateway.hub.servicer import IngestServicer
from teleread.models.inference.worker import TriageWorker
from teleread.reader.hub.directory import Directory
from teleread.reader.hub.feed import WatchFeed
from teleread.reader.hub.queue import QueueService
from teleread.reader.hub.dicomweb import DicomwebServer
from teleread.reader.hub.dicomweb import create_app as create_dicomweb_app
from teleread.reader.hub import sla
from teleread.reader.hub.renditions import RenditionService
from teleread.reader.hub.notify import Notifier
from teleread.reader.hub.timers import TimerSweeper
from teleread.reader.hub.report_pdfs import ReportPdfService
from teleread.reader.hub.reports import ReportService
from teleread.reader.hub.results import ResultsService
from teleread.reader.hub.roster import Roster
from teleread.reader.hub.routing import load_routing
from teleread.reader.hub.workdays import load_calendar
from teleread.reader.hub.servicers import ResultsServicer, WorklistServicer
from teleread.rpc import ServerInterceptor, StreamSlots
from teleread.settings import Settings
from teleread.signin import AuthServicer, Sessions
from teleread.storage import ObjectStore
from teleread.storage.factory import build_object_store
from teleread.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    ingest_pb2,
    ingest_pb2_grpc,
    results_pb2,
    results_pb2_grpc,
    worklist_pb2,
    worklist_pb2_grpc,
)

log = logging.getLogger("teleread.app.hub")
MAX_MESSAGE = 4 * 1024 * 1024
KEEPALIVE_TIMEOUT_MS = 20_000
PENDING_CALLS = 10_000
T = TypeVar("T")
INGEST_NICE = 5
MEASURE_NICE = 19
SERVICES = (
    ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name,
    worklist_pb2.DESCRIPTOR.services_by_name["Worklist"].full_name,
    results_pb2.DESCRIPTOR.services_by_name["Results"].full_name,
    auth_pb2.DESCRIPTOR.services_by_name["Auth"].full_name,
)


@dataclass
class Hub:
    settings: Settings
    engine: Engine
    store: ObjectStore
    bus: EventBus
    ingest: IngestService
    queue: QueueService
    reports: ReportService
    results: ResultsService
    directory: Directory
    feed: WatchFeed
    triage: TriageWorker
    authenticator: Authenticator
    sessions: Sessions
    cpu: CpuPool
    triage_cpu: CpuPool
    measure_cpu: CpuPool
    janitor: Janitor
    pdfs: ReportPdfService
    renditions: RenditionService
    timers: TimerSweeper
    notifier: Notifier

    def close(self) -> None:
        self.timers.stop()
        self.notifier.stop()
        self.janitor.stop()
        self.pdfs.close()
        self.renditions.close()
        self.feed.close()
        self.bus.close()
        self.triage.shutdown()
        self.cpu.close()
        self.triage_cpu.close()
        self.measure_cpu.close()
        self.engine.dispose()


def build_hub(settings: Settings, *, store: ObjectStore | None = None, migrate: bool = True) -> Hub:
    url = settings.resolved_database_url()
    if migrate:
        upgrade(url)
    engine = make_engine(url)
    store = store or build_object_store(settings)
    routing = load_routing(settings.queue.routing_file)
    roster = Roster(load_calendar(settings.queue.calendar_file))
    bus = EventBus()
    # Two pools: triage (commit -> queued latency is the clinical clock) runs at normal priority,
    # ingest parsing at a lower one, so a flood of uploads cannot delay a STEMI alert.
    # Triage may use every core (it is the clinical clock); ingest parsing half of them, niced.
    auto = settings.cpu_workers < 0
    ingest_workers = default_workers(share=0.5) if auto else settings.cpu_workers
    triage_workers = default_workers(share=1.0) if auto else settings.cpu_workers
    warm_ingest = ("teleread.gateway.validate", "teleread.models.inference.pipeline")
    cpu = CpuPool(ingest_workers, log_level=settings.log_level, nice=INGEST_NICE, warm=warm_ingest)
    warm = ("teleread.models.inference.pipeline", "teleread.models.inference.ecg_measure", "torch")
    triage_cpu = CpuPool(triage_workers, log_level=settings.log_level, warm=warm)
    # Triage's second pass (an ECG's PR, QT and axes, after it is queued) in one process of its own
    # at the lowest priority: it yields the CPU to ingest and triage, and its queue never holds up
    # an upload's parsing (sharing the ingest pool cut ECG ingest by a third to a half).
    # Started on its first ECG (not warmed: a hub start does not wait for neurokit2's import).
    measure_cpu = CpuPool(min(1, ingest_workers), log_level=settings.log_level, nice=MEASURE_NICE)
    # leases and deadlines on the database's time: several hubs agree
    clock = clock_for(engine, refresh_seconds=settings.queue.clock_refresh_seconds)
    queue = QueueService(
        engine=engine,
        store=store,
        bus=bus,
        lease_seconds=settings.queue.lease_seconds,
        max_lease_seconds=settings.queue.max_lease_seconds,
        clock=clock,
        routing=routing,
        roster=roster,
        offer_seconds=settings.queue.offer_seconds,
    )
    triage = TriageWorker(
        engine=engine,
        store=store,
        on_triaged=queue.enqueue_triaged,
        workers=max(settings.queue.triage_workers, triage_workers),
        cpu=triage_cpu,
        on_measured=queue.record_ecg_measurements,
        measure_cpu=measure_cpu,
        rules_path=settings.queue.rules_file,
        policy_path=settings.queue.fusion_policy,
    )
    # the viewer's copies of large JPEG 2000 images, on the niced pool: triage comes first
    renditions = RenditionService(engine=engine, store=store, spool_dir=settings.staging_dir(), cpu=cpu)

    def committed(exam_id: str) -> None:
        triage.submit(exam_id)
        renditions.submit(exam_id)

    ingest = IngestService(
        engine=engine,
        clock=clock,
        store=store,
        staging_dir=settings.staging_dir(),
        routing=routing,
        bus=bus,
        on_committed=committed,
        max_object_bytes=settings.max_object_bytes,
        cpu=cpu,
    )
    directory = Directory(engine)
    pdfs = ReportPdfService(
        uow=queue.uow,
        store=store,
        directory=directory,
        spool_dir=settings.staging_dir(),
        font=settings.report.font,
        zone=ZoneInfo(settings.report.timezone),
        cpu=cpu,  # the niced pool: a printed report can wait for a moment, triage cannot
        ecg_objects=queue.stored_objects,
    )
    reports = ReportService(queue=queue, bus=bus, on_signed=pdfs.submit)
    results = ResultsService(uow=queue.uow, bus=bus, clock=clock)
    feed = WatchFeed(
        engine=engine,
        bus=bus,
        queue=queue,
        results=results,
        directory=directory,
        poll_seconds=settings.grpc.watch_poll_seconds,
    )
    janitor = Janitor(
        engine=engine,
        store=store,
        staging_dir=settings.staging_dir(),
        abandoned_after=timedelta(hours=settings.ingest.abandoned_hours),
        grace=timedelta(seconds=settings.ingest.orphan_grace_seconds),
        interval_seconds=settings.ingest.janitor_interval_seconds,
        first_seconds=settings.ingest.janitor_first_seconds,
        report_pdfs=pdfs.render_missing,
        renditions=renditions.build_missing,
    )
    sessions = Sessions(
        engine,
        clock=clock,
        idle_seconds=settings.auth.session_idle_seconds,
        max_hours=settings.auth.session_max_hours,
    )
    hub = Hub(
        settings=settings,
        engine=engine,
        store=store,
        bus=bus,
        ingest=ingest,
        queue=queue,
        reports=reports,
        results=results,
        directory=directory,
        feed=feed,
        triage=triage,
        authenticator=Authenticator(engine, sessions=sessions),
        sessions=sessions,
        cpu=cpu,
        triage_cpu=triage_cpu,
        measure_cpu=measure_cpu,
        janitor=janitor,
        pdfs=pdfs,
        renditions=renditions,
        timers=TimerSweeper(
            engine=engine,
            clock=clock,
            handlers=sla.handlers(queue.roster),
            interval_seconds=settings.queue.timer_interval_seconds,
        ),
        notifier=Notifier(engine=engine, clock=clock, settings=settings.notify),
    )
    pdfs.warm()
    recovered = triage.recover()
    if recovered:
        log.info("re-queued committed exams for triage", extra={"count": recovered})
    feed.start()
    janitor.start()
    hub.timers.start()
    hub.notifier.start()
    return hub


class HubServer:
    """gRPC's asyncio server on an event loop of its own thread, behind the synchronous calls of
    ``grpc.Server`` that the CLI, the demo, the tests and the benchmarks use."""

    def __init__(self, hub: Hub, *, address: str) -> None:
        cfg = hub.settings.grpc
        self._hub = hub
        self._address = address
        self._rpc_pool = futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="rpc")
        self._stream_pool = futures.ThreadPoolExecutor(max_workers=cfg.stream_workers, thread_name_prefix="stream")
        self.slots = StreamSlots(cfg.max_streams_per_identity)
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(self._stream_pool)
        self._thread = threading.Thread(target=self._run, name="rpc-loop", daemon=True)
        self._terminated = threading.Event()
        self._stopping: threading.Event | None = None
        self._lock = threading.Lock()
        self._thread.start()
        try:
            self._server, self.port = self._call(self._build())
        except BaseException:
            self._shutdown()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()
            self._terminated.set()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _build(self) -> tuple[grpc.aio.Server, int]:
        hub, cfg = self._hub, self._hub.settings.grpc
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            # Calls that arrived but that the server has not taken up yet: beyond the soft limit gRPC
            # cancels some at random, beyond the hard one all. The asyncio server takes calls up one
            # by one on its loop, so a burst (every station reconnecting after a restart) queues
            # more than gRPC's 1,000 for a moment.
            ("grpc.server.max_pending_requests", PENDING_CALLS),
            ("grpc.server.max_pending_requests_hard_limit", 2 * PENDING_CALLS),
        ]
        if cfg.keepalive_seconds > 0:  # a dead peer's streams end instead of holding their slots
            options += [
                ("grpc.keepalive_time_ms", int(cfg.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                ("grpc.http2.max_pings_without_data", 0),  # idle watch streams send no data
            ]
        server = grpc.aio.server(
            migration_thread_pool=self._rpc_pool,
            interceptors=[ServerInterceptor(hub.authenticator, self.slots)],
            options=options,
        )
        ingest_pb2_grpc.add_IngestServicer_to_server(
            IngestServicer(hub.ingest, idle_seconds=cfg.upload_idle_seconds), server
        )
        worklist_pb2_grpc.add_WorklistServicer_to_server(
            WorklistServicer(
                queue=hub.queue, reports=hub.reports, directory=hub.directory, feed=hub.feed, pdfs=hub.pdfs
            ),
            server,
        )
        results_pb2_grpc.add_ResultsServicer_to_server(
            ResultsServicer(hub.results, feed=hub.feed, pdfs=hub.pdfs), server
        )
        auth_pb2_grpc.add_AuthServicer_to_server(
            AuthServicer(hub.sessions, on_end=hub.authenticator.forget_session), server
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for name in SERVICES + ("",):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(SERVICES + (reflection.SERVICE_NAME, health.SERVICE_NAME), server)
        if cfg.tls_cert and cfg.tls_key:
            creds = grpc.ssl_server_credentials(
                [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                root_certificates=cfg.tls_ca.read_bytes() if cfg.tls_ca else None,
                require_client_auth=cfg.tls_ca is not None,
            )
            bound = server.add_secure_port(self._address, creds)
        else:
            bound = server.add_insecure_port(self._address)
        if not bound:
            raise OSError("could not bind the gRPC port")
        return server, bound

    def start(self) -> None:
        self._call(self._server.start())

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving (``grace`` seconds for calls under way; None: cancel them now). The event
        is set once the server, its loop and its pools are down."""
        with self._lock:
            if self._stopping is not None:
                return self._stopping
            self._stopping = threading.Event()
        done = self._stopping
        try:
            future = asyncio.run_coroutine_threadsafe(self._server.stop(grace), self._loop)
        except RuntimeError:  # the loop is already down
            done.set()
            return done

        def finished(_: Any) -> None:
            self._shutdown()
            done.set()

        future.add_done_callback(finished)
        return done

    def _shutdown(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:
            pass
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)
        self._rpc_pool.shutdown(wait=False, cancel_futures=True)
        self._stream_pool.shutdown(wait=False, cancel_futures=True)

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; True if ``timeout`` passed first (as grpc.Server)."""
        return not self._terminated.wait(timeout)


def create_server(hub: Hub, *, host: str | None = None, port: int | None = None) -> tuple[HubServer, int]:
    cfg = hub.settings.grpc
    server = HubServer(hub, address=f"{host or cfg.host}:{cfg.port if port is None else port}")
    return server, server.port


def create_dicomweb(hub: Hub) -> DicomwebServer | None:
    """The hub's HTTP port (DICOMweb), bound and not yet started; None when it is turned off."""
    cfg = hub.settings.http
    if cfg.port < 0:
        return None
    app = create_dicomweb_app(hub.engine, hub.authenticator.authenticate, hub.store)
    return DicomwebServer(app, host=cfg.host, port=cfg.port)


def serve(settings: Settings, *, ready: threading.Event | None = None) -> None:
    hub = build_hub(settings)
    server, port = create_server(hub)
    server.start()
    log.info("hub serving", extra={"count": port})
    print(f"teleread hub listening on {settings.grpc.host}:{port}", flush=True)
    web = create_dicomweb(hub)
    if web is not None:
        web.start()
        print(f"teleread hub DICOMweb at {web.url}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    stop.wait()
    if web is not None:
        web.stop()
    server.stop(grace=5).wait()
    hub.close()
