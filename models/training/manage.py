"""``teleread models ...``: list, show, train, evaluate and explain the learned triage models."""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from teleread.errors import InvalidInput

# The targets, by (section, metric name as the evaluators print it): (">=" or "<=", value).
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("ecg_rhythm", "F1 AF"): (">=", 0.88),
    ("ecg_rhythm", "mean F1 N/A/O"): (">=", 0.85),
    ("chest_pneumonia", "pneumonia AUC"): (">=", 0.96),
    ("fused_ecg_triage", "CinC sensitivity (urgent flagged urgent/critical)"): (">=", 1.0),
    ("fused_ecg_triage", "PTB-XL sensitivity (urgent flagged urgent/critical)"): (">=", 1.0),
    ("fused_ecg_triage", "CinC flag rate, non-urgent (urgent or critical)"): ("<=", 0.25),
    ("fused_ecg_triage", "PTB-XL flag rate, non-urgent (urgent or critical)"): ("<=", 0.25),
    ("fused_ecg_triage", "both flag rate, non-urgent (urgent or critical)"): ("<=", 0.25),
}


def cmd_list(args: argparse.Namespace) -> int:
    from teleread.models.inference import registry

    for name in registry.available():
        card = registry.card(name)
        print(f"{card.label:32s} sha256 {card.sha256[:12]}  seed {card.seed}  {card.task}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from teleread.models.inference import registry

    print(json.dumps(registry.card(args.name).to_dict(), indent=2, ensure_ascii=False))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from teleread.models.training.evaluate import TRAINERS

    if args.name == "fusion":
        from teleread.models.training.calibrate import calibrate

        training = Path(args.training) if args.training else None
        calibrate(Path(args.data), training=training, operating_point=args.operating_point, log=print)
        return 0
    if args.name not in TRAINERS:
        raise InvalidInput(f"no model named {args.name!r}; known: {', '.join([*TRAINERS, 'fusion'])}")
    from teleread.models.training.evaluate import default_datasets

    datasets = str(Path(args.datasets) if args.datasets else default_datasets())
    started = time.perf_counter()
    # each trainer: train on the public split, choose thresholds on validation, save weights + card JSON,
    # evaluate on the evaluation files, and write the model card (markdown)
    if args.name == "ecg_12lead":
        from teleread.models.training import train_ecg_12lead as t12

        out = Path(args.out) if args.out else None
        t12.train(Path(args.data), seed=args.seed, weights_dir=out, val=Path(datasets))
        card = t12.record_evaluation(Path(datasets), out)
    else:
        if args.out:
            raise InvalidInput("--out is supported for ecg_12lead only; the others write the packaged weights")
        module = importlib.import_module(f"teleread.models.training.{TRAINERS[args.name]}")
        module.main(["--data", args.data, "--seed", str(args.seed), "--datasets", datasets])
        from teleread.models.inference import registry

        card = registry.card(args.name)
    print(f"trained {card.label} in {time.perf_counter() - started:.0f} s; weights sha256 {card.sha256}")
    return 0


def _target(section: str, name: str, value: float) -> str:
    if (section, name) not in TARGETS:
        return ""
    op, goal = TARGETS[(section, name)]
    met = value >= goal if op == ">=" else value <= goal
    return f"{op} {goal:g} {'met' if met else 'MISSED'}"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from teleread.models.training.evaluate import default_datasets, evaluate_all

    datasets = Path(args.data) if args.data else default_datasets()
    if not (datasets / "cinc2017-eval.npz").is_file():
        raise InvalidInput("the evaluation files are not in that folder (expected cinc2017-eval.npz ...)")
    console = Console(width=max(Console().width, 130))
    from teleread.models.inference.fusion import load_policy

    policy = load_policy(Path(args.policy)) if args.policy else None
    sections = evaluate_all(
        datasets,
        args.model or None,
        progress=lambda n: console.print(f"[dim]evaluating {n}...[/]"),
        policy=policy,
    )
    for s in sections:
        table = Table(title=f"{s.name} ({s.seconds:.0f} s)", title_justify="left")
        for col in ("metric", "value", "95 % CI", "target"):
            table.add_column(col)
        for m in s.metrics:
            table.add_row(m.name, f"{m.value:.3f}", f"[{m.low:.3f}, {m.high:.3f}]", _target(s.name, m.name, m.value))
        for name, value, source in s.published:
            table.add_row(f"[italic]published: {name}[/]", f"{value:.3f}", "", source)
        console.print(table)
        if s.note:
            console.print(f"  {s.note}")
    if args.json:
        Path(args.json).write_text(json.dumps([s.to_dict() for s in sections], indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import pydicom

    from teleread.models.inference import chest_xray, registry

    model = registry.get("chest_pneumonia")
    ds = pydicom.dcmread(args.file)
    pred = model.predict_dicom(ds)
    if isinstance(pred, str):
        print(pred if pred.lower().startswith("no model") else f"no model for this exam: {pred}")
        return 0
    regions = ", ".join(f"{name} {weight:.2f}" for name, weight in pred.regions)
    print(f"p(pneumonia) {pred.probability:.3f} ({pred.label}); regions weighed most: {regions}")
    if args.png:
        Path(args.png).write_bytes(chest_xray.saliency_png(pred, chest_xray.pixels_to_input(ds)))
        print(f"saliency overlay written to {args.png}")
    return 0


def add_models_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="learned triage models: list, show, train, evaluate, explain")
    s = p.add_subparsers(dest="action", required=True)
    a = s.add_parser("list", help="the registered models, versions and weight hashes")
    a.set_defaults(func=cmd_list)
    a = s.add_parser("show", help="a model's card (data, seed, thresholds, metrics)")
    a.add_argument("name")
    a.set_defaults(func=cmd_show)
    a = s.add_parser("train", help="train a model (or calibrate the fusion policy) and write weights + card")
    a.add_argument("name", help="ecg_rhythm | ecg_12lead | chest_pneumonia | fusion")
    a.add_argument("--data", required=True, help="the public training data (see the model card)")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--out", help="weights folder (default: the packaged one)")
    a.add_argument("--datasets", help="evaluation files for the card (default ../shared/datasets)")
    a.add_argument("--training", help="fusion only: the CinC 2017 training folder, for its validation split")
    a.add_argument(
        "--operating-point",
        choices=["sensitive", "balanced"],
        default="sensitive",
        help="fusion only: models alone catch every validation urgent record (sensitive), or rely on the rules "
        "where they already flag it (balanced: fewer flags)",
    )
    a.set_defaults(func=cmd_train)
    a = s.add_parser("evaluate", help="metrics with 95 %% CIs on the evaluation files, beside published results")
    a.add_argument("--data", help="the evaluation files folder (default ../shared/datasets)")
    a.add_argument("--model", action="append", help="only this model (repeat); fused_ecg_triage for the fusion")
    a.add_argument("--json", help="also write the figures to this JSON file")
    a.add_argument("--policy", help="fusion policy file (default: the packaged rules/fusion.json)")
    a.set_defaults(func=cmd_evaluate)
    a = s.add_parser("explain", help="run the chest model on a DICOM file; optionally write a saliency overlay")
    a.add_argument("file")
    a.add_argument("--png", help="write the saliency overlay PNG here")
    a.set_defaults(func=cmd_explain)
