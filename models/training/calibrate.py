"""``teleread models train fusion``: choose the fusion policy on validation data only.

Validation data: PTB-XL fold 9 (``ptbxl-fold9-val.npz``, the official validation fold) and, when
the CinC 2017 training folder is given, the rhythm model's own held-out validation split of
A00001-A06000 (same seed as its card). Never the evaluation files.

Choices, sensitivity first:

1. Which heuristic rules the models supersede: each candidate set is kept only if validation
   sensitivity (urgent records flagged urgent or critical) does not fall; among those, the lowest
   validation flag rate of non-urgent records wins.
2. The AF and MI thresholds, by operating point:
   - ``sensitive`` (the default): each model's own threshold from its card, where the model alone
     catches every urgent record of its validation data; lowered just below any fused validation
     urgent record still missed. Rules and models are redundant: a record does not depend on a
     rule happening to fire.
   - ``balanced``: each threshold raised as far as it can go (at most 0.5) while the fused
     validation sensitivity stays complete, counting the records that the critical-value or rate
     rules already flag. Fewer flags; no redundancy for those records.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from teleread.models.inference import fusion, registry
from teleread.vocab import Level
from teleread.models.training.evaluate import EcgRecord, FusedInput, fused_inputs, fused_levels_from, ptbxl_records

CANDIDATES: tuple[tuple[str, ...], ...] = (
    (),
    ("ecg.irregular_rhythm",),  # the rules' AF proxy
    ("ecg.irregular_rhythm", "ecg.wide_qrs"),  # and an isolated wide QRS (VT stays a critical rule)
)
MARGIN = 0.9  # a threshold sits at 90 % of the score of the validation record that needs it
CAP = 0.5  # a model flags at least what it calls more likely than not
MODELS = (("rhythm", "A", "af_urgent", "ecg_rhythm"), ("twelve", "MI", "mi_urgent", "ecg_12lead"))


def _rates(urgent: np.ndarray, levels: Sequence[Level]) -> tuple[float, float]:
    flagged = np.array([lv.rank >= Level.URGENT.rank for lv in levels])
    sens = float(flagged[urgent].mean()) if urgent.any() else float("nan")
    rate = float(flagged[~urgent].mean()) if (~urgent).any() else float("nan")
    return sens, rate


def cinc_validation(training: Path) -> tuple[list[EcgRecord], np.ndarray]:
    from teleread.models.training.evaluate import CINC_LEAD
    from teleread.models.training.train_ecg_rhythm import load_training, stratified_split

    card = registry.card("ecg_rhythm")
    signals, y, fs = load_training(training)
    _, va = stratified_split(y, card.seed)
    recs: list[EcgRecord] = [(signals[i][:, None], fs, (CINC_LEAD,)) for i in va]
    return recs, np.asarray(y[va] == "A")


def _scores(inputs: Sequence[FusedInput], urgent: np.ndarray, attr: str, key: str) -> list[float]:
    """The model's scores of the urgent validation records."""
    out = []
    for x, u in zip(inputs, urgent):
        pred = getattr(x.outputs, attr) if (u and x.outputs is not None) else None
        if pred is not None:
            out.append(float(pred.probs.get(key, 0.0)))
    return out


def _highest(
    inputs: Sequence[FusedInput],
    urgent: np.ndarray,
    policy: fusion.FusionPolicy,
    attr: str,
    key: str,
    name: str,
    goal: float,
) -> float:
    """The highest threshold (at most CAP) that keeps the fused validation sensitivity at ``goal``."""
    candidates = sorted({round(MARGIN * p, 4) for p in _scores(inputs, urgent, attr, key)} | {CAP}, reverse=True)
    for t in (c for c in candidates if c <= CAP):
        trial = replace(policy, thresholds={**policy.thresholds, name: t})
        if _rates(urgent, fused_levels_from(inputs, policy=trial))[0] + 1e-9 >= goal:
            return t
    return min(candidates)


def card_threshold(card_name: str, name: str) -> float:
    """The model's own sensitivity-first threshold, chosen on its validation data (its card)."""
    return float(registry.card(card_name).thresholds.get(name, CAP))


def _missed_scores(
    inputs: Sequence[FusedInput], urgent: np.ndarray, levels: Sequence[Level], attr: str, key: str
) -> list[float]:
    """The model's scores of urgent validation records the fused policy leaves routine."""
    out = []
    for x, u, lv in zip(inputs, urgent, levels):
        pred = getattr(x.outputs, attr) if (u and x.outputs is not None and lv.rank < Level.URGENT.rank) else None
        if pred is not None:
            out.append(float(pred.probs.get(key, 0.0)))
    return out


def calibrate(
    datasets: Path,
    *,
    training: Path | None = None,
    operating_point: str = "sensitive",
    log: Callable[[str], None] = print,
) -> fusion.FusionPolicy:
    base = fusion.load_policy()
    sets: list[tuple[str, list[FusedInput], np.ndarray]] = []
    recs, urgent = ptbxl_records(datasets / "ptbxl-fold9-val.npz")
    sets.append(("PTB-XL fold 9", fused_inputs(recs, policy=base), urgent))
    if training is not None:
        recs, urgent = cinc_validation(training)
        sets.append(("CinC validation split", fused_inputs(recs, policy=base), urgent))
    return choose(sets, base, operating_point=operating_point, log=log)


def choose(
    sets: Sequence[tuple[str, list[FusedInput], np.ndarray]],
    base: fusion.FusionPolicy,
    *,
    operating_point: str = "sensitive",
    log: Callable[[str], None] = print,
    write: bool = True,
) -> fusion.FusionPolicy:
    """Pick the policy from measured validation inputs (see the module docstring) and save it."""
    inputs = [x for _, xs, _ in sets for x in xs]
    urgent_all = np.concatenate([u for _, _, u in sets])

    def score(policy: fusion.FusionPolicy) -> tuple[float, float]:
        return _rates(urgent_all, fused_levels_from(inputs, policy=policy))

    rules_only = replace(base, superseded_by_rhythm=(), thresholds={"af_urgent": 2.0, "mi_urgent": 2.0})
    floor_sens, _ = score(rules_only)
    best: tuple[float, fusion.FusionPolicy] | None = None
    for codes in CANDIDATES:
        if operating_point == "balanced":
            # every model threshold just below its lowest-scored urgent validation record ...
            lowest = {
                name: min([MARGIN * p for p in _scores(inputs, urgent_all, attr, key)] + [CAP])
                for attr, key, name, _ in MODELS
            }
            policy = replace(base, superseded_by_rhythm=codes, thresholds=lowest)
            goal, _ = score(policy)
            for _round in range(2):  # ... then each raised as far as that fused sensitivity allows
                for attr, key, name, _ in MODELS:
                    t = _highest(inputs, urgent_all, policy, attr, key, name, goal)
                    policy = replace(policy, thresholds={**policy.thresholds, name: t})
        else:  # sensitive: each model alone catches its urgent validation records (the cards' thresholds)
            cards = {name: card_threshold(card, name) for _, _, name, card in MODELS}
            policy = replace(base, superseded_by_rhythm=codes, thresholds=cards)
            for attr, key, name, _ in MODELS:  # and lower one if a fused validation record is still missed
                missed = _missed_scores(inputs, urgent_all, fused_levels_from(inputs, policy=policy), attr, key)
                if missed:
                    t = min(policy.thresholds[name], round(MARGIN * min(missed), 4))
                    policy = replace(policy, thresholds={**policy.thresholds, name: t})
            goal, _ = score(policy)
        sens, rate = score(policy)
        log(
            f"superseded {list(codes) or 'none'}: validation sensitivity {sens:.3f}, "
            f"flag rate {rate:.3f}, {dict(policy.thresholds)}"
        )
        if sens + 1e-9 >= max(goal, floor_sens) and (best is None or rate < best[0]):
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
        chosen,
        version=version,
        validation={
            "operating_point": operating_point,
            "sets": per_set,
            "rules_only_sensitivity": round(floor_sens, 4),
        },
    )
    if write:
        path = fusion.save_policy(chosen)
        log(f"fusion policy written to {path}: {chosen.to_dict()}")
    return chosen
