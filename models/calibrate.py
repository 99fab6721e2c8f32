"""``teleread models train fusion``: choose the fusion policy on validation data only.

Validation data: PTB-XL fold 9 (``ptbxl-fold9-val.npz``, the official validation fold) and, when
the CinC 2017 training folder is given, the rhythm model's own held-out validation split of
A00001-A06000 (same seed as its card). Never the evaluation files.

Choices, sensitivity first:

1. Which heuristic rules the models supersede: each candidate set is kept only if validation
   sensitivity (urgent records flagged urgent or critical) does not fall; among those, the lowest
   validation flag rate of non-urgent records wins.
2. The AF and MI thresholds: start from the cards (each chosen on its model's validation data);
   if a validation urgent record is still missed and the model scored it, lower that threshold to
   just below its score, so no validation urgent record is missed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from teleread.models import fusion, registry
from teleread.models.ecg_rules import Level
from teleread.models.evaluate import FusedInput, fused_inputs, fused_levels_from, ptbxl_records

CANDIDATES: tuple[tuple[str, ...], ...] = ((), ("ecg.irregular_rhythm",))
MARGIN = 0.9  # a lowered threshold sits at 90 % of the missed record's score


def _rates(urgent: np.ndarray, levels: Sequence[Level]) -> tuple[float, float]:
    flagged = np.array([lv.rank >= Level.URGENT.rank for lv in levels])
    sens = float(flagged[urgent].mean()) if urgent.any() else float("nan")
    rate = float(flagged[~urgent].mean()) if (~urgent).any() else float("nan")
    return sens, rate


def cinc_validation(training: Path) -> tuple[list[tuple[np.ndarray, float, Sequence[str]]], np.ndarray]:
    from teleread.models.evaluate import CINC_LEAD
    from teleread.models.train_ecg_rhythm import load_training, stratified_split

    card = registry.card("ecg_rhythm")
    signals, y, fs = load_training(training)
    _, va = stratified_split(y, card.seed)
    recs = [(signals[i][:, None], fs, (CINC_LEAD,)) for i in va]
    return recs, np.asarray(y[va] == "A")


def _lower(
    inputs: Sequence[FusedInput], urgent: np.ndarray, levels: Sequence[Level], attr: str, key: str, current: float
) -> float:
    """The threshold just below the lowest score a missed urgent record got from this model."""
    missed = [x for x, u, lv in zip(inputs, urgent, levels) if u and lv.rank < Level.URGENT.rank]
    scores = []
    for x in missed:
        pred = getattr(x.outputs, attr) if x.outputs is not None else None
        if pred is not None:
            scores.append(float(pred.probs.get(key, 0.0)))
    if not scores:
        return current
    return min(current, round(MARGIN * min(scores), 4))


def calibrate(
    datasets: Path, *, training: Path | None = None, log: Callable[[str], None] = print
) -> fusion.FusionPolicy:
    base = fusion.load_policy()
    sets: list[tuple[str, list[FusedInput], np.ndarray]] = []
    recs, urgent = ptbxl_records(datasets / "ptbxl-fold9-val.npz")
    sets.append(("PTB-XL fold 9", fused_inputs(recs, policy=base), urgent))
    if training is not None:
        recs, urgent = cinc_validation(training)
        sets.append(("CinC validation split", fused_inputs(recs, policy=base), urgent))
    inputs = [x for _, xs, _ in sets for x in xs]
    urgent_all = np.concatenate([u for _, _, u in sets])

    def score(policy: fusion.FusionPolicy) -> tuple[float, float]:
        return _rates(urgent_all, fused_levels_from(inputs, policy=policy))

    rules_only = replace(base, superseded_by_rhythm=(), thresholds={"af_urgent": 2.0, "mi_urgent": 2.0})
    floor_sens, _ = score(rules_only)
    best: tuple[float, fusion.FusionPolicy] | None = None
    for codes in CANDIDATES:
        policy = replace(base, superseded_by_rhythm=codes, thresholds={})
        for attr, key, name, card_key in (
            ("rhythm", "A", "af_urgent", "ecg_rhythm"),
            ("twelve", "MI", "mi_urgent", "ecg_12lead"),
        ):
            current = policy.threshold(name, registry.card(card_key), name, 0.3)
            lowered = _lower(inputs, urgent_all, fused_levels_from(inputs, policy=policy), attr, key, current)
            policy = replace(policy, thresholds={**policy.thresholds, name: lowered})
        sens, rate = score(policy)
        log(
            f"superseded {list(codes) or 'none'}: validation sensitivity {sens:.3f}, "
            f"flag rate {rate:.3f}, {dict(policy.thresholds)}"
        )
        if sens + 1e-9 >= floor_sens and (best is None or rate < best[0]):
            best = (rate, policy)
    if best is None:  # no candidate keeps the rules' sensitivity: keep the rules as they are
        best = (float("nan"), replace(base, superseded_by_rhythm=(), thresholds={}))
    chosen = best[1]
    per_set = {}
    for name, xs, u in sets:
        sens, rate = _rates(u, fused_levels_from(xs, policy=chosen))
        per_set[name] = {
            "n": len(xs),
            "urgent": int(u.sum()),
            "sensitivity": round(sens, 4),
            "flag_rate": round(rate, 4),
        }
    version = f"fusion-{registry.card('ecg_rhythm').version}-{registry.card('ecg_12lead').version}"
    chosen = replace(
        chosen, version=version, validation={"sets": per_set, "rules_only_sensitivity": round(floor_sens, 4)}
    )
    path = fusion.save_policy(chosen)
    log(f"fusion policy written to {path}: {chosen.to_dict()}")
    return chosen
