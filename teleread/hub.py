"""Composition root of the hub: builds the adapters and services from settings and serves gRPC.

``build_hub(settings)`` wires the database, object store, event bus, ingest, queue, reports,
results, the triage workers and the clean-up thread (``gateway/janitor.py``);
``create_server(hub)`` returns a started-ready gRPC server and its port (port 0 picks a free one,
as tests do); ``serve(settings)`` runs until interrupted.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy import Engine

from teleread.auth import Authenticator
from teleread.cpu import CpuPool, default_workers
from teleread.db.engine import make_engine, upgrade
from teleread.events import EventBus
from teleread.gateway.ingest import IngestService
from teleread.gateway.janitor import Janitor
from teleread.gateway.servicer import IngestServicer
from teleread.models.worker import TriageWorker
from teleread.reader.queue import QueueService
from teleread.reader.reports import ReportService
from teleread.reader.results import ResultsService
from teleread.reader.routing import load_routing
from teleread.reader.servicers import ResultsServicer, WorklistServicer
from teleread.rpc import ServerInterceptor
from teleread.settings import Settings
from teleread.storage import ObjectStore
from teleread.storage.factory import build_object_store
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

log = logging.getLogger("teleread.hub")
MAX_MESSAGE = 4 * 1024 * 1024
INGEST_NICE = 5
SERVICES = (
    ingest_pb2.DESCRIPTOR.services_by_name["Ingest"].full_name,
    worklist_pb2.DESCRIPTOR.services_by_name["Worklist"].full_name,
    results_pb2.DESCRIPTOR.services_by_name["Results"].full_name,
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
    triage: TriageWorker
    authenticator: Authenticator
    cpu: CpuPool
    triage_cpu: CpuPool
    janitor: Janitor

    def close(self) -> None:
        self.janitor.stop()
        self.bus.close()
        self.triage.shutdown()
        self.cpu.close()
        self.triage_cpu.close()
        self.engine.dispose()


def build_hub(settings: Settings, *, store: ObjectStore | None = None, migrate: bool = True) -> Hub:
    url = settings.resolved_database_url()
    if migrate:
        upgrade(url)
    engine = make_engine(url)
    store = store or build_object_store(settings)
    routing = load_routing(settings.queue.routing_file)
    bus = EventBus()
    # Two pools: triage (commit -> queued latency is the clinical clock) runs at normal priority,
    # ingest parsing at a lower one, so a flood of uploads cannot delay a STEMI alert.
    # Triage may use every core (it is the clinical clock); ingest parsing half of them, niced.
    auto = settings.cpu_workers < 0
    ingest_workers = default_workers(share=0.5) if auto else settings.cpu_workers
    triage_workers = default_workers(share=1.0) if auto else settings.cpu_workers
    cpu = CpuPool(ingest_workers, log_level=settings.log_level, nice=INGEST_NICE, warm=("teleread.gateway.validate",))
    warm = ("teleread.models.pipeline", "teleread.models.ecg_measure", "torch")
    triage_cpu = CpuPool(triage_workers, log_level=settings.log_level, warm=warm)
    triage = TriageWorker(
        engine=engine,
        store=store,
        routing=routing,
        bus=bus,
        workers=max(settings.queue.triage_workers, triage_workers),
        cpu=triage_cpu,
        rules_path=settings.queue.rules_file,
        policy_path=settings.queue.fusion_policy,
    )
    ingest = IngestService(
        engine=engine,
        store=store,
        staging_dir=settings.staging_dir(),
        routing=routing,
        bus=bus,
        on_committed=triage.submit,
        max_object_bytes=settings.max_object_bytes,
        cpu=cpu,
    )
    queue = QueueService(
        engine=engine,
        store=store,
        bus=bus,
        lease_seconds=settings.queue.lease_seconds,
        max_lease_seconds=settings.queue.max_lease_seconds,
    )
    reports = ReportService(engine=engine, queue=queue, bus=bus)
    results = ResultsService(engine=engine, bus=bus)
    janitor = Janitor(
        engine=engine,
        store=store,
        staging_dir=settings.staging_dir(),
        abandoned_after=timedelta(hours=settings.ingest.abandoned_hours),
        grace=timedelta(seconds=settings.ingest.orphan_grace_seconds),
        interval_seconds=settings.ingest.janitor_interval_seconds,
        first_seconds=settings.ingest.janitor_first_seconds,
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
        triage=triage,
        authenticator=Authenticator(engine),
        cpu=cpu,
        triage_cpu=triage_cpu,
        janitor=janitor,
    )
    recovered = triage.recover()
    if recovered:
        log.info("re-queued committed exams for triage", extra={"count": recovered})
    janitor.start()
    return hub


def create_server(hub: Hub, *, host: str | None = None, port: int | None = None) -> tuple[grpc.Server, int]:
    cfg = hub.settings.grpc
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=cfg.max_workers, thread_name_prefix="rpc"),
        interceptors=[ServerInterceptor(hub.authenticator)],
        options=options,
        maximum_concurrent_rpcs=cfg.max_workers * 4,
    )
    ingest_pb2_grpc.add_IngestServicer_to_server(IngestServicer(hub.ingest), server)
    worklist_pb2_grpc.add_WorklistServicer_to_server(
        WorklistServicer(engine=hub.engine, queue=hub.queue, reports=hub.reports, bus=hub.bus), server
    )
    results_pb2_grpc.add_ResultsServicer_to_server(ResultsServicer(hub.results), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICES + ("",):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(SERVICES + (reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    address = f"{host or cfg.host}:{cfg.port if port is None else port}"
    if cfg.tls_cert and cfg.tls_key:
        creds = grpc.ssl_server_credentials(
            [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
            root_certificates=cfg.tls_ca.read_bytes() if cfg.tls_ca else None,
            require_client_auth=cfg.tls_ca is not None,
        )
        bound = server.add_secure_port(address, creds)
    else:
        bound = server.add_insecure_port(address)
    if not bound:
        raise OSError("could not bind the gRPC port")
    return server, bound


def serve(settings: Settings, *, ready: threading.Event | None = None) -> None:
    hub = build_hub(settings)
    server, port = create_server(hub)
    server.start()
    log.info("hub serving", extra={"count": port})
    print(f"teleread hub listening on {settings.grpc.host}:{port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if ready is not None:
        ready.set()
    stop.wait()
    server.stop(grace=5).wait()
    hub.close()
