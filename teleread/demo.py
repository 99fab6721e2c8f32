"""``teleread demo``: the whole path on the embedded defaults, narrated step by step.

A hub starts in-process on SQLite and a local object directory (port chosen free on 127.0.0.1); a
clinic, a cardiologist and a radiologist are registered; pydicom's bundled CT, MR and 12-lead ECG
files and a generated WFDB ECG with a dangerous pause are uploaded through gRPC, triaged, queued,
claimed, reported, signed, and pulled back by the clinic.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from teleread.auth import Role, add_principal, add_site
from teleread.client import open_channel
from teleread.hub import build_hub, create_server
from teleread.logs import configure_logging
from teleread.settings import Settings
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc, worklist_pb2, worklist_pb2_grpc

LEVEL = {0: "-", 1: "CRITICAL", 2: "urgent", 3: "routine"}


def _inputs(folder: Path) -> list[Path]:
    from pydicom.data import get_testdata_file

    from teleread.models.synthetic import synthetic_ecg, write_wfdb_record

    folder.mkdir(parents=True, exist_ok=True)
    for name in ("CT_small.dcm", "MR_small.dcm", "waveform_ecg.dcm"):
        shutil.copy(str(get_testdata_file(name)), folder / name)
    signal, leads = synthetic_ecg(rhythm="pause", fs=500, seconds=10.0, seed=7)
    write_wfdb_record(folder / "wfdb", "ecg-0001", signal, 500, leads)
    return [folder]


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


def run_demo(data_dir: Path | None = None) -> int:
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
        return _run(console, hub, address, root)
    finally:
        server.stop(grace=1)
        hub.close()


def _run(console: Console, hub: Any, address: str, root: Path) -> int:
    from teleread.gateway.upload import scan_paths, upload_exams

    add_site(hub.engine, code="demo-clinic", name="Demo township clinic", lead_hospital="county-hosp")
    site = add_principal(hub.engine, name="site-demo-clinic", role=Role.SITE, site_code="demo-clinic")
    cardio = add_principal(hub.engine, name="dr-cardio", role=Role.CARDIOLOGIST, hospital="county-hosp")
    radio = add_principal(hub.engine, name="dr-radio", role=Role.RADIOLOGIST, hospital="county-hosp")
    console.print("2. registered site demo-clinic (lead hospital county-hosp), a cardiologist and a radiologist")

    site_ch, cardio_ch, radio_ch = (open_channel(address, token=t) for t in (site, cardio, radio))
    ingest = ingest_pb2_grpc.IngestStub(site_ch)
    worklist = worklist_pb2_grpc.WorklistStub(cardio_ch)
    alerts: list[str] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(worklist, alerts, stop), daemon=True)
    watcher.start()

    scan = scan_paths(_inputs(root / "inputs"))
    console.print(
        f"3. technician uploads {sum(len(e.objects) for e in scan.exams)} files "
        f"({scan.total_bytes / 1e6:.2f} MB) as {len(scan.exams)} exams: CT, MR, DICOM 12-lead ECG, WFDB ECG"
    )
    started = time.perf_counter()
    outcomes = upload_exams(ingest, scan.exams, priority="routine", indication="demo")
    ids = [o.exam_id for o in outcomes if o.exam_id]
    exams = _wait_queued(ingest, ids)
    console.print(f"4. uploaded, committed, triaged and queued in {time.perf_counter() - started:.2f} s")
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

    results = results_pb2_grpc.ResultsStub(site_ch)
    page = results.ListResults(results_pb2.ListResultsRequest(after_cursor=0, limit=50), timeout=10)
    console.print(
        f"6. the clinic pulls results after cursor 0: {len(page.results)} result(s), next cursor {page.next_cursor}"
    )
    for r in page.results:
        flag = "[bold red]CRITICAL[/] " if r.critical else ""
        console.print(
            f"   #{r.cursor} {flag}{r.exam.modality} {r.exam.exam_id[:8]}: {r.report.text} — {r.report.signed_by}"
        )
    if len(page.results) != 2:
        rc = 1
    stop.set()
    for ch in (site_ch, cardio_ch, radio_ch):
        ch.close()
    console.rule("[bold green]demo complete" if rc == 0 else "[bold red]demo incomplete")
    return rc
