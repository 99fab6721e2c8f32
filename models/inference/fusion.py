"""Fusion: one urgency level and score per exam from the learned models, the measurements and the request.

Order of authority, highest first:

1. **Critical values and the clinical request** (rule findings at ``critical``; the requested
   priority's floor; indication keywords) are never lowered by a model.
2. **Learned models** add findings: the rhythm model's AF probability, the 12-lead model's
   infarction probability, the chest model's pneumonia probability, each against a threshold
   chosen on validation data for sensitivity first (stored in the model's card, overridable in the
   policy file). Below its threshold a model still adds a ``routine`` finding with its score, so
   the reader sees what it weighed.
3. **Heuristic rule findings** that a model replaces (e.g. "irregular rhythm", the rules' AF
   proxy) drop to ``routine`` when that model ran, and stay as they are when it could not run.

The policy (``rules/fusion.json``) names the superseded rules and any threshold overrides; it is
chosen on validation data only (``teleread models train fusion``), never on the evaluation files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from teleread.errors import InvalidInput
from teleread.models.inference.ecg_rules import RuleSet
from teleread.vocab import Level
from teleread.models.inference.triage import Evidence, Finding, Scored, TriageResult, compose

DEFAULT_POLICY_PATH = Path(__file__).resolve().parents[1] / "rules" / "fusion.json"

RHYTHM_NAMES = {
    "N": "normal sinus rhythm",
    "A": "atrial fibrillation",
    "O": "other rhythm",
    "~": "too noisy to classify",
}


@dataclass(frozen=True)
class FusionPolicy:
    version: str = "fusion-default"
    superseded_by_rhythm: tuple[str, ...] = ()
    superseded_by_12lead: tuple[str, ...] = ()
    min_leads_12: int = 8
    thresholds: Mapping[str, float] = field(default_factory=dict)  # overrides of the cards' thresholds
    validation: Mapping[str, Any] = field(default_factory=dict)  # how the policy was chosen, measured

    def threshold(self, key: str, card: Any, card_key: str, default: float) -> float:
        if key in self.thresholds:
            return float(self.thresholds[key])
        if card is not None and card_key in card.thresholds:
            return float(card.thresholds[card_key])
        return default

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "superseded_by_rhythm": list(self.superseded_by_rhythm),
            "superseded_by_12lead": list(self.superseded_by_12lead),
            "min_leads_12": self.min_leads_12,
            "thresholds": dict(self.thresholds),
            "validation": dict(self.validation),
        }


def load_policy(path: Path | None = None) -> FusionPolicy:
    source = path or DEFAULT_POLICY_PATH
    try:
        raw = json.loads(source.read_text(encoding="utf-8"))
        return FusionPolicy(
            version=str(raw["version"]),
            superseded_by_rhythm=tuple(str(c) for c in raw.get("superseded_by_rhythm", ())),
            superseded_by_12lead=tuple(str(c) for c in raw.get("superseded_by_12lead", ())),
            min_leads_12=int(raw.get("min_leads_12", 8)),
            thresholds={str(k): float(v) for k, v in raw.get("thresholds", {}).items()},
            validation=dict(raw.get("validation", {})),
        )
    except OSError:
        raise InvalidInput("fusion policy file cannot be read", reason="FUSION_POLICY_UNREADABLE") from None
    except (ValueError, KeyError, TypeError):
        raise InvalidInput("fusion policy file is malformed", reason="FUSION_POLICY_INVALID") from None


def save_policy(policy: FusionPolicy, path: Path | None = None) -> Path:
    target = path or DEFAULT_POLICY_PATH
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(policy.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(target)
    return target


def _past(p: float, threshold: float) -> float:
    """Severity 0..1 of a probability past its threshold."""
    return max(0.0, min(1.0, (p - threshold) / max(1e-6, 1.0 - threshold)))


def _demote(scored: Iterable[Scored], codes: Sequence[str], why: str) -> list[Scored]:
    out = []
    for s in scored:
        f = s.finding
        if f.code in codes and f.level is Level.URGENT:
            f = replace(f, level=Level.ROUTINE, title=f"{f.title} ({why})")
            s = Scored(f, s.severity)
        out.append(s)
    return out


@dataclass(frozen=True)
class ModelOutputs:
    """What the learned models said about one ECG (any may be missing), with their cards."""

    rhythm: Any = None  # teleread.models.inference.ecg_rhythm LeadsPrediction
    rhythm_card: Any = None
    twelve: Any = None  # teleread.models.inference.ecg_12lead TwelveLeadPrediction
    twelve_card: Any = None
    unavailable: tuple[str, ...] = ()  # "name: reason" of models that could not run


def rhythm_findings(rhythm: Any, card: Any, policy: FusionPolicy) -> list[Scored]:
    probs: Mapping[str, float] = rhythm.probs
    lead = str(getattr(rhythm, "lead", "") or "")
    thr = policy.threshold("af_urgent", card, "af_urgent", 0.3)
    p_af = float(probs.get("A", 0.0))
    top = max(probs, key=lambda k: probs[k])
    evidence = [
        Evidence(name=f"p_{'noisy' if k == '~' else k}", value=round(float(v), 3), lead=lead) for k, v in probs.items()
    ]
    if p_af >= thr:
        af_ev = Evidence(name="p_af", value=round(p_af, 3), lead=lead, threshold=round(thr, 3))
        title = "Atrial fibrillation likely (rhythm model" + (f", strongest in lead {lead})" if lead else ")")
        return [Scored(Finding("ecg.model.af", title, Level.URGENT, [af_ev]), _past(p_af, thr))]
    title = f"Rhythm model: {RHYTHM_NAMES.get(top, top)} (p={probs[top]:.2f}); AF not flagged"
    return [Scored(Finding("ecg.model.rhythm", title, Level.ROUTINE, evidence), 0.0)]


def twelve_lead_findings(twelve: Any, card: Any, policy: FusionPolicy) -> list[Scored]:
    probs: Mapping[str, float] = twelve.probs
    thr = policy.threshold("mi_urgent", card, "mi_urgent", 0.3)
    p_mi = float(probs.get("MI", 0.0))
    importance = dict(getattr(twelve, "lead_importance", {}) or {})
    leads = [(str(lead), float(w)) for lead, w in importance.get("MI", [])][:3]
    if p_mi >= thr:
        ev = [Evidence(name="p_mi", value=round(p_mi, 3), threshold=round(thr, 3))]
        ev += [Evidence(name="lead_weight", value=round(w, 3), lead=lead) for lead, w in leads]
        where = f"; leads weighed most: {', '.join(lead for lead, _ in leads)}" if leads else ""
        title = f"Infarction pattern possible (12-lead model{where}): compare with symptoms and priors"
        return [Scored(Finding("ecg.model.mi", title, Level.URGENT, ev), _past(p_mi, thr))]
    shown = sorted(((k, float(v)) for k, v in probs.items()), key=lambda kv: -kv[1])[:3]
    ev = [Evidence(name=f"p_{k.lower()}", value=round(v, 3)) for k, v in shown]
    text = ", ".join(f"{k} {v:.2f}" for k, v in shown)
    return [
        Scored(
            Finding("ecg.model.superclass", f"12-lead model: {text}; infarction not flagged", Level.ROUTINE, ev), 0.0
        )
    ]


def fuse_ecg(
    scored: list[Scored], outputs: ModelOutputs, *, rules: RuleSet, policy: FusionPolicy, context: str
) -> TriageResult:
    """The fused result of one ECG: rule findings (``triage.ecg_findings``) plus the models' findings."""
    used: list[str] = []
    out = list(scored)
    if outputs.rhythm is not None:
        out = _demote(out, policy.superseded_by_rhythm, "left to the rhythm model")
        out += rhythm_findings(outputs.rhythm, outputs.rhythm_card, policy)
        used.append(outputs.rhythm_card.label if outputs.rhythm_card is not None else "ecg_rhythm")
    if outputs.twelve is not None:
        out = _demote(out, policy.superseded_by_12lead, "left to the 12-lead model")
        out += twelve_lead_findings(outputs.twelve, outputs.twelve_card, policy)
        used.append(outputs.twelve_card.label if outputs.twelve_card is not None else "ecg_12lead")
    for problem in outputs.unavailable:
        out.append(Scored(Finding("model.unavailable", f"Model not used: {problem}", Level.ROUTINE, []), 0.0))
    return compose(out, rules=rules, context=context, models=used, version=f"{rules.version}+{policy.version}")


def fuse_chest(
    scored: list[Scored], prediction: Any, card: Any, *, rules: RuleSet, policy: FusionPolicy, context: str
) -> TriageResult:
    """Imaging request findings plus the chest model's (``prediction`` may be a not-applicable reason)."""
    out = list(scored)
    used: list[str] = []
    if isinstance(prediction, str):
        reason = re.sub(r"^no model for this exam:\s*", "", prediction, flags=re.IGNORECASE)
        title = f"No model for this exam ({reason})"
        out.append(Scored(Finding("image.model.none", title, Level.ROUTINE, []), 0.0))
    elif prediction is not None:
        used.append(card.label if card is not None else "chest_pneumonia")
        p = float(prediction.probability)
        thr = policy.threshold("chest_urgent", card, "urgent", 0.5)
        regions = [(str(name), float(w)) for name, w in list(prediction.regions)[:3]]
        ev = [Evidence(name="p_pneumonia", value=round(p, 3), threshold=round(thr, 3))]
        ev += [Evidence(name=f"weight {name}", value=round(w, 3)) for name, w in regions]
        where = ", ".join(name for name, _ in regions)
        if p >= thr:
            title = f"Pneumonia possible (chest model; regions weighed most: {where})"
            out.append(Scored(Finding("image.model.pneumonia", title, Level.URGENT, ev), _past(p, thr)))
        else:
            title = f"Chest model: pneumonia not flagged (p={p:.2f}; regions weighed most: {where})"
            out.append(Scored(Finding("image.model.chest", title, Level.ROUTINE, ev), 0.0))
    return compose(out, rules=rules, context=context, models=used, version=f"{rules.version}+{policy.version}")
