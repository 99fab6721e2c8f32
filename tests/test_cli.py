"""The ``teleread`` command against a real hub on loopback: a technician uploads with --site, a
cardiologist works the queue (worklist, next, show, report, sign), the site pulls results with a
resumable cursor file; the admin commands issue working tokens; TLS with a local CA."""

from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest

from conftest import make_settings, start_stack
from helpers import copy_testdata, wait_for, write_synthetic_wfdb
from teleread.app.cli import main
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)


def _conn(stack, who: str) -> list[str]:
    return ["--hub", stack.address, "--token", stack.tokens[who]]


def test_technician_reader_and_site_through_the_cli(embedded_stack, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: keep exam ids on one line
    inputs = tmp_path / "inputs"
    write_synthetic_wfdb(inputs, rhythm="af_rvr")
    copy_testdata(inputs, "CT_small.dcm")
    wrong = main(["upload", str(inputs), "--site", "clinic-b", *_conn(embedded_stack, "site_a")])
    assert wrong != 0  # the token belongs to clinic-a
    capsys.readouterr()
    rc = main(
        [
            "upload",
            str(inputs),
            "--site",
            "clinic-a",
            "--priority",
            "urgent",
            "--indication",
            "palpitations",
            *_conn(embedded_stack, "tech_a"),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    exam_ids = re.findall(r"\b[0-9a-f]{32}\b", out)
    assert len(set(exam_ids)) == 2

    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    for exam_id in set(exam_ids):
        wait_for(lambda e=exam_id: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=e), timeout=10).state == "queued")

    reader = [*_conn(embedded_stack, "cardio"), "--claims-file", str(tmp_path / "claims.json")]
    assert main(["read", "worklist", *_conn(embedded_stack, "cardio")]) == 0
    assert "ECG" in capsys.readouterr().out
    assert main(["read", "next", *reader]) == 0
    claimed = re.findall(r"\b[0-9a-f]{32}\b", capsys.readouterr().out)[0]
    assert main(["read", "show", claimed, *_conn(embedded_stack, "cardio")]) == 0
    shown = capsys.readouterr().out
    assert "CRITICAL" in shown.upper() and "heart_rate" in shown  # the evidence is shown
    assert (
        main(["read", "report", claimed, "--text", "AF with rapid ventricular response.", "--critical", *reader]) == 0
    )
    assert main(["read", "sign", claimed, *reader]) == 0
    capsys.readouterr()

    assert embedded_stack.hub.pdfs.flush(timeout=30)  # the printed report is rendered after the signature
    out_dir, cursor_file = tmp_path / "results", tmp_path / "cursor"
    pull = [
        "results",
        "pull",
        "--cursor-file",
        str(cursor_file),
        "--out",
        str(out_dir),
        *_conn(embedded_stack, "site_a"),
    ]
    assert main(pull) == 0
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1
    result = json.loads(files[0].read_text())
    assert result["critical"] is True and result["report"]["text"].startswith("AF")
    assert cursor_file.read_text().strip() == "1"
    pdf = files[0].with_suffix(".pdf")  # the hub's printed report, beside the JSON
    assert pdf.read_bytes().startswith(b"%PDF") and result["pdf"]["size"] == str(pdf.stat().st_size)
    assert main(pull) == 0  # resumable: nothing new, nothing duplicated
    assert sorted(out_dir.glob("*.json")) == files and cursor_file.read_text().strip() == "1"
    bare = tmp_path / "no-pdf"
    assert (
        main(["results", "pull", "--cursor", "0", "--out", str(bare), "--no-pdf", *_conn(embedded_stack, "site_a")])
        == 0
    )
    assert [p.suffix for p in bare.iterdir()] == [".json"]


def test_admin_commands_issue_working_tokens(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("TELEREAD_DATA_DIR", str(tmp_path))
    assert main(["sites", "add", "clinic-z", "--lead", "county-hosp", "--name", "Clinic Z"]) == 0
    site_token = re.search(r"(tr_\S+)", capsys.readouterr().out).group(1)
    assert main(["users", "add", "dr-z", "--role", "radiologist", "--hospital", "county-hosp"]) == 0
    reader_token = re.search(r"(tr_\S+)", capsys.readouterr().out).group(1)
    assert main(["users", "add", "tech-z", "--role", "technician"]) == 2  # a technician needs --site
    stack = start_stack("embedded", make_settings(tmp_path))
    try:
        stack.tokens.update(site=site_token, reader=reader_token)
        ingest = ingest_pb2_grpc.IngestStub(stack.channel("site"))
        exam = ingest.OpenExam(ingest_pb2.OpenExamRequest(client_exam_key="k1", kind=1, priority=3), timeout=10)
        assert exam.site == "clinic-z"
        worklist = worklist_pb2_grpc.WorklistStub(stack.channel("reader"))
        assert list(worklist.ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10).exams) == []
    finally:
        for ch in stack.channels:
            ch.close()
        stack.server.stop(grace=None)
        stack.hub.close()


def test_tls_with_a_local_ca(tmp_path: Path, capsys) -> None:
    pki = tmp_path / "pki"
    assert main(["tls", "init", "--out", str(pki), "--host", "localhost", "--host", "127.0.0.1"]) == 0
    assert oct((pki / "hub.key").stat().st_mode & 0o777) == "0o600"
    settings = make_settings(tmp_path / "hub").updated(grpc__tls_cert=pki / "hub.pem", grpc__tls_key=pki / "hub.key")
    stack = start_stack("embedded", settings)
    try:
        from teleread.client import open_channel

        secure = open_channel(stack.address, token=stack.tokens["cardio"], ca_file=pki / "ca.pem")
        assert (
            not worklist_pb2_grpc.WorklistStub(secure)
            .ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=10)
            .exams
        )
        plain = grpc.insecure_channel(stack.address)
        with pytest.raises(grpc.RpcError) as err:
            worklist_pb2_grpc.WorklistStub(plain).ListWorklist(worklist_pb2.ListWorklistRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no plaintext on a TLS port
        secure.close()
        plain.close()
    finally:
        stack.server.stop(grace=None)
        stack.hub.close()


def test_read_watch_announces_a_critical_exam(embedded_stack, tmp_path: Path, capsys, monkeypatch) -> None:
    import threading

    from teleread.gateway.uploader.client import scan_paths, upload_exams

    monkeypatch.setenv("COLUMNS", "250")
    codes: list[int] = []
    # queued + critical events of one exam are enough to stop after
    watch = threading.Thread(
        target=lambda: codes.append(main(["read", "watch", "--max-events", "2", *_conn(embedded_stack, "cardio")])),
        daemon=True,
    )
    watch.start()
    seen: list[str] = []
    wait_for(lambda: seen.append(capsys.readouterr().out) or "".join(seen).strip(), timeout=10)  # subscribed
    write_synthetic_wfdb(tmp_path / "in", rhythm="brady")
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    [outcome] = upload_exams(ingest, scan_paths([tmp_path / "in"]).exams)
    watch.join(timeout=30)
    assert not watch.is_alive() and codes == [0]
    out = "".join(seen) + capsys.readouterr().out
    assert "CRITICAL" in out and outcome.exam_id[:8] in out


def test_killed_hub_leaves_no_worker_processes(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import psutil

    env = dict(os.environ, TELEREAD_DATA_DIR=str(tmp_path), TELEREAD_GRPC__PORT="0", TELEREAD_CPU_WORKERS="2")
    env["TELEREAD_HTTP__PORT"] = "0"
    hub = subprocess.Popen(
        [sys.executable, "-m", "teleread.app.cli", "serve"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert "listening" in hub.stdout.readline()
        dicomweb = hub.stdout.readline().split("DICOMweb at ", 1)[1].strip()  # the hub's HTTP port, served
        assert httpx.get(f"{dicomweb}/studies", timeout=10).status_code == 401  # and closed without a token
        workers = psutil.Process(hub.pid).children()
        assert len(workers) >= 2
    finally:
        hub.send_signal(signal.SIGKILL)
        hub.wait(timeout=10)
    deadline = time.monotonic() + 10
    while any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers):
        assert time.monotonic() < deadline, "worker processes outlived the hub"
        time.sleep(0.2)
