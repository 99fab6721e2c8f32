"""Patient data never reaches logs or error messages: a canary patient goes through ingest (valid
and malformed files) and triage, and neither the JSON logs nor the gRPC errors carry it."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import grpc
import pydicom
import pytest

from helpers import copy_testdata, error_reason, wait_for
from teleread.logs import configure_logging
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

CANARY = "PHI_CANARY_张三"
CANARY_ID = "PHI-ID-99887766"


def _dicom_with_canary(path: Path, *, corrupt: bool) -> bytes:
    ds = pydicom.dcmread(path)
    ds.PatientName = CANARY
    ds.PatientID = CANARY_ID
    ds.PatientBirthDate = "19500101"
    ds.SpecificCharacterSet = "ISO_IR 192"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if corrupt:  # a broken length right after the patient module: the parser fails near the canary
        at = data.index(CANARY.encode()) + len(CANARY.encode())
        data = data[:at] + b"\x10\x00\x30\x00DA\xff\xff" + data[at:]
    return data


def _upload(ingest, key: str, data: bytes) -> grpc.RpcError | ingest_pb2.UploadStatus:
    exam = ingest.OpenExam(
        ingest_pb2.OpenExamRequest(
            client_exam_key=key,
            kind=common_pb2.EXAM_KIND_IMAGING,
            priority=common_pb2.PRIORITY_ROUTINE,
            indication="fever",
        ),
        timeout=10,
    )
    status = ingest.BeginUpload(
        ingest_pb2.BeginUploadRequest(
            exam_id=exam.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role="dicom"
        ),
        timeout=10,
    )
    try:
        result = ingest.Upload(
            iter([ingest_pb2.UploadChunk(upload_id=status.upload_id, offset=0, data=data)]), timeout=30
        )
        ingest.CommitExam(ingest_pb2.CommitExamRequest(exam_id=exam.exam_id, expected_objects=1), timeout=10)
        wait_for(lambda: ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam.exam_id), timeout=10).state == "queued")
        return result
    except grpc.RpcError as err:
        return err


@pytest.mark.timeout(120)
def test_no_patient_data_in_logs_or_errors(embedded_stack, tmp_path: Path) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", stream=stream)
    ingest = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    ct, ecg = copy_testdata(tmp_path, "CT_small.dcm", "waveform_ecg.dcm")
    outcomes = [
        _upload(ingest, "canary-ok", _dicom_with_canary(ct, corrupt=False)),
        _upload(ingest, "canary-ecg", _dicom_with_canary(ecg, corrupt=False)),
        _upload(ingest, "canary-bad", _dicom_with_canary(ecg, corrupt=True)),
    ]
    assert isinstance(outcomes[0], ingest_pb2.UploadStatus)
    assert isinstance(outcomes[2], grpc.RpcError)  # the malformed one was refused
    assert outcomes[2].code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(outcomes[2]) == "TRUNCATED"
    logging.getLogger("teleread.test").warning("flush marker")
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert any(line.get("rpc") == "Upload" and line.get("status") for line in lines)  # logs were written
    assert all({"ts", "level", "msg"} <= set(line) for line in lines)
    for needle in (CANARY, CANARY_ID, "19500101", "PHI_CANARY"):
        assert needle not in text
        for outcome in outcomes:
            if isinstance(outcome, grpc.RpcError):
                assert needle not in (outcome.details() or "")
                assert needle not in str(outcome.trailing_metadata())
