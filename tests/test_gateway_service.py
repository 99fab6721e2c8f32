"""The gateway as one process: a modality (dcmtk storescu) pushes a study; after the quiet period
the gateway forwards it to the hub with no manual step; `teleread gateway status` reports and
exits non-zero only when a person is needed."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
from pathlib import Path

import pytest

from helpers import copy_testdata, wait_for, write_synthetic_wfdb
from teleread.app.cli import main
from teleread.gateway.clinic.outbox import Outbox, OutboxStatus
from teleread.gateway.clinic.service import Gateway, needs_a_person
from teleread.settings import GatewaySettings, Settings
from teleread.v1 import ingest_pb2_grpc, results_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def test_gateway_forwards_a_pushed_study_without_a_manual_step(embedded_stack, tmp_path: Path, capsys) -> None:
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(dicom_host="127.0.0.1", dicom_port=0, quiet_seconds=0.3, poll_seconds=0.05),
    )
    site = embedded_stack.channel("site_a")
    gw = Gateway(settings, ingest=ingest_pb2_grpc.IngestStub(site), results=results_pb2_grpc.ResultsStub(site)).start()
    try:
        files = copy_testdata(tmp_path / "in", "CT_small.dcm", "waveform_ecg.dcm")
        sent = subprocess.run(
            ["storescu", "-aec", "TELEREAD_GW", "127.0.0.1", str(gw.scp.port), *map(str, files)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin"},
        )
        assert sent.returncode == 0, sent.stderr[-400:]
        wait_for(lambda: gw.outbox.status().by_state["committed"] == 2, timeout=60)
    finally:
        gw.stop()
    assert (tmp_path / "results").is_dir() and not any((tmp_path / "results").glob("*.json"))  # none signed yet
    assert main(["gateway", "status", "--outbox", str(tmp_path / "gateway")]) == 0
    out = capsys.readouterr().out
    assert "committed 2" in out and "bytes waiting: 0" in out and "link: up since" in out


def test_status_exit_code_names_what_needs_a_person(tmp_path: Path, capsys) -> None:
    box = Outbox(tmp_path / "gw")

    obj = box.receive(io.BytesIO(b"x"), group_key="1.2", instance_key="1.2.1")
    box.complete("1.2")
    taken = box.claim_next()
    assert taken is not None and taken.id == obj.exam_id
    box.rejected(obj.exam_id, "INVALID_ARGUMENT: not DICOM")
    box.close()
    assert main(["gateway", "status", "--outbox", str(tmp_path / "gw")]) == 1
    out = capsys.readouterr().out
    assert "rejected 1" in out and "NEEDS ATTENTION" in out and "not DICOM" in out
    old = OutboxStatus({"ready": 1}, 10, "2026-11-23T08:00:00+00:00", "")
    now = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.timezone.utc)
    assert needs_a_person(old, now) == ["the oldest waiting study has waited 120 min"]
    assert needs_a_person(OutboxStatus({"ready": 1}, 10, "2026-11-23T09:30:00+00:00", ""), now) == []


def test_a_record_dropped_in_the_watch_folder_reaches_the_hub_and_a_bad_file_needs_a_person(
    embedded_stack, tmp_path: Path, capsys
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        gateway=GatewaySettings(
            dicom_host="127.0.0.1", dicom_port=0, quiet_seconds=0.3, poll_seconds=0.05, watch_settle_seconds=0.2
        ),
    )
    site = embedded_stack.channel("site_a")
    gw = Gateway(settings, ingest=ingest_pb2_grpc.IngestStub(site), results=results_pb2_grpc.ResultsStub(site)).start()
    watch = tmp_path / "watch"
    try:
        hea, dat = write_synthetic_wfdb(tmp_path / "cart", rhythm="brady", name="ecg-0042")
        (watch / dat.name).write_bytes(dat.read_bytes())  # the signal first, as a cart's copy may do
        (watch / hea.name).write_bytes(hea.read_bytes())
        (watch / "scan.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01" * 40)  # not a whole DICOM file
        wait_for(lambda: gw.outbox.status().by_state["committed"] == 1, timeout=60)
        wait_for(lambda: (watch / "rejected" / "scan.dcm").exists(), timeout=30)
    finally:
        gw.stop()
    assert not (watch / hea.name).exists() and not (watch / dat.name).exists()  # taken, durable in the outbox
    box = Outbox(tmp_path / "gateway")
    (exam,) = [box.exam(r) for r in _exam_ids(tmp_path / "gateway")]
    box.close()
    assert exam.kind == "ecg" and exam.hub_exam_id and exam.group_key.startswith("wfdb:")
    code = main(["gateway", "status", "--outbox", str(tmp_path / "gateway"), "--watch-dir", str(watch)])
    out = capsys.readouterr().out
    assert code == 1 and "1 dropped file(s) refused" in out and "(1 refused)" in out


def _exam_ids(outbox: Path) -> list[str]:
    import sqlite3

    db = sqlite3.connect(outbox / "outbox.db")
    try:
        return [r[0] for r in db.execute("SELECT id FROM exams")]
    finally:
        db.close()


def test_echo_and_send_check_a_clinics_set_up_against_the_receiver(tmp_path: Path, capsys) -> None:
    from teleread.gateway.clinic.scp import ScpConfig, StoreScp

    box = Outbox(tmp_path / "outbox")
    scp = StoreScp(box, ScpConfig(port=0)).start()
    try:
        port = str(scp.port)
        assert main(["gateway", "echo", "--port", port]) == 0
        files = copy_testdata(tmp_path / "in", "CT_small.dcm", "waveform_ecg.dcm")
        (tmp_path / "in" / "notes.txt").write_text("not an image")
        assert main(["gateway", "send", "--port", port, str(tmp_path / "in" / "notes.txt")]) == 1
        assert "notes.txt is not a readable DICOM file" in capsys.readouterr().out
        assert main(["gateway", "send", "--port", port, *map(str, files)]) == 0
        assert "2 of 2 stored" in capsys.readouterr().out
        assert box.status().by_state["collecting"] == 2
    finally:
        scp.stop()
        box.close()
    assert main(["gateway", "echo", "--port", port]) == 1  # nobody answers now
    assert "no association" in capsys.readouterr().out
