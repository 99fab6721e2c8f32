"""Train, select and evaluate the ``chest_pneumonia`` model (PneumoniaMNIST 28 px).

``train`` fits an ensemble of small CNNs on the **train** split only, picks each member's epoch
and both thresholds on the **val** split, and saves weights and card through the registry.
``evaluate`` scores the saved model on ``pneumoniamnist-test-eval.npz`` (never used for training,
selection or thresholds). The ``test`` split of the training npz is never read.

Run: ``python -m teleread.models.train_chest_xray --data /work/data/pmnist --seed 0``
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch.nn import functional as F

from teleread.models import registry
from teleread.models.chest_xray import Ensemble, normalise, tta_logits
from teleread.models.metrics import Metric, accuracy, auc, bootstrap, sensitivity, specificity

NAME = "chest_pneumonia"
VERSION = "1.0.0"
EVAL_FILE = "pneumoniamnist-test-eval.npz"
CARD_MD = registry.CARDS_DIR / f"{NAME}.md"
PUBLISHED = [
    ("PneumoniaMNIST 28 px AUC, ResNet-18", 0.944, "Yang et al., Sci Data 2023"),
    ("PneumoniaMNIST 28 px AUC, ResNet-50", 0.948, "Yang et al., Sci Data 2023"),
    ("PneumoniaMNIST 28 px ACC, ResNet-18", 0.854, "Yang et al., Sci Data 2023"),
    ("PneumoniaMNIST 28 px ACC, ResNet-50", 0.854, "Yang et al., Sci Data 2023"),
]
HYPER: dict[str, Any] = {
    "architecture": "mean-logit ensemble of 3 VGG-style CNNs: 3 stages of 2x(conv3x3-BN-ReLU), max-pool between, "
    "global average pool, dropout, linear -> 1 logit",
    "members": 3,
    "widths": [24, 48, 96],
    "dropout": 0.3,
    "input": "28x28 grey, MedMNIST 0-255 scale; (x/255 - mean)/std",
    "mean": 0.5766,
    "std": 0.1646,
    "tta": True,
    "tta_views": "identity and 4 one-pixel shifts (replicate pad), each also flipped left-right; mean logit",
    "epochs": 32,
    "batch": 128,
    "optimizer": "AdamW",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "schedule": "1 epoch linear warm-up, then cosine to 0 (per step)",
    "label_smoothing": 0.1,
    "class_weights": "inverse frequency (n / (2 n_class)) on the train split",
    "augmentation": "rotation +-10 deg, scale 0.9-1.1, translation +-12 %, horizontal flip p=0.5, gamma 0.8-1.25, "
    "contrast 0.8-1.2, brightness +-0.08 (on 0..1)",
    "selection": "per member, the epoch with the highest val AUC (ties: the later epoch)",
    "dicom": "modality LUT, VOI LUT or first window, MONOCHROME1 inverted, RGB->grey, first frame, "
    "centre square crop, PIL BOX resize to 28x28, rounded to 0-255",
}


def _npz(data: Path) -> Path:
    return data / "pneumoniamnist.npz" if data.is_dir() else data


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random affine + flip + intensity jitter on a batch of 0..1 images (N,1,H,W)."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=gen) * (hi - lo) + lo

    ang, scale = u(-10, 10) * math.pi / 180, u(0.9, 1.1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, u(-0.12, 0.12)], 1), torch.stack([sin * flip, cos, u(-0.12, 0.12)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = x.clamp(0, 1) ** u(0.8, 1.25).view(n, 1, 1, 1)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - m) * u(0.8, 1.2).view(n, 1, 1, 1) + m + u(-0.08, 0.08).view(n, 1, 1, 1)
    return x.clamp(0, 1)


@torch.no_grad()
def _logits(net: torch.nn.Module, images: torch.Tensor, tta: bool = False) -> np.ndarray:
    net.eval()
    x = normalise(images, HYPER["mean"], HYPER["std"])
    out = [(tta_logits(net, x[i : i + 256]) if tta else net(x[i : i + 256])) for i in range(0, len(x), 256)]
    return torch.cat(out).numpy()


def _fit_member(
    k: int, seed: int, xtr: torch.Tensor, ytr: torch.Tensor, xva: torch.Tensor, yva: np.ndarray, log: Callable
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    h = HYPER
    torch.manual_seed(seed * 1000 + k)
    gen = torch.Generator().manual_seed(seed * 1000 + k)
    net = Ensemble(1, h["widths"], h["dropout"]).members[0]
    opt = torch.optim.AdamW(net.parameters(), lr=h["lr"], weight_decay=h["weight_decay"])
    n, bs, epochs = len(xtr), h["batch"], h["epochs"]
    steps_per_epoch = math.ceil(n / bs)
    total, warm = epochs * steps_per_epoch, steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    counts = torch.bincount(ytr.long(), minlength=2).float()
    class_w = n / (2 * counts)
    ls = h["label_smoothing"]
    best: dict[str, Any] = {"auc": -1.0}
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(n, generator=gen)
        run = 0.0
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            x = _augment(xtr[idx].float().unsqueeze(1) / 255.0, gen)
            x = (x - h["mean"]) / h["std"]
            y = ytr[idx].float()
            loss = F.binary_cross_entropy_with_logits(net(x), y * (1 - ls) + ls / 2, weight=class_w[ytr[idx].long()])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss) * len(idx)
        val_auc = auc(yva, _logits(net, xva))
        if val_auc >= best["auc"]:
            best = {"auc": val_auc, "epoch": epoch + 1, "state": copy.deepcopy(net.state_dict())}
        log(f"member {k} epoch {epoch + 1:2d}/{epochs} train loss {run / n:.4f} val AUC {val_auc:.4f}")
    log(f"member {k}: selected epoch {best['epoch']} (val AUC {best['auc']:.4f})")
    return best["state"], {"epoch": best["epoch"], "val_auc": round(best["auc"], 4)}


def choose_thresholds(y: np.ndarray, p: np.ndarray, min_sensitivity: float = 0.98) -> dict[str, float]:
    """``decision``: Youden's J on (y, p); ``urgent``: the highest threshold keeping sensitivity ≥ target."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, p)
    finite = np.isfinite(thr)
    j = np.argmax(np.where(finite, tpr - fpr, -np.inf))
    ok = np.flatnonzero((tpr >= min_sensitivity) & finite)
    urgent = float(thr[ok[0]]) if len(ok) else float(np.min(p))
    return {"decision": round(float(thr[j]), 6), "urgent": round(urgent, 6), "urgent_min_val_sensitivity": min_sensitivity}


def train(data: Path, seed: int = 0, weights_dir: Path | None = None, log: Callable[..., Any] = print) -> registry.ModelCard:
    """Fit on train, select on val, save ``chest_pneumonia`` via the registry; deterministic given ``seed``."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    path = _npz(Path(data))
    with np.load(path) as d:  # only the train and val splits are read
        xtr, ytr = torch.from_numpy(d["train_images"]), torch.from_numpy(d["train_labels"].ravel().astype(np.int64))
        xva, yva = torch.from_numpy(d["val_images"]), d["val_labels"].ravel().astype(np.int64)
    log(f"train {len(xtr)} (normal {int((ytr == 0).sum())}, pneumonia {int((ytr == 1).sum())}); "
        f"val {len(xva)} (normal {int((yva == 0).sum())}, pneumonia {int((yva == 1).sum())})")  # fmt: skip
    t0 = time.perf_counter()
    ens = Ensemble(HYPER["members"], HYPER["widths"], HYPER["dropout"])
    selected = []
    for k in range(HYPER["members"]):
        state, info = _fit_member(k, seed, xtr, ytr, xva, yva, log)
        ens.members[k].load_state_dict(state)
        selected.append(info)
    seconds = time.perf_counter() - t0
    pva = 1 / (1 + np.exp(-_logits(ens, xva, tta=True)))
    thresholds = choose_thresholds(yva, pva)
    val = {
        "auc": round(auc(yva, pva), 4),
        "accuracy": round(accuracy(yva, pva >= thresholds["decision"]), 4),
        "sensitivity_urgent": round(sensitivity(yva, pva >= thresholds["urgent"]), 4),
        "specificity_urgent": round(specificity(yva, pva >= thresholds["urgent"]), 4),
        "n": len(yva),
    }
    log(f"ensemble val AUC {val['auc']:.4f}, accuracy {val['accuracy']:.4f}; thresholds {thresholds}; {seconds:.0f} s")
    return registry.save(
        NAME,
        state_dict=ens.state_dict(),
        module="chest_xray",
        version=VERSION,
        task="pneumonia vs normal from a frontal chest radiograph (28x28, PneumoniaMNIST scale); triage aid",
        training_data=f"{path.name} train split ({len(xtr)} images; altered, official has 4,708); "
        f"val split ({len(xva)}) for epoch selection and thresholds; test split not used",
        seed=seed,
        hyper={**HYPER, "selected": selected, "train_seconds": round(seconds, 1), "torch_threads": 1},
        thresholds=thresholds,
        metrics={"validation": val},
        weights_dir=weights_dir,
    )


def evaluate(datasets: Path, model: Any = None) -> dict[str, Any]:
    """Metrics with 95 % bootstrap CIs on ``pneumoniamnist-test-eval.npz`` in ``datasets``."""
    if model is None:
        model = registry.get(NAME)
    with np.load(Path(datasets) / EVAL_FILE) as d:
        images, labels = d["images"], d["labels"].astype(np.int64)
    prob = model.probabilities(images)
    dec, urg = model.decision, model.urgent
    metrics: list[Metric] = [
        bootstrap("AUC", auc, labels, prob),
        bootstrap("accuracy (decision)", lambda y, p: accuracy(y, p >= dec), labels, prob),
        bootstrap("sensitivity (urgent)", lambda y, p: sensitivity(y, p >= urg), labels, prob),
        bootstrap("specificity (urgent)", lambda y, p: specificity(y, p >= urg), labels, prob),
        bootstrap("sensitivity (decision)", lambda y, p: sensitivity(y, p >= dec), labels, prob),
        bootstrap("specificity (decision)", lambda y, p: specificity(y, p >= dec), labels, prob),
    ]
    return {"metrics": metrics, "published": PUBLISHED, "predictions": {"label": labels, "prob": prob}, "n": len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/data/pmnist"))
    parser.add_argument("--datasets", type=Path, default=Path("/work/shared/datasets"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    card = train(args.data, seed=args.seed)
    result = evaluate(args.datasets)
    for m in result["metrics"]:
        print(f"eval {m.name}: {m}")
    registry.update_card(NAME, metrics={"evaluation": {"n": result["n"], "metrics": [m.to_dict() for m in result["metrics"]]}})
    print(f"saved {card.label}")


if __name__ == "__main__":
    main()
