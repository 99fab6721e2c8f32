"""Chest radiograph triage: pneumonia vs normal from a 28×28 grey image (PneumoniaMNIST scale).

The network is an ensemble of small VGG-style CNNs (:class:`ChestNet`, members in one
``state_dict``) with a left-right flip test-time average. :func:`pixels_to_input` turns a CR/DX DICOM
dataset into the 28×28 image on the MedMNIST 0–255 scale (modality LUT, VOI LUT or first window,
MONOCHROME1 inverted, RGB to grey, first frame, centre square crop, area resize); the model's
normalisation is applied inside :meth:`ChestModel.predict`, so eval images and DICOM images go
through the same path. :func:`applies` says whether the model applies to an exam at all: chest
CR/DX only. Saliency is gradient × input, smoothed, with the top zones of a 3×3 grid named as a
reader would (the patient's right is on the image's left).
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pydicom
import torch
from torch import nn
from torch.nn import functional as F

from teleread.pixels import ensure_decoders
from teleread.errors import InvalidInput

__all__ = [
    "ChestModel",
    "ChestNet",
    "ChestPrediction",
    "Ensemble",
    "applies",
    "from_checkpoint",
    "pixels_to_input",
    "saliency_png",
    "tta_views",
]

SIZE = 28
MEAN = 0.5766  # PneumoniaMNIST train split, pixels / 255
STD = 0.1646
MODALITIES = ("CR", "DX", "DR")  # "DR" is not a DICOM modality but some digital rooms write it
_CHEST_WORDS = re.compile(r"chest|thora[xc]|lung|\bcxr\b|胸", re.IGNORECASE)
_LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "LLD", "RLD")
# image columns left → right: the patient's right, the mediastinum, the patient's left (PA/AP view)
ZONE_NAMES = (
    ("right upper zone", "central upper", "left upper zone"),
    ("right mid zone", "central mid", "left mid zone"),
    ("right lower zone", "central lower", "left lower zone"),
)


def _block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ChestNet(nn.Module):
    """Three stages of two 3×3 conv-BN-ReLU blocks, max-pool between, global average pool, one logit."""

    def __init__(self, widths: Sequence[int] = (16, 32, 64), dropout: float = 0.3) -> None:
        super().__init__()
        w1, w2, w3 = widths
        self.features = nn.Sequential(
            *_block(1, w1), *_block(w1, w1), nn.MaxPool2d(2),
            *_block(w1, w2), *_block(w2, w2), nn.MaxPool2d(2),
            *_block(w2, w3), *_block(w3, w3),
        )  # fmt: skip
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(w3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x).mean(dim=(2, 3))
        return self.head(self.drop(z)).squeeze(1)


class Ensemble(nn.Module):
    """Mean logit of ``n`` :class:`ChestNet` members (keys ``members.<i>.…`` in the state_dict)."""

    def __init__(self, n: int, widths: Sequence[int] = (16, 32, 64), dropout: float = 0.3) -> None:
        super().__init__()
        self.members = nn.ModuleList(ChestNet(widths, dropout) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(0)


def normalise(images: torch.Tensor, mean: float = MEAN, std: float = STD) -> torch.Tensor:
    """0–255 images (N, 28, 28) → normalised (N, 1, 28, 28)."""
    return ((images.float() / 255.0 - mean) / std).unsqueeze(1)


TTA_MODES = ("none", "flip", "flip+shift")


def tta_views(x: torch.Tensor, mode: str = "flip") -> torch.Tensor:
    """(N,1,H,W) → (kN,1,H,W): ``none`` identity; ``flip`` also flipped left-right (k=2);
    ``flip+shift`` identity and four one-pixel shifts (replicate pad), each also flipped (k=10)."""
    if mode == "none":
        return x
    views = [x]
    if mode == "flip+shift":
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        h, w = x.shape[-2:]
        views += [padded[..., r : r + h, c : c + w] for r, c in [(0, 1), (2, 1), (1, 0), (1, 2)]]
    elif mode != "flip":
        raise ValueError(f"unknown TTA mode {mode!r}")
    views += [v.flip(-1) for v in views]
    return torch.cat(views)


def tta_logits(net: nn.Module, x: torch.Tensor, mode: str = "flip") -> torch.Tensor:
    """Mean logit over :func:`tta_views` for a normalised batch (N,1,H,W)."""
    n = x.shape[0]
    return net(tta_views(x, mode)).view(-1, n).mean(0)


@dataclass(frozen=True)
class ChestPrediction:
    probability: float
    label: str  # "pneumonia" or "normal" at the card's decision threshold
    saliency: np.ndarray = field(repr=False)  # (28, 28) float32, 0..1
    regions: list[tuple[str, float]] = field(default_factory=list)  # top 3 zones, weights sum to ≤ 1
    urgent: bool = False  # probability at or above the sensitivity-first "urgent" threshold
    model: str = ""


class ChestModel:
    """The loaded predictor: ``card`` plus an eval-mode :class:`Ensemble`."""

    def __init__(self, card: Any, net: Ensemble) -> None:
        self.card = card
        self.net = net.eval()
        hyper = dict(getattr(card, "hyper", {}) or {})
        self.mean = float(hyper.get("mean", MEAN))
        self.std = float(hyper.get("std", STD))
        self.tta = str(hyper.get("tta", "flip"))
        thresholds = dict(getattr(card, "thresholds", {}) or {})
        self.decision = float(thresholds.get("decision", 0.5))
        self.urgent = float(thresholds.get("urgent", self.decision))

    def _input(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        arr = np.stack([np.asarray(im, dtype=np.float32).reshape(SIZE, SIZE) for im in images])
        return normalise(torch.from_numpy(arr), self.mean, self.std)

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray] | np.ndarray, batch: int = 64) -> np.ndarray:
        """Pneumonia probability of each 0–255 28×28 image (no saliency; for evaluation)."""
        out = []
        for i in range(0, len(images), batch):
            x = self._input(list(images[i : i + batch]))
            logits = tta_logits(self.net, x, self.tta)
            out.append(torch.sigmoid(logits).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def predict(self, image28: np.ndarray) -> ChestPrediction:
        """Probability, label, saliency and top zones of one 0–255 28×28 image."""
        return self.predict_batch([image28])[0]

    def predict_batch(self, images: Sequence[np.ndarray]) -> list[ChestPrediction]:
        if not len(images):
            return []
        probs = self.probabilities(images)
        x = self._input(images).requires_grad_(True)
        # gradient × input of the (non-TTA) mean logit; autograd.grad leaves the shared parameters' .grad
        # untouched, so concurrent predictions from a thread pool do not interfere
        (grad,) = torch.autograd.grad(self.net(x).sum(), x)
        maps = (grad * x).detach()[:, 0].abs().numpy()
        return [self._prediction(float(p), m) for p, m in zip(probs, maps)]

    def _prediction(self, p: float, grad_x_input: np.ndarray) -> ChestPrediction:
        sal = _smooth_normalise(grad_x_input)
        return ChestPrediction(
            probability=p,
            label="pneumonia" if p >= self.decision else "normal",
            saliency=sal,
            regions=zone_weights(sal)[:3],
            urgent=p >= self.urgent,
            model=str(getattr(self.card, "label", "")),
        )

    def predict_dicom(self, ds: pydicom.Dataset) -> ChestPrediction | str:
        """A prediction for a chest CR/DX dataset, or the reason the model does not apply."""
        ok, reason = applies(ds)
        if not ok:
            return reason
        return self.predict(pixels_to_input(ds))


def _smooth_normalise(m: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    s = gaussian_filter(m.astype(np.float32), sigma=1.0)
    lo, hi = float(s.min()), float(s.max())
    return ((s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)).astype(np.float32)


def zone_weights(saliency: np.ndarray) -> list[tuple[str, float]]:
    """Share of the saliency in each zone of a 3×3 grid, largest first."""
    edges = np.linspace(0, saliency.shape[0], 4).round().astype(int)
    cols = np.linspace(0, saliency.shape[1], 4).round().astype(int)
    total = float(saliency.sum()) or 1.0
    zones = [
        (ZONE_NAMES[r][c], float(saliency[edges[r] : edges[r + 1], cols[c] : cols[c + 1]].sum()) / total)
        for r in range(3)
        for c in range(3)
    ]
    return sorted(zones, key=lambda z: -z[1])


def from_checkpoint(card: Any, state: Mapping[str, torch.Tensor]) -> ChestModel:
    """Registry hook: build the ensemble described by ``card.hyper`` and load ``state``."""
    hyper = dict(card.hyper)
    net = Ensemble(
        int(hyper.get("members", 3)), tuple(hyper.get("widths", (16, 32, 64))), float(hyper.get("dropout", 0.3))
    )
    net.load_state_dict(dict(state))
    return ChestModel(card, net)


# ---------------------------------------------------------------- DICOM


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip()


def _code(value: str) -> str:
    """A short printable code value for a reason (never free text)."""
    return re.sub(r"[^A-Za-z0-9_ ]", "", value)[:16].upper() or "?"


def applies(ds: pydicom.Dataset) -> tuple[bool, str]:
    """Whether the model applies: a chest CR/DX exam (body part, or descriptions when it is missing)."""
    modality = _text(ds, "Modality").upper()
    if not modality:
        return False, "no model for this exam: modality not stated"
    if modality not in MODALITIES:
        return False, f"no model for this exam: modality {_code(modality)}"
    view = _text(ds, "ViewPosition").upper()
    if view in _LATERAL_VIEWS:
        return False, f"no model for this exam: view {view} (frontal chest views only)"
    body = _text(ds, "BodyPartExamined")
    if body:
        if _CHEST_WORDS.search(body.replace("_", " ")):
            return True, "chest radiograph"
        return False, f"no model for this exam: body part {_code(body)}"
    for keyword in ("StudyDescription", "SeriesDescription", "ProtocolName"):
        if _CHEST_WORDS.search(_text(ds, keyword).replace("_", " ")):
            return True, f"chest radiograph ({keyword})"
    return False, "no model for this exam: body part not stated"


_J2K_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
_J2K_MIN_SIDE = 8 * SIZE  # a reduced-resolution decode keeps at least this many pixels per side


def _decode_j2k_reduced(ds: pydicom.Dataset) -> np.ndarray | None:
    """A JPEG 2000 grey frame decoded at a lower wavelet resolution level (the model needs 28 px).

    A 2048-px radiograph decodes in about 2 ms at 1/16 scale instead of about 200 ms at full size.
    Returns None (the caller decodes in full) for anything but unsigned single-frame grey images.
    """
    from PIL import Image

    ts = str(getattr(ds.get("file_meta", None), "TransferSyntaxUID", "") or "")
    if ts not in _J2K_SYNTAXES or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    if int(ds.get("PixelRepresentation", 0)) != 0 or "ModalityLUTSequence" in ds:
        return None
    bits = int(ds.get("BitsStored", 16))
    side = min(int(ds.Rows), int(ds.Columns))
    reduce = 0
    while side >> (reduce + 1) >= _J2K_MIN_SIDE and reduce < 5:
        reduce += 1
    if reduce == 0:
        return None
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as im:
            im.reduce = reduce  # type: ignore[method-assign,assignment]  # Jpeg2KImageFile: resolution levels to drop
            im.load()
            arr = np.asarray(im)
            mode = im.mode
    except Exception:  # noqa: BLE001 - fall back to the full decoder, which reports its own error
        return None
    if mode.startswith("I;16") and bits < 16:
        arr = arr >> (16 - bits)  # Pillow scales precision < 16 bits up to 16
    elif mode != "L" and not mode.startswith("I;16"):
        return None
    return np.asarray(arr)


def _decode(ds: pydicom.Dataset) -> np.ndarray:
    if "PixelData" not in ds:
        raise InvalidInput("the dataset has no pixel data", reason="NO_PIXEL_DATA")
    fast = _decode_j2k_reduced(ds)
    if fast is not None:
        return fast
    ensure_decoders()  # every syntax the gateway accepts, 12-bit JPEG extended included
    try:
        arr = pydicom.pixels.pixel_array(ds, index=0 if int(ds.get("NumberOfFrames", 1) or 1) > 1 else None)
    except Exception:  # noqa: BLE001 - decoder errors may quote data; we report our own message
        raise InvalidInput("the pixel data could not be decoded", reason="UNDECODABLE_PIXEL_DATA") from None
    return np.asarray(arr)


def _grey(values: np.ndarray, ds: pydicom.Dataset, monochrome1: bool) -> np.ndarray:
    """Stored values → 0–255 display grey: modality LUT, VOI LUT or first window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        out = apply_modality_lut(values, ds).astype(np.float64)
        lo, hi = float(out.min()), float(out.max())
        if "VOILUTSequence" in ds or "WindowCenter" in ds:
            out = apply_voi_lut(out, ds, index=0).astype(np.float64)
            # the output range of this VOI transform: what it maps -inf/+inf to
            lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0))
            lo, hi = min(lo, hi), max(lo, hi)
            if hi <= lo:
                lo, hi = float(out.min()), float(out.max())
    except Exception:  # noqa: BLE001 - malformed LUT/window attributes
        raise InvalidInput("the grey-scale transforms could not be applied", reason="BAD_VOI") from None
    img = (np.clip(out, lo, hi) - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(out)
    return (255.0 - img if monochrome1 else img).astype(np.float32)


def pixels_to_input(ds: pydicom.Dataset) -> np.ndarray:
    """The (28, 28) float32 image on the MedMNIST 0–255 scale, bone bright, from a DICOM dataset."""
    from PIL import Image

    arr = _decode(ds)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour (pydicom gives RGB for YBR by default)
        arr = arr[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        arr = arr * np.float32(255.0 / (2 ** int(ds.get("BitsStored", 8)) - 1))
        colour = True
    elif arr.ndim == 2:
        colour = False
    else:
        raise InvalidInput("unsupported pixel layout", reason="UNSUPPORTED_PIXELS")
    h, w = arr.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    arr = arr[top : top + side, left : left + side]
    if not colour:
        monochrome1 = _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1"
        lo, hi = (int(arr.min()), int(arr.max())) if arr.dtype.kind in "ui" else (0, -1)
        if lo <= hi and hi - lo <= (1 << 20):
            # integer pixels: transform each stored value once, then look the image up (same result, faster)
            table = _grey(np.arange(lo, hi + 1, dtype=np.int64), ds, monochrome1)
            arr = table[arr.astype(np.int32, copy=False) - lo]
        else:
            arr = _grey(arr, ds, monochrome1)
    square = np.ascontiguousarray(arr, dtype=np.float32)
    small = Image.fromarray(square, mode="F").resize((SIZE, SIZE), Image.Resampling.BOX)
    return np.clip(np.round(np.asarray(small, dtype=np.float32)), 0.0, 255.0).astype(np.float32)


# ---------------------------------------------------------------- display


def saliency_png(prediction: ChestPrediction, image28: np.ndarray, size: int = 256) -> bytes:
    """A PNG for the reader: the grey image with a red heat overlay of the saliency."""
    from PIL import Image

    grey = Image.fromarray(np.clip(np.asarray(image28, np.float32), 0, 255).astype(np.uint8), mode="L")
    grey = grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
    sal = Image.fromarray((np.clip(prediction.saliency, 0, 1) * 255).astype(np.uint8), mode="L")
    alpha = np.asarray(sal.resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255.0
    base = np.asarray(grey, np.float32)
    red = np.zeros_like(base)
    red[..., 0] = 255.0
    a = (0.6 * np.clip((alpha - 0.2) / 0.8, 0.0, 1.0))[..., None]  # faint saliency stays uncoloured
    out = Image.fromarray((base * (1 - a) + red * a).clip(0, 255).astype(np.uint8), mode="RGB")
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()
