"""Triage workers: take committed exams, measure and classify them, and queue them for reading.

Dispatcher threads inside the hub batch the waiting exams; the CPU work (loading, measuring, the
learned models, fusion: :mod:`teleread.models.inference.pipeline`) runs in the hub's triage worker processes.
An exam whose ECG cannot be measured, or whose triage fails for any reason, is still queued (a
human must read it) with a finding that says so, at least at the urgency the clinic requested.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from sqlalchemy import Engine, select

from teleread.db.engine import reading
from teleread.db.schema import exams, objects
from teleread.cpu import CpuPool
from teleread.models.inference import fusion, pipeline, triage
from teleread.vocab import ExamState

log = logging.getLogger("teleread.triage")


CHEST_MODALITIES = frozenset({"CR", "DX"})
MAX_BATCH = 4
CHEST_IMAGES = 2


class TriageWorker:
    """Dispatcher threads take committed exams off a queue, several at a time when several wait.

    Each dispatcher drains up to ``MAX_BATCH`` waiting exams and sends the ECGs, and the chest
    radiographs, to one CPU-worker call each (the models run once over the batch). A batch that
    fails is retried exam by exam so one bad exam cannot hold the others; an exam whose triage
    still fails is queued anyway with a finding that says so (a human must read it).
    """

    def __init__(
        self,
        *,
        engine: Engine,
        store: Any,
        on_triaged: Callable[[Any, triage.TriageResult], dict[str, Any]],
        workers: int = 2,
        rules_path: Path | None = None,
        policy_path: Path | None = None,
        cpu: CpuPool | None = None,
        max_batch: int = MAX_BATCH,
        on_measured: Callable[[str, dict[str, Any]], None] | None = None,
        measure_cpu: CpuPool | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._on_triaged = on_triaged  # the reading queue takes the result in (and owns the exam's state)
        self._rules_path = str(rules_path) if rules_path else None
        self._policy_path = str(policy_path) if policy_path else None
        self._rules = triage.load_rules(rules_path)
        self._policy = fusion.load_policy(policy_path)
        self._cpu = cpu or CpuPool(0)
        self._max_batch = max(1, max_batch)
        self._waiting: queue.Queue[str | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._dispatch, name=f"triage-{i}", daemon=True) for i in range(max(1, workers))
        ]
        # The second pass: an ECG's PR, QT and axes for the reader, after it is queued, on the
        # (lower-priority) pool given, so a flood of ECGs never delays the next one's triage.
        self._on_measured = on_measured
        self._measure_cpu = measure_cpu or self._cpu
        self._measuring: queue.Queue[list[str] | None] = queue.Queue()
        if on_measured is not None:
            self._threads.append(threading.Thread(target=self._measure, name="ecg-intervals", daemon=True))
        for t in self._threads:
            t.start()

    def submit(self, exam_id: str) -> None:
        self._waiting.put(exam_id)

    def recover(self) -> int:
        """Re-submit exams committed but not yet triaged (after a restart)."""
        with reading(self._engine) as conn:
            ids = [r.id for r in conn.execute(select(exams.c.id).where(exams.c.state == ExamState.RECEIVED))]
        for exam_id in ids:
            self.submit(exam_id)
        return len(ids)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._waiting.put(None)
        self._measuring.put(None)
        for t in self._threads:
            t.join()

    def _measure(self) -> None:
        while (exam_ids := self._measuring.get()) is not None:
            try:
                self.measure_intervals(exam_ids)
            except Exception as exc:  # the exam is queued and readable; only its PR/QT/axes are missing
                log.warning("ECG intervals failed", extra={"count": len(exam_ids), "reason": type(exc).__name__})

    def measure_intervals(self, exam_ids: Sequence[str]) -> None:
        """Measure triaged ECGs in full (PR, QT, QTc, axes) and hand the results to ``on_measured``."""
        assert self._on_measured is not None
        with reading(self._engine) as conn:
            rows = conn.execute(select(exams).where(exams.c.id.in_(list(exam_ids)), exams.c.kind == "ecg")).all()
            objs: dict[str, list[Any]] = {r.id: [] for r in rows}
            for o in conn.execute(select(objects).where(objects.c.exam_id.in_(list(objs)))):
                objs[o.exam_id].append(o)
        if not rows:
            return
        with tempfile.TemporaryDirectory(prefix="teleread-intervals-") as tmp:
            items = [{"files": self._fetch_ecg(objs[r.id], Path(tmp))} for r in rows]
            out = self._measure_cpu.run(pipeline.ecg_intervals_batch, items)
        for row, summary in zip(rows, out):
            if summary is not None:
                self._on_measured(row.id, summary)

    def _dispatch(self) -> None:
        while True:
            first = self._waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    nxt = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # shutting down: finish this batch, then stop
                    self._waiting.put(None)
                    break
                batch.append(nxt)
            try:
                self.process_batch(batch)
            except Exception as exc:  # never let the dispatcher die; log the type only, never the text
                log.error("triage failed", extra={"count": len(batch), "reason": type(exc).__name__})

    def process(self, exam_id: str) -> dict[str, Any]:
        """Triage and queue one exam now (the dispatcher's path with a batch of one)."""
        return self.process_batch([exam_id]).get(exam_id, {})

    def process_batch(self, exam_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with reading(self._engine) as conn:
            rows = conn.execute(
                select(exams).where(exams.c.id.in_(list(exam_ids)), exams.c.state == ExamState.RECEIVED)
            ).all()
            objs: dict[str, list[Any]] = {r.id: [] for r in rows}
            for o in conn.execute(select(objects).where(objects.c.exam_id.in_(list(objs)))):
                objs[o.exam_id].append(o)
        ecg = [r for r in rows if r.kind == "ecg"]
        chest = [r for r in rows if r.kind != "ecg" and (r.modality or "").upper() in CHEST_MODALITIES]
        other = [r for r in rows if r.kind != "ecg" and r not in chest]
        results: dict[str, Any] = {}
        for exam in other:  # request rules only: cheap, no files; no model applies, and triage says so
            scored = triage.image_findings(
                modality=exam.modality, priority=exam.priority, indication=exam.indication, rules=self._rules
            )
            results[exam.id] = fusion.fuse_chest(
                scored,
                f"modality {(exam.modality or '?').upper()}",
                None,
                rules=self._rules,
                policy=self._policy,
                context=f"{(exam.modality or 'imaging').upper()} request.",
            )
        for group, fn in ((ecg, pipeline.triage_ecg_batch), (chest, pipeline.triage_chest_batch)):
            if group:
                results.update(self._run_group(group, objs, fn))
        queued = {exam.id: self._on_triaged(exam, results[exam.id]) for exam in rows}
        if self._on_measured is not None and ecg:
            self._measuring.put([exam.id for exam in ecg])
        return queued

    def _run_group(self, group: Sequence[Any], objs: dict[str, list[Any]], fn: Any) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="teleread-triage-") as tmp:
            items = [self._item(exam, objs[exam.id], Path(tmp)) for exam in group]
            try:
                out = self._cpu.run(fn, items, rules_path=self._rules_path, policy_path=self._policy_path)
                return {exam.id: triage.TriageResult.from_dict(r) for exam, r in zip(group, out)}
            except Exception as exc:
                if len(group) > 1:  # find the bad exam: one at a time
                    log.warning("triage batch failed; retrying one by one", extra={"reason": type(exc).__name__})
                    return {k: v for exam in group for k, v in self._run_group([exam], objs, fn).items()}
                reason = getattr(exc, "reason", type(exc).__name__)
                log.error("triage failed; queued for manual reading", extra={"exam_id": group[0].id, "reason": reason})
                exam = group[0]
                if exam.kind != "ecg":  # the image model failed: the request rules still apply
                    return {
                        exam.id: triage.triage_image(
                            modality=exam.modality,
                            priority=exam.priority,
                            indication=exam.indication,
                            rules=self._rules,
                        )
                    }
                return {exam.id: triage.unmeasurable_ecg(priority=exam.priority, reason=str(reason), rules=self._rules)}

    def _item(self, exam: Any, objs: Sequence[Any], folder: Path) -> dict[str, Any]:
        item: dict[str, Any] = {"priority": exam.priority, "indication": exam.indication, "modality": exam.modality}
        if exam.kind == "ecg":
            item["files"] = self._fetch_ecg(objs, folder)
        else:  # a chest radiograph exam: its first images (PA, lateral)
            item["files"] = [self._fetch(o, folder) for o in sorted(objs, key=lambda o: o.id)[:CHEST_IMAGES]]
        return item

    def _fetch(self, o: Any, folder: Path) -> str:
        """Copy one object out of the store (hash-verified) for the CPU worker."""
        dest = folder / f"{o.id}.{o.role}"
        with self._store.open_verified(o.storage_key, sha256=o.sha256, size=o.size) as src, open(dest, "wb") as out:
            while block := src.read(1024 * 1024):
                out.write(block)
        return str(dest)

    def _fetch_ecg(self, objs: Sequence[Any], folder: Path) -> dict[str, str]:
        paths: dict[str, str] = {}
        for o in objs:
            if o.role not in paths:
                paths[o.role] = self._fetch(o, folder)
        return paths
