"""``teleread models evaluate``: every model and the fused ECG triage on the shared evaluation files.

Per model: the metrics with 95 % bootstrap confidence intervals beside the published figures. For
the fused triage: the full production path (load, measure, rules, models, fusion) on every record
of the CinC 2017 and PTB-XL evaluation files, its sensitivity for urgent records (flagged urgent or
critical), its flag rate among non-urgent records, and the level counts. Nothing here chooses a
threshold: thresholds come from validation data (the cards and ``rules/fusion.json``).
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from teleread.models.inference import fusion, pipeline, triage

from teleread.models.training import metrics
from teleread.vocab import Level

TRAINERS = {
    "ecg_rhythm": "train_ecg_rhythm",
    "ecg_12lead": "train_ecg_12lead",
    "chest_pneumonia": "train_chest_xray",
}

CINC_LEAD = "I"
EcgRecord = tuple[
    np.ndarray, float, Sequence[str]
]  # signal in mV (n, leads), fs, lead names  # the CinC 2017 device records a lead-I-like single lead


@dataclass
class Section:
    name: str
    metrics: list[metrics.Metric]
    published: list[tuple[str, float, str]] = field(default_factory=list)
    note: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metrics": [m.to_dict() for m in self.metrics],
            "published": [{"name": n, "value": v, "source": s} for n, v, s in self.published],
            "note": self.note,
            "seconds": round(self.seconds, 1),
        }


def default_datasets() -> Path:
    """``../shared/datasets`` next to the checkout, the documented place of the evaluation files."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "datasets"
        if (candidate / "cinc2017-eval.npz").is_file():
            return candidate
    return Path("../shared/datasets")


def evaluate_model(name: str, datasets: Path) -> Section:
    module = importlib.import_module(f"teleread.models.training.{TRAINERS[name]}")
    started = time.perf_counter()
    report = module.evaluate(datasets)
    section = Section(name, list(report["metrics"]), [tuple(p) for p in report.get("published", [])])
    section.seconds = time.perf_counter() - started
    return section


@dataclass(frozen=True)
class FusedRecord:
    source: str
    urgent: bool
    level: Level


def _signal(x_mv: np.ndarray, fs: float, leads: Sequence[str]) -> Any:
    from teleread.ecgio import EcgSignal

    return EcgSignal(signal_mv=np.asarray(x_mv, dtype=np.float64), fs=float(fs), lead_names=list(leads))


@dataclass(frozen=True)
class FusedInput:
    """One ECG's rule findings and model outputs: fusing them under a policy is cheap."""

    scored: tuple[triage.Scored, ...]
    outputs: fusion.ModelOutputs | None  # None: the ECG could not be measured
    fixed: Level | None = None  # the level of an unmeasurable ECG


def fused_inputs(
    records: Sequence[EcgRecord],
    *,
    policy: fusion.FusionPolicy | None = None,
    rules: Any = None,
    batch: int = 16,
) -> list[FusedInput]:
    """Measure each ECG (signal mV (n, L), fs, lead names) and run the models, routine priority."""
    from teleread.errors import TelereadError
    from teleread.models.inference import ecg_measure

    policy = policy or fusion.load_policy()
    rules = rules or triage.load_rules()
    done: list[FusedInput] = []
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        measured: list[tuple[int, Any, Any]] = []
        out: list[FusedInput | None] = [None] * len(chunk)
        for i, (x, fs, leads) in enumerate(chunk):
            s = _signal(x, fs, leads)
            try:
                m = ecg_measure.measure_ecg(s.signal_mv, fs=s.fs, lead_names=s.lead_names)
            except TelereadError as exc:
                level = triage.unmeasurable_ecg(priority="routine", reason=exc.reason, rules=rules).level
                out[i] = FusedInput((), None, level)
                continue
            measured.append((i, s, m))
        outputs = pipeline.ecg_model_outputs([s for _, s, _ in measured], policy=policy)
        for (i, _s, m), o in zip(measured, outputs):
            out[i] = FusedInput(tuple(triage.ecg_findings(m, rules=rules)), o)
        done.extend(x for x in out if x is not None)
    return done


def fused_levels_from(inputs: Sequence[FusedInput], *, policy: fusion.FusionPolicy, rules: Any = None) -> list[Level]:
    rules = rules or triage.load_rules()
    levels = []
    for x in inputs:
        if x.outputs is None:
            levels.append(x.fixed or Level.URGENT)
        else:
            levels.append(fusion.fuse_ecg(list(x.scored), x.outputs, rules=rules, policy=policy, context="").level)
    return levels


def fused_levels(records: Sequence[EcgRecord], *, policy: fusion.FusionPolicy | None = None) -> list[Level]:
    """The fused level of each ECG under ``policy`` (default: the packaged one)."""
    policy = policy or fusion.load_policy()
    return fused_levels_from(fused_inputs(records, policy=policy), policy=policy)


def cinc_records(path: Path) -> tuple[list[EcgRecord], np.ndarray]:
    d = np.load(path)
    offsets, signal, fs = d["offsets"], d["signal"], float(d["fs"])
    recs: list[EcgRecord] = [
        (signal[offsets[i] : offsets[i + 1]].astype(np.float64)[:, None] / 1000.0, fs, (CINC_LEAD,))
        for i in range(len(offsets) - 1)
    ]
    return recs, np.asarray(d["af"], bool)


def ptbxl_records(path: Path) -> tuple[list[EcgRecord], np.ndarray]:
    d = np.load(path)
    leads = tuple(str(n) for n in d["lead_names"])
    recs: list[EcgRecord] = [(x.astype(np.float64) / 1000.0, float(d["fs"]), leads) for x in d["X"]]
    return recs, np.asarray(d["urgent"], bool)


def flag_metrics(prefix: str, urgent: np.ndarray, levels: Sequence[Level]) -> list[metrics.Metric]:
    flagged = np.array([lv.rank >= Level.URGENT.rank for lv in levels])
    critical = np.array([lv is Level.CRITICAL for lv in levels])
    out = [
        metrics.bootstrap(
            f"{prefix} sensitivity (urgent flagged urgent/critical)", metrics.sensitivity, urgent, flagged
        ),
        metrics.bootstrap(f"{prefix} specificity (non-urgent left routine)", metrics.specificity, urgent, flagged),
        metrics.bootstrap(f"{prefix} flag rate, non-urgent (urgent or critical)", _flag_rate, urgent, flagged),
        metrics.bootstrap(f"{prefix} critical rate, non-urgent", _flag_rate, urgent, critical),
    ]
    return out


def _flag_rate(urgent: np.ndarray, flagged: np.ndarray) -> float:
    neg = ~np.asarray(urgent, bool)
    if not neg.any():
        raise ValueError("no negatives")
    return float(np.asarray(flagged, bool)[neg].mean())


def level_counts(urgent: np.ndarray, levels: Sequence[Level]) -> str:
    parts = []
    for label, mask in (("urgent", urgent), ("non-urgent", ~urgent)):
        counts = {lv: sum(1 for lv2, m in zip(levels, mask) if m and lv2 is lv) for lv in Level}
        parts.append(f"{label} {int(mask.sum())}: " + ", ".join(f"{lv} {counts[lv]}" for lv in Level))
    return "; ".join(parts)


def evaluate_fused(datasets: Path, policy: fusion.FusionPolicy | None = None) -> Section:
    started = time.perf_counter()
    sections: list[metrics.Metric] = []
    notes = []
    all_urgent: list[np.ndarray] = []
    all_levels: list[Level] = []
    for label, loader, file in (
        ("CinC", cinc_records, "cinc2017-eval.npz"),
        ("PTB-XL", ptbxl_records, "ptbxl-fold10-eval.npz"),
    ):
        recs, urgent = loader(datasets / file)
        levels = fused_levels(recs, policy=policy)
        sections += flag_metrics(label, urgent, levels)
        notes.append(f"{label}: {level_counts(urgent, levels)}")
        all_urgent.append(urgent)
        all_levels += levels
    sections += flag_metrics("both", np.concatenate(all_urgent), all_levels)
    published = [("Acute coronary occlusion AUC (12-lead model, 3 cohorts)", 0.938, "Herman et al., EHJ-DH 2024")]
    note = "urgent = CinC AF, PTB-XL derived urgent label (datasets README). " + " | ".join(notes)
    return Section("fused_ecg_triage", sections, published, note, time.perf_counter() - started)


def evaluate_all(
    datasets: Path,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
    policy: fusion.FusionPolicy | None = None,
) -> list[Section]:
    chosen = list(names) if names else [*TRAINERS, "fused_ecg_triage"]
    out = []
    for name in chosen:
        if progress:
            progress(name)
        out.append(evaluate_fused(datasets, policy) if name == "fused_ecg_triage" else evaluate_model(name, datasets))
    return out
