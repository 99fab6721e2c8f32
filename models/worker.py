"""Triage workers: take committed exams, measure and classify them, and queue them for reading.

Runs in a thread pool inside the hub. An exam whose ECG cannot be measured, or whose triage fails
for any reason, is still queued (a human must read it) with a finding that says so, at least at
the urgency the clinic requested.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import Engine, select, update

from teleread.db.engine import as_utc, reading, utcnow
from teleread.db.schema import exams, objects
from teleread.cpu import CpuPool
from teleread.errors import TelereadError
from teleread.events import EventBus, record_event
from teleread.models import triage
from teleread.reader.routing import LEVEL_RANK, Routing

log = logging.getLogger("teleread.triage")


class TriageWorker:
    def __init__(
        self,
        *,
        engine: Engine,
        store: Any,
        routing: Routing,
        bus: EventBus,
        workers: int = 2,
        rules_path: Path | None = None,
        cpu: CpuPool | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._routing = routing
        self._bus = bus
        self._rules_path = rules_path
        self._rules = triage.load_rules(rules_path)
        self._cpu = cpu or CpuPool(0)
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="triage")

    def submit(self, exam_id: str) -> None:
        self._pool.submit(self._safe_process, exam_id)

    def recover(self) -> int:
        """Re-submit exams committed but not yet triaged (after a restart)."""
        with reading(self._engine) as conn:
            ids = [r.id for r in conn.execute(select(exams.c.id).where(exams.c.state == "received"))]
        for exam_id in ids:
            self.submit(exam_id)
        return len(ids)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)

    def _safe_process(self, exam_id: str) -> None:
        try:
            self.process(exam_id)
        except Exception as exc:  # the pool would swallow it: log the type only, never the text
            log.error("triage failed", extra={"exam_id": exam_id, "reason": type(exc).__name__})

    def process(self, exam_id: str) -> dict[str, Any]:
        with reading(self._engine) as conn:
            exam = conn.execute(select(exams).where(exams.c.id == exam_id)).one()
            objs = conn.execute(select(objects).where(objects.c.exam_id == exam_id)).all()
        if exam.state != "received":
            return {}
        result = self._triage(exam, objs)
        return self._queue(exam, result)

    def _triage(self, exam: Any, objs: Sequence[Any]) -> Any:
        if exam.kind != "ecg":  # request rules only: cheap, no files
            return triage.triage_image(
                modality=exam.modality, priority=exam.priority, indication=exam.indication, rules=self._rules
            )
        with tempfile.TemporaryDirectory(prefix="teleread-triage-") as tmp:
            files = self._fetch(objs, Path(tmp))
            result = self._cpu.run(
                triage_ecg_files,
                files=files,
                priority=exam.priority,
                indication=exam.indication,
                rules_path=str(self._rules_path) if self._rules_path else None,
            )
        return triage.TriageResult.from_dict(result)

    def _fetch(self, objs: Sequence[Any], folder: Path) -> dict[str, str]:
        """Copy the exam's ECG objects out of the store (hash-verified) for the CPU worker."""
        paths: dict[str, str] = {}
        for o in objs:
            if o.role in paths:
                continue
            dest = folder / f"{o.id}.{o.role}"
            with self._store.open_verified(o.storage_key, sha256=o.sha256, size=o.size) as src, open(dest, "wb") as out:
                while block := src.read(1024 * 1024):
                    out.write(block)
            paths[o.role] = str(dest)
        return paths

    def _queue(self, exam: Any, result: Any) -> dict[str, Any]:
        level = result.level
        arrived = as_utc(exam.received_at) or utcnow()
        deadline = self._routing.deadline(level=level, arrived=arrived)
        with self._engine.begin() as conn:
            changed = conn.execute(
                update(exams)
                .where(exams.c.id == exam.id, exams.c.state == "received")
                .values(
                    state="queued",
                    level=level,
                    level_rank=LEVEL_RANK[level],
                    score=float(result.score),
                    triage_json=json.dumps(result.to_dict(), ensure_ascii=False),
                    deadline=deadline,
                    updated_at=utcnow(),
                )
            ).rowcount
            if changed:
                for kind in ("triaged", "queued") + (("critical",) if level == "critical" else ()):
                    record_event(
                        conn,
                        type=kind,
                        exam_id=exam.id,
                        site_id=exam.site_id,
                        hospital=exam.hospital,
                        specialty=exam.specialty,
                        detail={"level": level} if kind != "triaged" else {"rules": result.rules_version},
                    )
        self._bus.publish()
        log.info("exam queued", extra={"exam_id": exam.id, "level": level})
        return {"level": level, "deadline": deadline}


@functools.lru_cache(maxsize=4)
def _rules(path: str | None) -> Any:
    return triage.load_rules(Path(path) if path else None)


def triage_ecg_files(
    *, files: dict[str, str], priority: str, indication: str, rules_path: str | None
) -> dict[str, Any]:
    """Load, measure and classify one ECG from files (runs in a CPU worker process)."""
    from teleread import ecgio
    from teleread.models import ecg_measure

    rules = _rules(rules_path)
    try:
        if "wfdb_header" in files and "wfdb_signal" in files:
            signal = ecgio.load_ecg_wfdb(Path(files["wfdb_header"]), Path(files["wfdb_signal"]))
        else:
            signal = ecgio.load_ecg_dicom(Path(files["dicom"]))
        m = ecg_measure.measure_ecg(signal.signal_mv, fs=signal.fs, lead_names=signal.lead_names)
    except TelereadError as exc:
        log.warning("ECG not measurable", extra={"reason": exc.reason})
        return triage.unmeasurable_ecg(priority=priority, reason=exc.reason, rules=rules).to_dict()
    return triage.triage_ecg(m, rules=rules, priority=priority, indication=indication).to_dict()
