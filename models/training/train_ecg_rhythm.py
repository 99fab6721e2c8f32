"""Train, calibrate and evaluate the ``ecg_rhythm`` model (CinC 2017 single-lead N/A/O/~ classifier).

``train(data, seed, members)`` reads the PhysioNet/CinC 2017 public training set, keeps **only
A00001-A06000** (A06001+ is the reserved block the evaluation file was drawn from), holds out the
class-stratified 15 % validation split of ``seed`` for early stopping and threshold choice, trains a
seed ensemble (member i: init/shuffle/augmentation seed ``seed + i``, all on the same split), chooses the
thresholds on the ensemble's validation probabilities and saves one state_dict with ``registry.save``.
``evaluate(datasets)`` scores the saved model on ``cinc2017-eval.npz``; ``write_card`` writes
``models/cards/ecg_rhythm.md``. Run ``python -m teleread.models.training.train_ecg_rhythm --data
/work/data/training2017`` for the full reproducible pipeline.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing as mp
import re
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from scipy.io import loadmat

from teleread.models.inference import ecg_rhythm as er
from teleread.models.training import metrics as mt
from teleread.models.inference import registry

NAME = "ecg_rhythm"
VERSION = "1.0.0"  # single network (K = 1, plain state_dict: bit-identical to 1.0.0)
ENSEMBLE_VERSION = "1.1.0"  # K > 1
LAST_TRAIN_RECORD = 6000
VAL_FRACTION = 0.15
DEFAULT_EPOCHS = 30
PATIENCE = 8
BATCH = 64
# K = 3 (seeds 0-2) scored validation mean F1 0.8343 against 0.8374 for the single seed-0 network, so the
# single network stays the default; ``--members 3`` rebuilds the ensemble candidate (see the model card).
DEFAULT_MEMBERS = 1
PUBLISHED = [
    ("CinC 2017 mean F1 N/A/O, hidden test, winners", 0.83, "Clifford et al., CinC 2017"),
    ("CinC 2017 mean F1 N/A/O, hidden test, ensemble of top entries", 0.87, "Clifford et al., CinC 2017"),
]
HYPER: dict[str, Any] = {**er.DEFAULT_HYPER, "channels": [16, 32, 48, 64, 96, 96], "kernel": 7}


# ----------------------------------------------------------------------------- data


def _folder(data: Path) -> Path:
    for cand in (data, data / "training2017"):
        if (cand / "REFERENCE.csv").is_file():
            return cand
    raise FileNotFoundError(f"no REFERENCE.csv in {data} or {data / 'training2017'}")


def load_training(data: Path) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Signals in mV and labels of A00001-A06000 (header rows and other records are skipped)."""
    folder = _folder(data)
    names, labels = [], []
    for line in (folder / "REFERENCE.csv").read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(",")
        if len(parts) != 2 or not re.fullmatch(r"A\d{5}", parts[0]) or parts[1] not in er.CLASSES:
            continue
        if int(parts[0][1:]) > LAST_TRAIN_RECORD:
            continue
        names.append(parts[0])
        labels.append(parts[1])
    fs_set = set()
    signals = []
    for name in names:
        fs_set.add(float((folder / f"{name}.hea").read_text().split()[2]))
        signals.append(loadmat(folder / f"{name}.mat")["val"][0].astype(np.float64) / 1000.0)
    if len(fs_set) != 1:
        raise ValueError("training records have mixed sampling rates")
    return signals, np.asarray(labels), fs_set.pop()


def stratified_split(y: np.ndarray, seed: int, fraction: float = VAL_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified (train_idx, val_idx)."""
    rng = np.random.default_rng(seed)
    train: list[int] = []
    val: list[int] = []
    for c in er.CLASSES:
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        k = int(round(fraction * idx.size))
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(np.asarray(train)), np.sort(np.asarray(val))


def _crop(
    x: np.ndarray, peaks: np.ndarray, fs: int, window: int, rng: np.random.Generator, clip: float
) -> tuple[np.ndarray, int, np.ndarray]:
    """Random crop (sometimes shortened) with scaling, noise and baseline-wander augmentation."""
    n = x.size
    start, length = (int(rng.integers(0, n - window + 1)), window) if n > window else (0, n)
    if rng.random() < 0.15 and length > 6 * fs:
        short = int(rng.integers(5 * fs, length + 1))
        start += int(rng.integers(0, length - short + 1))
        length = short
    seg = x[start : start + length].astype(np.float64) * float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
    if rng.random() < 0.5:
        seg = seg + rng.normal(0.0, rng.uniform(0.0, 0.05), size=length)
    if rng.random() < 0.3:
        t = np.arange(length) / fs
        seg = seg + rng.uniform(0, 0.3) * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
    out = np.zeros(window, dtype=np.float32)
    out[:length] = np.clip(seg, -clip, clip)
    return out, length, er.rr_features(peaks, fs, start, start + length)


def _predict_windows(net: er.RhythmNet, packs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Record probabilities (n, 4) from precomputed (windows, lengths, standardised features)."""
    net.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(packs), 128):
            chunk = packs[i : i + 128]
            w, ln, f = (torch.from_numpy(np.concatenate([p[j] for p in chunk])) for j in range(3))
            prob = torch.softmax(net(w[:, None, :], ln, f), dim=1).numpy()
            at = 0
            for p in chunk:
                k = p[0].shape[0]
                out.append(prob[at : at + k].mean(axis=0))
                at += k
    return np.asarray(out, dtype=np.float64)


def _scores(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    pred = np.asarray(er.CLASSES)[probs.argmax(axis=1)]
    out = {f"f1_{c}": mt.f1_for(c)(y, pred) for c in er.CLASSES}
    out["mean_f1_NAO"] = mt.mean_f1(["N", "A", "O"])(y, pred)
    out["af_auc"] = mt.auc(y == "A", probs[:, 1])
    out["accuracy"] = mt.accuracy(y, pred)
    return out


def choose_thresholds(y: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """``af_urgent``: AF-probability cut with validation sensitivity >= 0.99 (never above 0.5);
    ``noisy``: the ~ probability cut maximising validation F1 of "unreadable"."""
    p_af = probs[y == "A", 1]
    af = min(0.5, float(np.quantile(p_af, 0.01, method="lower")))
    af = float(np.floor(af * 1e4) / 1e4)  # round down: keep the sensitivity when rounding
    p_noisy, is_noisy = probs[:, 3], y == "~"
    grid = np.round(np.arange(0.2, 0.91, 0.05), 2)
    f1s = [mt.f1_for(True)(is_noisy, p_noisy >= g) for g in grid]
    return {"af_urgent": af, "noisy": float(grid[int(np.argmax(f1s))])}


# ----------------------------------------------------------------------------- training


_PREP: dict[str, Any] = {}  # prepared data shared with forked member processes


def _prepare(data: Path, seed: int, hyper: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    """Load and preprocess A00001-A06000, the split of ``seed``, RR standardisation and validation windows."""
    t0 = time.perf_counter()
    fs, clip = int(hyper["fs"]), float(hyper["clip"])
    window, hop = int(hyper["window_s"] * fs), int(hyper["hop_s"] * fs)
    signals, y, fs_in = load_training(Path(data))
    xs = [er.preprocess(s, fs_in, fs, clip) for s in signals]
    peaks = [er.detect_peaks(x, fs) for x in xs]
    del signals
    tr, va = stratified_split(y, seed)
    counts = {c: (int((y[tr] == c).sum()), int((y[va] == c).sum())) for c in er.CLASSES}
    log(f"loaded and preprocessed in {time.perf_counter() - t0:.0f} s")
    log(f"records {len(y)}: train {tr.size}, validation {va.size}; per class (train, val) {counts}")
    train_feats = np.concatenate([er.make_windows(xs[i], peaks[i], fs, window, hop)[2] for i in tr])
    rr_mean = train_feats.mean(axis=0)
    rr_std = np.maximum(train_feats.std(axis=0), 1e-3)
    val_packs = []
    for i in va:
        w, ln, f = er.make_windows(xs[i], peaks[i], fs, window, hop)
        val_packs.append((w, ln, ((f - rr_mean) / rr_std).astype(np.float32)))
    return {
        "hyper": hyper,
        "xs": xs,
        "peaks": peaks,
        "y": y,
        "tr": tr,
        "va": va,
        "counts": counts,
        "rr_mean": rr_mean,
        "rr_std": rr_std,
        "val_packs": val_packs,
    }


def _train_member(
    member_seed: int, epochs: int, threads: int = 1, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train one network (init, shuffle and augmentation seeded by ``member_seed``) on the prepared split."""
    torch.set_num_threads(threads)
    torch.manual_seed(member_seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    rng = np.random.default_rng(member_seed)
    p = _PREP
    hyper, xs, peaks, y, tr, va = p["hyper"], p["xs"], p["peaks"], p["y"], p["tr"], p["va"]
    rr_mean, rr_std, val_packs = p["rr_mean"], p["rr_std"], p["val_packs"]
    fs, clip = int(hyper["fs"]), float(hyper["clip"])
    window = int(hyper["window_s"] * fs)
    t0 = time.perf_counter()

    y_idx = np.asarray([er.CLASSES.index(c) for c in y])
    freq = np.bincount(y_idx[tr], minlength=4) / tr.size
    class_w = torch.tensor((1.0 / freq) ** 0.5 / np.mean((1.0 / freq) ** 0.5), dtype=torch.float32)
    net = er.build_net(hyper)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-2)
    steps = epochs * int(np.ceil(tr.size / BATCH))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.15)
    loss_fn = torch.nn.CrossEntropyLoss(weight=class_w, label_smoothing=0.05)

    best: tuple[float, int, dict[str, torch.Tensor]] = (-1.0, -1, {})
    for epoch in range(1, epochs + 1):
        net.train()
        order = rng.permutation(tr)
        total = 0.0
        for b in range(0, order.size, BATCH):
            idx = order[b : b + BATCH]
            crops = [_crop(xs[i], peaks[i], fs, window, rng, clip) for i in idx]
            xb = torch.from_numpy(np.stack([c[0] for c in crops]))[:, None, :]
            lb = torch.tensor([c[1] for c in crops], dtype=torch.int64)
            fb = torch.from_numpy(((np.stack([c[2] for c in crops]) - rr_mean) / rr_std).astype(np.float32))
            loss = loss_fn(net(xb, lb, fb), torch.from_numpy(y_idx[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.item()) * idx.size
        sc = _scores(y[va], _predict_windows(net, val_packs))
        log(
            f"[seed {member_seed}] epoch {epoch:2d} loss {total / tr.size:.4f} val meanF1 {sc['mean_f1_NAO']:.4f} "
            f"F1 N {sc['f1_N']:.3f} A {sc['f1_A']:.3f} O {sc['f1_O']:.3f} ~ {sc['f1_~']:.3f} "
            f"AUC_A {sc['af_auc']:.4f} ({time.perf_counter() - t0:.0f} s)"
        )
        if sc["mean_f1_NAO"] > best[0]:
            best = (sc["mean_f1_NAO"], epoch, copy.deepcopy(net.state_dict()))
        elif epoch - best[1] >= PATIENCE:
            log(f"[seed {member_seed}] early stop at epoch {epoch}; best epoch {best[1]}")
            break

    net.load_state_dict(best[2])
    val_probs = _predict_windows(net, val_packs)
    sc = _scores(y[va], val_probs)
    return {
        "seed": member_seed,
        "state": best[2],
        "best_epoch": best[1],
        "val_probs": val_probs,
        "validation": {"mean_f1_NAO": round(float(sc["mean_f1_NAO"]), 4), "af_auc": round(float(sc["af_auc"]), 4)},
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }


def _member_job(args: tuple[int, int]) -> dict[str, Any]:
    out = _train_member(args[0], args[1], threads=1, log=lambda m: print(m, flush=True))
    out["state"] = {k: v.detach().clone() for k, v in out["state"].items()}
    return out


def train(
    data: Path,
    seed: int = 0,
    weights_dir: Path | None = None,
    epochs: int | None = None,
    members: int = DEFAULT_MEMBERS,
    jobs: int = 1,
    log: Callable[[str], None] = print,
) -> registry.ModelCard:
    """Train a ``members``-network seed ensemble on A00001-A06000 (the stratified 15 % validation split of
    ``seed``; member i seeded ``seed + i``), choose thresholds on the ensemble, save it as one model.

    ``jobs`` > 1 trains members in forked processes (1 torch thread each); each member is seeded on its own,
    so the result does not depend on ``jobs``."""
    t0 = time.perf_counter()
    epochs = DEFAULT_EPOCHS if epochs is None else int(epochs)
    members = max(1, int(members))
    torch.use_deterministic_algorithms(True, warn_only=True)
    hyper = dict(HYPER)
    prep = _prepare(Path(data), seed, hyper, log)
    _PREP.clear()
    _PREP.update(prep)
    y, tr, va, counts = prep["y"], prep["tr"], prep["va"], prep["counts"]
    member_seeds = [seed + i for i in range(members)]
    hyper["rr_mean"] = [round(float(v), 6) for v in prep["rr_mean"]]
    hyper["rr_std"] = [round(float(v), 6) for v in prep["rr_std"]]
    if members > 1:  # a single network keeps the 1.0.0 card layout and plain state_dict keys
        hyper["members"] = members
        hyper["member_seeds"] = member_seeds

    threads = torch.get_num_threads()
    if jobs > 1 and members > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, members), mp_context=mp.get_context("fork")) as pool:
            results = list(pool.map(_member_job, [(s, epochs) for s in member_seeds]))
        threads = 1
    else:
        results = [_train_member(s, epochs, threads=threads, log=log) for s in member_seeds]
    _PREP.clear()
    for r in results:
        log(f"member seed {r['seed']}: best epoch {r['best_epoch']}, validation {r['validation']}")

    val_probs = np.mean([r["val_probs"] for r in results], axis=0)
    val_scores = _scores(y[va], val_probs)
    thresholds = choose_thresholds(y[va], val_probs)
    flagged = val_probs[:, 1] >= thresholds["af_urgent"]
    val_scores["af_sensitivity_at_af_urgent"] = mt.sensitivity(y[va] == "A", flagged)
    val_scores["af_specificity_at_af_urgent"] = mt.specificity(y[va] == "A", flagged)
    wall = time.perf_counter() - t0
    metrics = {
        "validation": {**{k: round(float(v), 4) for k, v in val_scores.items()}, "n": int(va.size)},
        "training": {
            "wall_time_s": round(wall, 1),
            "best_epoch": results[0]["best_epoch"] if members == 1 else None,
            "members": [{k: r[k] for k in ("seed", "best_epoch", "validation", "wall_time_s")} for r in results],
            "parallel_jobs": min(jobs, members) if members > 1 else 1,
            "max_epochs": epochs,
            "patience": PATIENCE,
            "n_train": int(tr.size),
            "n_val": int(va.size),
            "counts_train_val": counts,
            "torch_threads": threads,
        },
    }
    log(f"thresholds {thresholds}; ensemble validation {metrics['validation']}; wall {wall:.0f} s")
    return registry.save(
        NAME,
        state_dict=results[0]["state"] if members == 1 else er.ensemble_state([r["state"] for r in results]),
        module="ecg_rhythm",
        version=VERSION if members == 1 else ENSEMBLE_VERSION,
        task="single-lead ECG rhythm: N normal, A atrial fibrillation, O other rhythm, ~ noisy",
        training_data=(
            f"PhysioNet/CinC 2017 public training set, records A00001-A{LAST_TRAIN_RECORD:05d} only "
            f"({tr.size} train / {va.size} validation, seeded class-stratified {VAL_FRACTION:.0%} split)"
        ),
        seed=seed,
        hyper=hyper,
        thresholds=thresholds,
        metrics=metrics,
        weights_dir=weights_dir,
    )


# ----------------------------------------------------------------------------- evaluation


def evaluate(datasets: Path, model: Any = None, weights_dir: Path | None = None) -> dict[str, Any]:
    """Metrics with 95 % bootstrap CIs on ``cinc2017-eval.npz`` (never used for training or thresholds)."""
    model = model if model is not None else registry.get(NAME, weights_dir=weights_dir)
    with np.load(Path(datasets) / "cinc2017-eval.npz") as z:
        sig, off, fs = z["signal"], z["offsets"], float(z["fs"])
        labels, records = z["label"].astype(str), z["record"].astype(str)
    items = [(sig[off[i] : off[i + 1]].astype(np.float64) / 1000.0, fs) for i in range(labels.size)]
    probs = np.asarray([p for b in range(0, len(items), 32) for p, _ in model.predict_proba_batch(items[b : b + 32])])
    pred = np.asarray(er.CLASSES)[probs.argmax(axis=1)]
    af_thr = float(model.card.thresholds["af_urgent"])
    is_af, flagged = labels == "A", probs[:, 1] >= af_thr
    found = [
        mt.bootstrap("F1 AF", mt.f1_for("A"), labels, pred),
        mt.bootstrap("mean F1 N/A/O", mt.mean_f1(["N", "A", "O"]), labels, pred),
        mt.bootstrap("F1 N", mt.f1_for("N"), labels, pred),
        mt.bootstrap("F1 O", mt.f1_for("O"), labels, pred),
        mt.bootstrap("F1 ~", mt.f1_for("~"), labels, pred),
        mt.bootstrap("AF AUC", mt.auc, is_af, probs[:, 1]),
        mt.bootstrap(f"AF sensitivity @ af_urgent={af_thr:g}", mt.sensitivity, is_af, flagged),
        mt.bootstrap(f"AF specificity @ af_urgent={af_thr:g}", mt.specificity, is_af, flagged),
        mt.bootstrap("accuracy", mt.accuracy, labels, pred),
    ]
    return {
        "metrics": found,
        "published": PUBLISHED,
        "predictions": {"record": records, "label": labels, "probs": probs},
    }


def latency_ms(datasets: Path, model: Any = None, n: int = 100) -> float:
    """Median wall time of ``predict`` per 30-s eval record (after warm-up), in ms."""
    model = model if model is not None else registry.get(NAME)
    with np.load(Path(datasets) / "cinc2017-eval.npz") as z:
        sig, off, fs, ns = z["signal"], z["offsets"], float(z["fs"]), z["n_samples"]
    idx = np.flatnonzero(ns == 9000)[:n]
    recs = [sig[off[i] : off[i + 1]].astype(np.float64) / 1000.0 for i in idx]
    for r in recs[:5]:
        model.predict(r, fs)
    times = []
    for r in recs:
        t = time.perf_counter()
        model.predict(r, fs)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000.0)


# ----------------------------------------------------------------------------- model card


def write_card(card: registry.ModelCard, path: Path | None = None) -> Path:
    """Write the human model card ``models/cards/ecg_rhythm.md`` from the JSON card."""
    path = path or registry.CARDS_DIR / f"{NAME}.md"
    v, tr, ev = card.metrics.get("validation", {}), card.metrics.get("training", {}), card.metrics.get("evaluation", {})
    h = card.hyper
    k = int(h.get("members", 1))
    mem = tr.get("members") or [
        {"seed": card.seed, "best_epoch": tr.get("best_epoch"), "validation": v, "wall_time_s": tr.get("wall_time_s")}
    ]
    lines = [
        f"# {card.label}: single-lead ECG rhythm classifier (N / AF / other / noisy)",
        "",
        f"Weights `models/weights/{NAME}.pt` (SHA-256 `{card.sha256}`), created {card.created}, seed {card.seed}.",
        "",
        "## Data",
        "",
        f"- {card.training_data}.",
        "- Records A06001-A08528 are a reserved block (the evaluation file was drawn from it); they are never read.",
        f"- Split (train, validation) per class: {tr.get('counts_train_val')}.",
        "- Labels: `REFERENCE.csv` as shipped (relabelled reference).",
        "",
        "## Model",
        "",
        f"- Input: any lead, any rate; resampled to {h['fs']} Hz (`resample_poly`), 0.5 Hz high-pass, divided by the "
        f"99th percentile of |x|, clipped to +-{h['clip']}.",
        f"- Windows of {h['window_s']} s, hop {h['hop_s']} s; shorter records zero-padded and masked in pooling; "
        "record probabilities = mean of window softmax.",
        f"- 1-D residual CNN, stages {h['channels']} (stride 2 each, kernel {h['kernel']}), masked mean+max pooling, "
        f"concatenated with {er.N_RR_FEATURES} RR-irregularity features (5-20 Hz energy-envelope QRS detector, "
        "scipy find_peaks) -> MLP -> 4 classes.",
        "- Loss: cross-entropy, class weights 1/sqrt(prevalence), label smoothing 0.05; AdamW + one-cycle LR; "
        "augmentation: random 30-s crops (15 % shortened to >= 5 s), amplitude scaling, noise, baseline wander.",
        (
            f"- Seed ensemble of {k} such networks (init/shuffle/augmentation seeds {h.get('member_seeds')}, "
            f"all trained on the same split of seed {card.seed}); one state_dict (`members.<i>.` keys); the record "
            "probabilities are the mean of the members' probabilities."
        )
        if k > 1
        else (
            f"- One network (K = 1, init/shuffle/augmentation seed {card.seed}, plain state_dict keys); "
            "`--members K` trains a seed ensemble on the same split (the loader accepts both layouts)."
        ),
        f"- Early stopping per member on validation mean F1 (N/A/O), max {tr.get('max_epochs')} epochs, patience "
        f"{tr.get('patience', 8)}. Training wall time {tr.get('wall_time_s')} s on the shared 2-core CPU "
        f"({tr.get('parallel_jobs', 1)} training process(es) in parallel, torch threads {tr.get('torch_threads')} "
        "each), data loading included.",
        "",
        "| member seed | best epoch | validation mean F1 N/A/O | validation AF AUC | wall s |",
        "|---|---|---|---|---|",
        *[
            f"| {m['seed']} | {m['best_epoch']} | {m['validation'].get('mean_f1_NAO')} | "
            f"{m['validation'].get('af_auc')} | {m.get('wall_time_s')} |"
            for m in mem
        ],
        *([f"| ensemble | - | {v.get('mean_f1_NAO')} | {v.get('af_auc')} | - |"] if k > 1 else []),
        "",
        "- Reproduce: `python -m teleread.models.training.train_ecg_rhythm --data /work/data/training2017 --seed 0 "
        f"--members {k} --jobs {tr.get('parallel_jobs', 1)}` (train, evaluate, card; `--jobs` does not change the "
        "result). Seeded (torch, numpy) per member with deterministic algorithms; bit-identical weights need "
        "the same torch build, CPU and thread count.",
        "",
        "## Thresholds (chosen on the validation split only)",
        "",
        f"- `af_urgent` = {card.thresholds.get('af_urgent')}: AF probability at or above which AF is flagged; the "
        f"lowest 1 % quantile of the {'ensemble' if k > 1 else 'model'}'s validation AF probabilities (with 75 "
        "validation AF records: the lowest one), rounded down to 1e-4 and capped at 0.5, i.e. validation AF "
        "sensitivity >= 0.99.",
        f"- `noisy` = {card.thresholds.get('noisy')}: ~ probability at or above which the record can be called "
        "unreadable (maximises validation F1 of ~).",
        "- The reported label is the arg-max class; the thresholds are for triage flags.",
        "",
        f"## Validation ({v.get('n')} records, A00001-A06000 held-out split)",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {k} | {val} |" for k, val in v.items() if k != "n"],
        "",
    ]
    if ev:
        lines += [
            f"## Evaluation (`shared/datasets/cinc2017-eval.npz`, {ev.get('n')} records: N 160, A 120, O 90, ~ 30)",
            "",
            "95 % percentile bootstrap CI over records (1,000 resamples).",
            "",
            "| metric | value | 95 % CI |",
            "|---|---|---|",
            *[f"| {m['name']} | {m['value']:.3f} | [{m['low']:.3f}, {m['high']:.3f}] |" for m in ev["metrics"]],
            "",
            "Published (CinC 2017 hidden test, 3,658 records): "
            + "; ".join(f"{n} {s} ({src})" for n, s, src in PUBLISHED)
            + ".",
            "",
            f"Inference: median {ev.get('latency_ms')} ms per 30-s record (`predict`, one process, after warm-up, "
            f"torch threads {ev.get('torch_threads')}). Weights {ev.get('weights_kb')} kB.",
            "",
            "**How this evaluation set differs from the hidden test.** It is 400 records drawn from the public "
            "training set's reserved block A06001-A08528 (same source population as our training data, not the "
            "hidden test's), stratified and AF-enriched: A 30 % (vs 8.7 % in the challenge data), N 40 % (vs 59 %), "
            "O 22.5 % (vs 29 %), ~ 7.5 % (vs 3.3 %). AF enrichment raises AF precision and F1 relative to a "
            "prevalence-true set; the CIs are wide (a few hundred records). The figures are not comparable "
            "one-to-one with the published hidden-test scores.",
            "",
        ]
    lines += [
        "## Development note",
        "",
        "- 1.0.0 (single network, seed 0): two training configurations were compared on the validation split, "
        "30 epochs / patience 8 (validation mean F1 0.837, best epoch 15) and 36 epochs / patience 12 (0.832, AF AUC "
        "0.961, `af_urgent` 0.012 with 9 % validation specificity); the first was kept. A 1-epoch rerun gave "
        "bit-identical weights twice.",
        (
            f"- Seed ensemble, K = {k} fixed in advance (not tuned), the same 30 / 8 configuration and the same "
            f"split for every member. Member seed {mem[0]['seed']} alone: validation mean F1 "
            f"{mem[0]['validation'].get('mean_f1_NAO')}; ensemble: {v.get('mean_f1_NAO')}. Thresholds were "
            "re-chosen on the ensemble's validation probabilities. The evaluation file was only scored."
        )
        if k > 1
        else (
            "- Candidate 1.1.0, a K = 3 seed ensemble (seeds 0, 1, 2; same split of seed 0, same 30 / 8 "
            "configuration; `--members 3`), was trained: members' validation mean F1 0.8374 / 0.8292 / 0.8352, "
            "ensemble 0.8343 (AF AUC 0.9881, F1 ~ 0.780, accuracy 0.862, `af_urgent` 0.0894 with validation "
            "specificity 0.887). Its validation mean F1 N/A/O, the selection metric, is not above this single "
            "network's 0.8374, so the single network was kept. Its seed-0 member was bit-identical to these "
            "weights (training is deterministic, also across parallel member processes). For the record only, "
            "not used for the choice: on the evaluation file the ensemble scored mean F1 N/A/O 0.843 "
            "[0.806, 0.878], F1 AF 0.909, AF AUC 0.984; inference about 8-10 ms per 30-s record."
        ),
        "",
        "## Limits",
        "",
        "- Trained on single-lead AliveCor (lead I-like) recordings; other leads (e.g. V1, aVR with inverted QRS) "
        "and 12-lead carts are outside the training distribution: use `predict_leads` and treat results as triage.",
        "- 'Other rhythm' is heterogeneous (ectopy, flutter, blocks, tachy/brady); flutter with regular conduction "
        "is not AF here. Paroxysmal AF in a small part of a long record may be missed when windows are averaged.",
        "- Challenge labels are noisy (the reference was relabelled after the challenge; 26 of the 400 evaluation "
        "records differ between the two reference versions); the ~ class is small (3 %).",
        "- Probabilities are not calibrated to a prevalence; the eval set is AF-enriched, so reweight for PPV.",
        "- Not a diagnostic device; every flag must be read by a clinician.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> None:
    """Full pipeline: train, evaluate on the eval file, record metrics in the card, write the .md card."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, required=True, help="the CinC 2017 training folder (REFERENCE.csv, A*.mat)")
    ap.add_argument("--datasets", type=Path, default=None, help="evaluation files (default ../shared/datasets)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--weights-dir", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on the shared 2-core box)")
    ap.add_argument("--members", type=int, default=DEFAULT_MEMBERS, help="ensemble size K (seeds seed..seed+K-1)")
    ap.add_argument("--jobs", type=int, default=1, help="members trained in parallel processes (1 thread each)")
    args = ap.parse_args(argv)
    if args.datasets is None:
        from teleread.models.training.evaluate import default_datasets

        args.datasets = default_datasets()
    torch.set_num_threads(max(1, min(2, args.threads)))
    card = train(
        args.data,
        seed=args.seed,
        weights_dir=args.weights_dir,
        epochs=args.epochs,
        members=args.members,
        jobs=args.jobs,
    )
    registry.clear_cache()
    model = registry.get(NAME, weights_dir=args.weights_dir)
    result = evaluate(args.datasets, model=model)
    torch.set_num_threads(1)
    lat = latency_ms(args.datasets, model=model)
    size_kb = round((registry._dir(args.weights_dir) / f"{NAME}.pt").stat().st_size / 1024, 1)
    evaluation = {
        "n": int(len(result["predictions"]["label"])),
        "file": "shared/datasets/cinc2017-eval.npz",
        "metrics": [m.to_dict() for m in result["metrics"]],
        "latency_ms": round(lat, 2),
        "torch_threads": 1,
        "weights_kb": size_kb,
    }
    for m in result["metrics"]:
        print(f"{m.name}: {m}")
    print(f"latency {lat:.2f} ms per 30-s record; weights {size_kb} kB")
    card = registry.update_card(NAME, weights_dir=args.weights_dir, metrics={"evaluation": evaluation})
    if args.weights_dir is None:
        print(f"card written to {write_card(card)}")


if __name__ == "__main__":
    main()
