"""Triage of batches of exams from their files: runs in the hub's CPU worker processes.

``triage_ecg_batch`` loads and measures each ECG, runs the learned models once over the whole
batch (the rhythm model on up to three leads of each record, the 12-lead model on records with
enough standard leads) and fuses everything per exam. ``triage_chest_batch`` does the same for
chest radiographs. Models load lazily, once per process, through the registry; a model that cannot
load is named in the result and triage falls back to the rules, never to silence.
"""

from __future__ import annotations

import dataclasses

import functools
import logging
import multiprocessing
from pathlib import Path
from typing import Any, Sequence

from teleread.errors import TelereadError
from teleread.models.inference import fusion, registry, triage
from teleread.models.inference.ecg_rules import RuleSet

log = logging.getLogger("teleread.triage")

TWELVE_LEADS = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")


@functools.lru_cache(maxsize=4)
def _rules(path: str | None) -> RuleSet:
    return triage.load_rules(Path(path) if path else None)


@functools.lru_cache(maxsize=4)
def _policy(path: str | None) -> fusion.FusionPolicy:
    return fusion.load_policy(Path(path) if path else None)


@functools.lru_cache(maxsize=1)
def _threads() -> None:
    # Inside a worker process each process gets one core's worth of threads; in-process use is left alone.
    if multiprocessing.parent_process() is not None:
        import torch

        torch.set_num_threads(1)


def model(name: str) -> tuple[Any, str]:
    """(predictor, "") or (None, "name: reason") when it cannot be loaded."""
    _threads()
    try:
        return registry.get(name), ""
    except TelereadError as exc:
        log.warning("model unavailable", extra={"model": name, "reason": exc.reason})
        return None, f"{name}: {exc.message}"


def _has_12(lead_names: Sequence[str], minimum: int) -> bool:
    from teleread.models.inference.ecg_measure import canonical_lead_name  # scipy/wfdb: only in the worker processes

    names = {canonical_lead_name(n).upper() for n in lead_names}
    return sum(1 for lead in TWELVE_LEADS if lead in names) >= minimum


def _load(files: dict[str, str]) -> Any:
    from teleread import ecgio

    if "wfdb_header" in files and "wfdb_signal" in files:
        return ecgio.load_ecg_wfdb(Path(files["wfdb_header"]), Path(files["wfdb_signal"]))
    return ecgio.load_ecg_dicom(Path(files["dicom"]))


def triage_ecg_batch(
    items: Sequence[dict[str, Any]], *, rules_path: str | None = None, policy_path: str | None = None
) -> list[dict[str, Any]]:
    """Triage ECGs; each item has ``files`` (role -> path), ``priority`` and ``indication``."""
    from teleread.models.inference import ecg_measure

    rules, policy = _rules(rules_path), _policy(policy_path)
    results: list[dict[str, Any] | None] = [None] * len(items)
    measured: list[tuple[int, Any, Any]] = []
    for i, item in enumerate(items):
        try:
            signal = _load(item["files"])
            m = ecg_measure.measure_ecg(signal.signal_mv, fs=signal.fs, lead_names=signal.lead_names, intervals=False)
        except TelereadError as exc:
            log.warning("ECG not measurable", extra={"reason": exc.reason})
            results[i] = triage.unmeasurable_ecg(priority=item["priority"], reason=exc.reason, rules=rules).to_dict()
            continue
        measured.append((i, signal, m))
    outputs = ecg_model_outputs([s for _, s, _ in measured], policy=policy)
    for (i, _signal, m), out in zip(measured, outputs):
        item = items[i]
        scored = triage.ecg_findings(m, rules=rules, priority=item["priority"], indication=item["indication"])
        fused = fusion.fuse_ecg(scored, out, rules=rules, policy=policy, context=triage.ecg_context(m))
        results[i] = dataclasses.replace(fused, ecg=m.summary()).to_dict()
    return [r for r in results if r is not None]


def ecg_intervals_batch(items: Sequence[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """The full measurements of ECGs already triaged (``files``: role -> path), with PR, QT, QTc and
    the axes, as ``EcgSummary`` dicts; None for one that cannot be measured (triage said so)."""
    from teleread.models.inference import ecg_measure

    out: list[dict[str, Any] | None] = []
    for item in items:
        try:
            signal = _load(item["files"])
            m = ecg_measure.measure_ecg(signal.signal_mv, fs=signal.fs, lead_names=signal.lead_names)
        except TelereadError as exc:
            log.info("ECG intervals not measurable", extra={"reason": exc.reason})
            out.append(None)
            continue
        out.append(m.summary().to_dict())
    return out


def ecg_model_outputs(signals: Sequence[Any], *, policy: fusion.FusionPolicy) -> list[fusion.ModelOutputs]:
    """The learned models' outputs for loaded ECG signals (``ecgio.EcgSignal``), batched per model."""
    if not signals:
        return []
    rhythm, rhythm_problem = model("ecg_rhythm")
    twelve, twelve_problem = model("ecg_12lead")
    rhythm_out: list[Any] = [None] * len(signals)
    if rhythm is not None:
        for i, s in enumerate(signals):
            rhythm_out[i] = rhythm.predict_leads(s.signal_mv, s.fs, list(s.lead_names))
    twelve_out: list[Any] = [None] * len(signals)
    if twelve is not None:
        idx = [i for i, s in enumerate(signals) if _has_12(s.lead_names, policy.min_leads_12)]
        batch = twelve.predict_batch([(signals[i].signal_mv, signals[i].fs, list(signals[i].lead_names)) for i in idx])
        for i, pred in zip(idx, batch):
            twelve_out[i] = pred
    problems = tuple(p for p in (rhythm_problem, twelve_problem) if p)
    return [
        fusion.ModelOutputs(
            rhythm=rhythm_out[i],
            rhythm_card=rhythm.card if rhythm is not None else None,
            twelve=twelve_out[i],
            twelve_card=twelve.card if twelve is not None else None,
            unavailable=problems,
        )
        for i in range(len(signals))
    ]


def triage_chest_batch(
    items: Sequence[dict[str, Any]], *, rules_path: str | None = None, policy_path: str | None = None
) -> list[dict[str, Any]]:
    """Triage chest radiographs; each item has ``files`` (list of DICOM paths), ``modality``,
    ``priority`` and ``indication``. The highest probability over an exam's applicable images counts."""
    import pydicom

    rules, policy = _rules(rules_path), _policy(policy_path)
    chest, problem = model("chest_pneumonia")
    results = []
    for item in items:
        scored = triage.image_findings(
            modality=item["modality"], priority=item["priority"], indication=item["indication"], rules=rules
        )
        context = f"{str(item['modality']).upper() or 'imaging'} request."
        prediction: Any = None
        if chest is None:
            prediction = f"model unavailable: {problem}"
        else:
            reason = "no image"
            for path in item["files"]:
                try:
                    ds = pydicom.dcmread(path)
                    pred = chest.predict_dicom(ds)
                except TelereadError as exc:
                    reason = f"image not usable: {exc.reason}"
                    continue
                if isinstance(pred, str):
                    reason = pred
                elif prediction is None or pred.probability > prediction.probability:
                    prediction = pred
            if prediction is None:
                prediction = reason
        fused = fusion.fuse_chest(
            scored, prediction, chest.card if chest is not None else None, rules=rules, policy=policy, context=context
        )
        results.append(fused.to_dict())
    return results
