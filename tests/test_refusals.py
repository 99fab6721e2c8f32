"""What the hub refuses, against a real hub on loopback: one refused instance never takes its study's
valid instances down (the exam is committed incomplete, the reader and the gateway see it, the
refused file waits for a person at the clinic); a retry of refused bytes gets the original error at
once; new images of a study already uploaded open a follow-up exam linked to the first; nothing of
a refused object is left in staging or the object store."""

from __future__ import annotations

import copy
import hashlib
import io
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from teleread.app.cli import main
from teleread.db.schema import objects, refusals
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import SET_ASIDE_DIR, Outbox
from teleread.gateway.uploader.scan import scan_paths
from teleread.gateway.clinic.service import needs_a_person
from teleread.gateway.uploader.client import upload_exams
from teleread.client import RetryPolicy
from teleread.v1 import ingest_pb2, ingest_pb2_grpc, worklist_pb2, worklist_pb2_grpc

pytestmark = pytest.mark.timeout(180)

FAST = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.05)


def _ct(study: str, **attrs: Any) -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _count(stack: Any, table: Any) -> int:
    with stack.hub.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


def _staged(stack: Any) -> list[Path]:
    return list(stack.hub.settings.staging_dir().glob("*.part"))


def test_a_refused_instance_never_takes_its_study_down(hub_stack, tmp_path: Path) -> None:
    study = generate_uid()
    first = _ct(study)
    # the same instance reached the hub earlier by another route (a technician's upload)
    (upload,) = upload_exams(
        ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a")),
        scan_paths([_save(first, tmp_path / "cli" / "a.dcm")]).exams,
        retry=FAST,
    )
    assert upload.ok
    # then the modality sends the study to the gateway with that instance changed, beside two valid ones
    box = Outbox(tmp_path / "outbox")
    changed = copy.deepcopy(first)
    changed.PixelData = bytes(len(first.PixelData))
    valid = [_ct(study), _ct(study)]
    for ds in (changed, *valid):
        box.receive(io.BytesIO(_bytes(ds)), group_key=study, instance_key=str(ds.SOPInstanceUID))
    box.complete(study)
    (result,) = Forwarder(box, ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a")), retry=FAST).drain()
    assert result.outcome == "committed"  # not "rejected": the valid instances went on

    site = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam = site.GetExam(ingest_pb2.GetExamRequest(exam_id=result.detail), timeout=10)
    assert exam.incomplete and exam.refused_count == 1 and exam.object_count == 2
    (refused,) = exam.refused
    assert (refused.reason, refused.code, refused.sop_instance_uid) == (
        "INSTANCE_UID_CONFLICT",
        "ALREADY_EXISTS",
        str(first.SOPInstanceUID),
    )
    assert exam.follow_up_of == upload.exam_id  # the same study: linked to the earlier exam
    # the reader sees the exam is incomplete, and the earlier exam of the study beside it
    reader = worklist_pb2_grpc.WorklistStub(hub_stack.channel("radio"))
    from helpers import wait_for_state

    wait_for_state(site, exam.exam_id, "queued")
    wait_for_state(site, upload.exam_id, "queued")  # the earlier exam is listed beside it once it is queued too
    details = reader.GetExamDetails(worklist_pb2.GetExamDetailsRequest(exam_id=exam.exam_id), timeout=10)
    assert details.exam.incomplete and details.exam.refused_count == 1 and len(details.objects) == 2
    assert not details.exam.refused and not details.exam.stored_sha256  # the site's view only
    assert [r.exam_id for r in details.related] == [upload.exam_id]
    # the refused copy left nothing behind at the hub: a record, no bytes
    assert _count(hub_stack, refusals) == 1 and _count(hub_stack, objects) == 3 and not _staged(hub_stack)
    # the clinic: committed incomplete, the refused file set aside with its reason for a person
    status = box.status()
    assert status.incomplete == 1 and status.set_aside == 1
    assert any("set aside" in reason for reason in needs_a_person(status))
    (reason_file,) = (box.root / SET_ASIDE_DIR).glob("*.reason.txt")
    assert reason_file.read_text(encoding="utf-8").startswith("INSTANCE_UID_CONFLICT")
    (aside,) = [p for p in (box.root / SET_ASIDE_DIR).iterdir() if p.suffix == ".dcm"]
    assert aside.read_bytes() == _bytes(changed)
    box.close()


def test_a_retry_of_a_refused_file_gets_the_original_error_at_once(embedded_stack, tmp_path: Path) -> None:
    whole = _bytes(_ct(generate_uid()))
    cut = tmp_path / "in" / "cut.dcm"
    cut.parent.mkdir()
    cut.write_bytes(whole[: len(whole) - 3000])
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    (first,) = upload_exams(ingest, scan_paths([cut]).exams, retry=FAST)
    [refused] = first.refused
    assert refused.reason == "TRUNCATED"
    for _ in range(2):  # the same file again, and again: the same answer, with no wait and no bytes sent
        sleeps: list[float] = []
        started = time.monotonic()
        (again,) = upload_exams(ingest, scan_paths([cut]).exams, retry=FAST, sleep=sleeps.append)
        assert [(r.reason, r.message) for r in again.all_refused()] == [(refused.reason, refused.message)]
        assert sleeps == [] and time.monotonic() - started < 5
        assert not again.ok  # nothing valid: the exam is refused, and the client says so
    assert not _staged(embedded_stack)
    stored = embedded_stack.hub.settings.object_root()
    assert not [p for p in stored.rglob("*") if p.is_file() and ".tmp" not in p.parts]
    cut.write_bytes(whole)  # the file fixed (sent again whole): a new exam takes it
    (fixed,) = upload_exams(ingest, scan_paths([cut]).exams, retry=FAST)
    assert fixed.follow_up is not None and fixed.follow_up.ok and fixed.follow_up.objects_stored == 1
    assert fixed.follow_up.follow_up_of == ""  # not linked to the refused exam


def test_new_images_of_an_uploaded_study_open_a_linked_follow_up(
    embedded_stack, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    study = generate_uid()
    folder = tmp_path / "study"
    _save(_ct(study), folder / "1.dcm")
    conn = ["--hub", embedded_stack.address, "--token", embedded_stack.tokens["site_a"]]
    assert main(["upload", str(folder), "--site", "clinic-a", *conn]) == 0
    capsys.readouterr()
    _save(_ct(study), folder / "2.dcm")  # a new image of the same study, uploaded with the first again
    assert main(["upload", str(folder), "--site", "clinic-a", *conn]) == 0
    out = capsys.readouterr().out
    assert "went into follow-up exam" in out
    with embedded_stack.hub.engine.connect() as db:
        from teleread.db.schema import exams

        rows = db.execute(
            select(exams.c.id, exams.c.follow_up_of, exams.c.object_count).order_by(exams.c.created_at)
        ).all()
    (first_id, link0, n0), (second_id, link1, n1) = rows
    assert (link0, n0) == ("", 1) and (link1, n1) == (first_id, 1)  # the new image only, linked
    assert f"follow-up exam {second_id}" in out
    assert main(["upload", str(folder), "--site", "clinic-a", *conn]) == 0  # nothing new: no third exam
    with embedded_stack.hub.engine.connect() as db:
        assert db.execute(select(func.count()).select_from(exams)).scalar_one() == 2


def test_the_losing_copy_of_a_race_leaves_no_bytes_in_the_store(hub_stack, tmp_path: Path, monkeypatch) -> None:
    """Two uploads of one SOP Instance UID with different bytes, both past the duplicate check before
    either row exists (as when they race): the second's insert fails, it is refused as a conflict, and
    its copy in the object store is deleted; the first is untouched."""
    from teleread.storage import object_key

    first = _ct(generate_uid())
    other = copy.deepcopy(first)
    other.PixelData = bytes(len(first.PixelData))
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    (a,) = upload_exams(ingest, scan_paths([_save(first, tmp_path / "a" / "1.dcm")]).exams, retry=FAST)
    assert a.ok
    service = hub_stack.hub.ingest
    checked = service._validate

    def checked_before_the_first_row(*args: Any, **kwargs: Any) -> dict[str, object]:
        meta = checked(*args, **kwargs)
        return {**meta, "existing": False}  # what a racing upload saw

    monkeypatch.setattr(service, "_validate", checked_before_the_first_row)
    exam = scan_paths([_save(other, tmp_path / "b" / "1.dcm")]).exams[0]
    exam.client_exam_key = "racing-copy"
    (b,) = upload_exams(ingest, [exam], retry=FAST)
    assert [r.reason for r in b.refused] == ["INSTANCE_UID_CONFLICT"]
    with hub_stack.hub.engine.connect() as conn:
        site_id = conn.execute(select(objects.c.site_id)).scalar_one()
    store = hub_stack.hub.store
    assert not store.exists(object_key(tenant_id=site_id, sha256=hashlib.sha256(_bytes(other)).hexdigest()))
    assert store.exists(object_key(tenant_id=site_id, sha256=hashlib.sha256(_bytes(first)).hexdigest()))
    assert _count(hub_stack, objects) == 1 and not _staged(hub_stack)
