"""The learned models in the running hub, over real gRPC on both deployments: an ECG, a chest
radiograph and a CT go from upload to the queue; triage names the models it used, the chest model
says which regions it weighed, and the CT says no model applies instead of guessing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from helpers import copy_testdata, datasets_dir, wait_for, write_chest_dx, write_synthetic_wfdb
from teleread.gateway.uploader.client import scan_paths, upload_exams
from teleread.models.inference import registry
from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

pytestmark = pytest.mark.timeout(240)


def _pneumonia_image() -> np.ndarray:
    d = np.load(datasets_dir() / "pneumoniamnist-test-eval.npz")
    model = registry.get("chest_pneumonia")
    probs = model.probabilities(d["images"])
    # the clearest pneumonia case: the model should flag it whichever way it is delivered
    idx = np.flatnonzero(d["labels"] == 1)
    return d["images"][idx[np.argmax(probs[idx])]]


def test_models_triage_exams_in_the_hub(hub_stack, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    copy_testdata(inputs / "ct", "CT_small.dcm")
    write_synthetic_wfdb(inputs / "ecg", rhythm="af_rvr")
    write_chest_dx(inputs / "cxr" / "cxr.dcm", _pneumonia_image(), size=1024, photometric="MONOCHROME1")
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    scan = scan_paths([inputs])
    assert len(scan.exams) == 3 and not scan.skipped
    outcomes = upload_exams(ingest, scan.exams, priority="routine", indication="")
    assert all(o.exam_id and not o.errors for o in outcomes), [o.errors for o in outcomes]

    def queued(exam_id: str) -> ingest_pb2.GetExamRequest | None:
        exam = ingest.GetExam(ingest_pb2.GetExamRequest(exam_id=exam_id), timeout=10)
        return exam if exam.state == "queued" else None

    exams = {e.modality: e for e in (wait_for(lambda i=o.exam_id: queued(i), timeout=90) for o in outcomes)}
    assert sorted(exams) == ["CT", "DX", "ECG"]

    ecg = exams["ECG"].triage
    assert set(ecg.models) == {registry.card(n).label for n in ("ecg_rhythm", "ecg_12lead")}
    assert ecg.level in (common_pb2.LEVEL_CRITICAL, common_pb2.LEVEL_URGENT)
    codes = {f.code for f in ecg.findings}
    assert codes & {"ecg.model.af", "ecg.model.rhythm"}

    cxr = exams["DX"].triage
    assert list(cxr.models) == [registry.card("chest_pneumonia").label]
    flag = next(f for f in cxr.findings if f.code == "image.model.pneumonia")
    assert flag.level == common_pb2.LEVEL_URGENT
    names = [e.name for e in flag.evidence]
    assert names[0] == "p_pneumonia" and any(n.startswith("weight ") and "zone" in n for n in names[1:])

    ct = exams["CT"].triage
    assert not ct.models
    assert any(f.code == "image.model.none" and "CT" in f.title for f in ct.findings)
