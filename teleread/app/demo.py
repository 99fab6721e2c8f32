"""``teleread demo``: the whole path on the embedded defaults, narrated step by step.

A hub starts in-process on SQLite and a local object directory (port chosen free on 127.0.0.1); a
clinic, a cardiologist and a radiologist are registered; the clinic's gateway starts (its DICOM
receiver on a free port, its outbox and watch folder under the demo folder). A modality pushes
pydicom's bundled CT, MR and 12-lead ECG files to the gateway by C-STORE, and an ECG cart drops a
generated WFDB ECG with a dangerous pause into the watch folder; the gateway forwards them through
gRPC; they are triaged, queued, claimed, reported and signed, the hub renders each signed report's
PDF, and the gateway writes the signed reports (JSON, text, and the hub's PDF) into the clinic's
results folder.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teleread.auth import Role, add_principal, add_site
from teleread.client import open_channel
from teleread.app.hub import build_hub, create_server
from teleread.logs import configure_logging
from teleread.settings import Settings
from google.protobuf import json_format

from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2, worklist_pb2, worklist_pb2_grpc

LEVEL = {0: "-", 1: "CRITICAL", 2: "urgent", 3: "routine"}


def _inputs(folder: Path) -> tuple[list[Path], tuple[Path, Path]]:
    """The modality's DICOM files, and the ECG cart's WFDB record (header, signal)."""
    from pydicom.data import get_testdata_file

    from teleread.models.inference.synthetic import synthetic_ecg, write_wfdb_record

    folder.mkdir(parents=True, exist_ok=True)
    dicom = []
    for name in ("CT_small.dcm", "MR_small.dcm", "waveform_ecg.dcm"):
        dicom.append(Path(shutil.copy(str(get_testdata_file(name)), folder / name)))
    signal, leads = synthetic_ecg(rhythm="pause", fs=500, seconds=10.0, seed=7)
    return dicom, write_wfdb_record(folder / "wfdb", "ecg-0001", signal, 500, leads)


def _start_gateway(root: Path, address: str, token: str) -> Any:
    from teleread.gateway.clinic.service import Gateway
    from pydantic import SecretStr

    from teleread.settings import GatewaySettings

    config = GatewaySettings(
        hub=address,
        token=SecretStr(token),
        dicom_host="127.0.0.1",
        dicom_port=0,
        quiet_seconds=1.0,
        poll_seconds=0.1,
        results_poll_seconds=0.5,
        watch_settle_seconds=0.3,
    )
    return Gateway(Settings(data_dir=root / "clinic", gateway=config)).start()


def _wait(predicate: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _wait_queued(ingest: Any, exam_ids: list[str], timeout: float = 30.0) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        exams = [ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=e), timeout=10) for e in exam_ids]
        if all(x.state == "queued" for x in exams) or time.monotonic() > deadline:
            return exams
        time.sleep(0.05)


def _watch(worklist: Any, alerts: list[str], stop: threading.Event) -> None:
    try:
        for event in worklist.Watch(worklist_pb2.WatchWorklistRequest(), timeout=120):
            if event.type == worklist_pb2.WorklistEvent.TYPE_CRITICAL:
                alerts.append(f"{event.exam.exam_id[:8]} {event.exam.triage.summary}")
            if stop.is_set():
                return
    except grpc.RpcError:
        return


def _show_findings(console: Console, exam: Any) -> None:
    t = exam.triage
    console.print(f"  triage: [bold]{LEVEL[t.level]}[/] score {t.score:.2f} ({t.rules_version}) — {t.summary}")
    if t.models:
        console.print(f"  models: {', '.join(t.models)}")
    for f in t.findings:
        ev = ", ".join(
            f"{e.name}={e.value:.3g}{e.unit}{' ' + e.lead if e.lead else ''} (threshold {e.threshold:g})"
            for e in f.evidence
        )
        console.print(f"   • {escape('[' + LEVEL[f.level] + ']')} {escape(f.title)}: {escape(ev)}")


def run_demo(
    data_dir: Path | None = None,
    *,
    station: bool = False,
    station_port: int = 8080,
    serving: Callable[[str, str], None] | None = None,
) -> int:
    """The narrated run; with ``station``, the hub, the clinic's gateway and a reading station then
    keep running with exams to read (more ECGs arrive from the clinic) while ``serving(url,
    password)`` runs (by default: until Ctrl+C)."""
    console = Console()
    root = data_dir or Path(tempfile.mkdtemp(prefix="teleread-demo-"))
    settings = Settings(data_dir=root / "hub")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(root / "hub.log", "a", encoding="utf-8")
    configure_logging("INFO", stream=log_file)
    console.rule("[bold]teleread demo — embedded defaults (SQLite + local object store)")
    hub = build_hub(settings)
    server, port = create_server(hub, host="127.0.0.1", port=0)
    server.start()
    address = f"127.0.0.1:{port}"
    console.print(f"1. hub listening on {address}; data in {root} (JSON logs in {root / 'hub.log'})")
    try:
        return _run(console, hub, address, root, station_port=station_port if station else None, serving=serving)
    finally:
        server.stop(grace=1)
        hub.close()


def _run(
    console: Console,
    hub: Any,
    address: str,
    root: Path,
    *,
    station_port: int | None = None,
    serving: Callable[[str, str], None] | None = None,
) -> int:
    add_site(hub.engine, code="demo-clinic", name="Demo township clinic", lead_hospital="county-hosp")
    site = add_principal(hub.engine, name="site-demo-clinic", role=Role.SITE, site_code="demo-clinic")
    cardio = add_principal(hub.engine, name="dr-cardio", role=Role.CARDIOLOGIST, hospital="county-hosp")
    radio = add_principal(hub.engine, name="dr-radio", role=Role.RADIOLOGIST, hospital="county-hosp")
    console.print("2. registered site demo-clinic (lead hospital county-hosp), a cardiologist and a radiologist")

    site_ch, cardio_ch, radio_ch = (open_channel(address, token=t) for t in (site, cardio, radio))
    worklist = worklist_pb2_grpc.WorklistStub(cardio_ch)
    alerts: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(worklist, alerts, stop), daemon=True)
    watcher.start()
    gateway = _start_gateway(root, address, site)
    try:
        rc = _with_gateway(console, gateway, root, site_ch, worklist, radio_ch, alerts, stop)
        if rc == 0 and station_port is not None:
            _keep_serving(
                console, hub, address, gateway, root, port=station_port, serving=serving or _until_interrupted
            )
        return rc
    finally:
        stop.set()
        gateway.stop()
        for ch in (site_ch, cardio_ch, radio_ch):
            ch.close()


def _with_gateway(
    console: Console,
    gateway: Any,
    root: Path,
    site_ch: grpc.Channel,
    worklist: Any,
    radio_ch: grpc.Channel,
    alerts: list[str],
    stop: threading.Event,
) -> int:
    from teleread.gateway.clinic.dicom_send import send_files

    ingest = ingest_pb2_grpc.IngestStub(site_ch)
    dicom, (hea, dat) = _inputs(root / "inputs")
    port = gateway.scp.port
    console.print(
        f"3. the clinic's gateway runs: DICOM receiver TELEREAD_GW on port {port}, watch folder {gateway.watch.folder}"
    )
    started = time.perf_counter()
    sent = send_files(dicom, "127.0.0.1", port)
    stored = sum(1 for s in sent if s.status == 0)
    console.print(f"   the modality pushes CT, MR and a 12-lead ECG by C-STORE: {stored} of {len(sent)} stored")
    for part in (dat, hea):
        shutil.copy(part, gateway.watch.folder / part.name)
    console.print("   the ECG cart drops a WFDB record (.hea + .dat) into the watch folder")
    if not _wait(lambda: gateway.outbox.status().by_state["committed"] == 4):
        console.print(f"[red]the gateway did not forward all 4 exams: {gateway.outbox.status()}")
        return 1
    ids = _hub_exam_ids(gateway)
    exams = _wait_queued(ingest, ids)
    console.print(
        f"4. forwarded by the gateway, committed, triaged and queued in {time.perf_counter() - started:.2f} s"
        " (including the 1 s study-stability period)"
    )
    table = Table("exam", "modality", "state", "level", "score", "summary")
    for x in exams:
        table.add_row(
            x.exam_id[:8], x.modality, x.state, LEVEL[x.triage.level], f"{x.triage.score:.2f}", x.triage.summary
        )
    console.print(table)
    time.sleep(0.3)
    for alert in alerts:
        console.print(f"[bold white on red] CRITICAL EXAM QUEUED [/] {alert}")

    rc = 0
    for who, stub, text in (
        ("cardiologist", worklist, "Sinus rhythm with a long sinus pause; see strip."),
        ("radiologist", worklist_pb2_grpc.WorklistStub(radio_ch), "No acute abnormality."),
    ):
        claim = stub.ClaimNext(worklist_pb2.ClaimNextRequest(lease_seconds=300), timeout=10)
        console.print(
            f"5. {who} claims the most urgent exam: {claim.exam.exam_id[:8]} "
            f"({claim.exam.modality}, fence {claim.fence})"
        )
        details = stub.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=claim.exam.exam_id), timeout=10)
        _show_findings(console, details.exam)
        stub.SaveReport(
            worklist_pb2.SaveReportRequest(
                exam_id=claim.exam.exam_id, fence=claim.fence, text=text, critical=details.exam.triage.level == 1
            ),
            timeout=10,
        )
        report = stub.SignReport(
            worklist_pb2.SignReportRequest(exam_id=claim.exam.exam_id, fence=claim.fence), timeout=10
        )
        console.print(f"   signed report v{report.version} by {report.signed_by} (sha256 {report.sha256[:12]}…)")

    results_dir = gateway.inbox.folder
    if not _wait(lambda: len(list(results_dir.glob("*.pdf"))) == 2, timeout=30):
        rc = 1
    pdfs = sorted(results_dir.glob("*.pdf"))
    console.print(f"6. the gateway pulls the signed results: {len(pdfs)} report(s) in {results_dir}")
    for pdf in pdfs:
        result = results_pb2.Result()
        json_format.Parse(pdf.with_suffix(".json").read_text(encoding="utf-8"), result, ignore_unknown_fields=True)
        flag = "[bold red]CRITICAL[/] " if result.critical else ""
        console.print(
            f"   {flag}{result.exam.modality} {result.exam.exam_id[:8]}: {escape(result.report.text)}"
            f" — {result.report.signed_by}; print {pdf.name}"
        )
    status = gateway.outbox.status()
    console.print(
        f"7. gateway status: {status.by_state['committed']} committed, {status.bytes_waiting} bytes waiting, "
        f"link {status.link_state}"
    )
    console.rule("[bold green]demo complete" if rc == 0 else "[bold red]demo incomplete")
    return rc


def _hub_exam_ids(gateway: Any) -> list[str]:
    return [e.hub_exam_id for e in gateway.outbox.exams(state="committed")]


DEMO_PASSWORD_BYTES = 9


def _until_interrupted(url: str, password: str) -> None:
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass


def _keep_serving(
    console: Console,
    hub: Any,
    address: str,
    gateway: Any,
    root: Path,
    *,
    port: int,
    serving: Callable[[str, str], None],
) -> None:
    """The reading station beside the demo's hub: the demo readers get passwords, the clinic sends a
    few more ECGs (one of them critical), and everything runs until Ctrl+C."""
    import secrets

    from teleread.models.inference.synthetic import synthetic_ecg, write_wfdb_record
    from teleread.reader.station.serve import StationServer
    from teleread.settings import StationSettings
    from teleread.signin import set_password

    password = secrets.token_urlsafe(DEMO_PASSWORD_BYTES)
    for name in ("dr-cardio", "dr-radio"):
        set_password(hub.engine, name=name, password=password)
    server = StationServer(StationSettings(port=port, hub=address)).start()
    folder = root / "inputs" / "more"
    for n, rhythm in enumerate(("normal", "af_rvr", "brady", "stemi", "normal"), start=2):
        signal, leads = synthetic_ecg(rhythm=rhythm, fs=500, seconds=10.0, seed=100 + n)
        hea, dat = write_wfdb_record(folder, f"ecg-{n:04d}", signal, 500, leads)
        for part in (dat, hea):
            shutil.copy(part, gateway.watch.folder / part.name)
    console.rule("[bold]reading station")
    console.print(f"8. reading station on [bold]{server.url}[/] (hub {address})")
    console.print(
        f"   sign in as [bold]dr-cardio[/] (ECGs) or [bold]dr-radio[/] (images), password [bold]{password}[/]"
    )
    console.print("   the clinic is sending five more ECGs; press Ctrl+C to stop")
    try:
        serving(server.url, password)
    finally:
        console.print("stopping")
        server.stop()
