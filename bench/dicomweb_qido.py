"""QIDO-RS over 10,000 studies with a date range: the hub's DICOMweb query latency on PostgreSQL.

Run from the repository root: ``.venv/bin/python -m bench.dicomweb_qido [--studies N] [--queries N] [--json PATH]``.

A private PostgreSQL cluster gets the hub's schema and 10,000 CT studies of one site (bulk-inserted:
exams, their ``dicom_studies`` and ``dicom_series`` rows and 3 instances each, study dates spread
over two years), then ``ANALYZE``. The hub's DICOMweb app runs in this process (uvicorn on
loopback, its production code and authenticator), and a client (httpx, one connection) asks
``/dicomweb/studies?StudyDate=A-B`` with a random 30-day range, one request after another, first
as the site and then as a radiologist of its lead hospital (whose scope is a join on the exams).
Printed: p50 / p95 / p99 per caller. Target: p95 <= 100 ms.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console

from bench import _backends
from bench._report import Figure, machine, machine_line, print_table, save_json

console = Console()


def _bulk(url: str, *, studies: int, rng: random.Random) -> dict[str, str]:
    from sqlalchemy import insert, text

    from teleread.auth import Role, add_principal, add_site
    from teleread.db.engine import make_engine, upgrade, utcnow
    from teleread.db.schema import dicom_series, dicom_studies, exams, objects

    upgrade(url)
    engine = make_engine(url)
    site_id = add_site(engine, code="bench-site", name="Benchmark clinic", lead_hospital="bench-hosp")
    tokens = {
        "site": add_principal(engine, name="bench-site", role=Role.SITE, site_code="bench-site"),
        "radiologist": add_principal(engine, name="bench-radio", role=Role.RADIOLOGIST, hospital="bench-hosp"),
    }
    now, first = utcnow(), dt.date(2025, 1, 1)
    exam_rows, study_rows, series_rows, object_rows = [], [], [], []
    for n in range(studies):
        exam_id, study, series = uuid.uuid4().hex, f"1.2.826.0.1.{n + 1}", f"1.2.826.0.2.{n + 1}"
        date = (first + dt.timedelta(days=rng.randrange(730))).strftime("%Y%m%d")
        exam_rows.append({
            "id": exam_id, "site_id": site_id, "client_exam_key": f"bench-{n}", "kind": "imaging", "modality": "CT",
            "study_instance_uid": study, "state": "queued", "priority": "routine", "indication": "",
            "specialty": "radiology", "hospital": "bench-hosp", "level": "routine", "level_rank": 3, "score": 1.0,
            "deadline": now, "received_at": now, "object_count": 3, "created_at": now, "updated_at": now,
            "patient_id": f"P{n % 3000}", "patient_name": f"Patient^{n % 3000}",
        })  # fmt: skip
        study_rows.append({
            "site_id": site_id, "study_instance_uid": study, "exam_id": exam_id, "study_date": date,
            "study_time": "101500", "accession_number": f"A{n}", "study_description": "CT CHEST", "study_id": str(n),
            "created_at": now,
        })  # fmt: skip
        series_rows.append({
            "site_id": site_id, "study_instance_uid": study, "series_instance_uid": series, "modality": "CT",
            "series_number": 1, "series_description": "Axial", "body_part_examined": "CHEST", "series_date": date,
            "series_time": "101500", "created_at": now,
        })  # fmt: skip
        for k in range(3):
            object_rows.append({
                "id": uuid.uuid4().hex, "exam_id": exam_id, "site_id": site_id, "role": "dicom",
                "sha256": f"{n:060d}{k:04d}", "size": 1, "storage_key": f"bench/{n}/{k}",
                "sop_instance_uid": f"1.2.826.0.3.{n + 1}.{k + 1}", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                "series_instance_uid": series, "modality": "CT", "created_at": now, "study_instance_uid": study,
                "instance_number": k + 1, "pixel_rows": 512, "pixel_columns": 512, "number_of_frames": 1,
                "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            })  # fmt: skip
    with engine.begin() as conn:
        for table, rows in ((exams, exam_rows), (dicom_studies, study_rows), (dicom_series, series_rows),
                            (objects, object_rows)):  # fmt: skip
            for start in range(0, len(rows), 5000):
                conn.execute(insert(table), rows[start : start + 5000])
    with engine.begin() as conn:
        for table in ("exams", "dicom_studies", "dicom_series", "objects"):
            conn.execute(text(f"ANALYZE {table}"))
    engine.dispose()
    return tokens


def _measure(base: str, token: str, *, queries: int, rng: random.Random) -> tuple[list[float], list[int]]:
    first = dt.date(2025, 1, 1)
    latencies, counts = [], []
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        client.get(f"{base}/studies", params={"limit": 1})  # warm: the token, the connection
        for _ in range(queries):
            start = first + dt.timedelta(days=rng.randrange(700))
            span = f"{start:%Y%m%d}-{start + dt.timedelta(days=30):%Y%m%d}"
            began = time.perf_counter()
            answer = client.get(f"{base}/studies", params={"StudyDate": span})
            latencies.append(time.perf_counter() - began)
            answer.raise_for_status()
            counts.append(len(answer.json()))
    return latencies, counts


def run(studies: int, queries: int) -> tuple[list[Figure], dict[str, Any]]:
    from teleread.auth import Authenticator
    from teleread.db.engine import make_engine
    from teleread.reader.hub.dicomweb import DicomwebServer, create_app

    rng = random.Random(20261203)
    pg = _backends.PgCluster(Path(tempfile.mkdtemp(prefix="teleread-bench-pg-")))
    pg.start()
    figures, extra = [], {}
    try:
        url = pg.new_database()
        console.log(f"inserting {studies} studies")
        tokens = _bulk(url, studies=studies, rng=rng)
        engine = make_engine(url)
        web = DicomwebServer(create_app(engine, Authenticator(engine).authenticate), host="127.0.0.1", port=0)
        web.start()
        try:
            for who in ("site", "radiologist"):
                latencies, counts = _measure(web.url, tokens[who], queries=queries, rng=rng)
                ms = np.array(latencies) * 1000
                p50, p95, p99 = (float(np.percentile(ms, q)) for q in (50, 95, 99))
                detail = (f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms ({queries} queries, "
                          f"{np.mean(counts):.0f} studies per answer on average, limit 100)")  # fmt: skip
                figures.append(Figure(f"QIDO studies, 30-day StudyDate range, {studies} studies", f"postgresql, {who}",
                                      1, p95, "ms", detail, target=100.0, higher_is_better=False))  # fmt: skip
                extra[who] = {"p50": p50, "p95": p95, "p99": p99, "mean_count": float(np.mean(counts))}
        finally:
            web.stop()
            engine.dispose()
    finally:
        pg.stop()
    return figures, extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    args = parser.parse_args()
    info = machine()
    figures, extra = run(args.studies, args.queries)
    print_table(figures, info, console)
    console.print(machine_line(info))
    if args.json:
        save_json(args.json, figures=figures, info=info, extra=extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
