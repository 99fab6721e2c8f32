"""Model registry: the learned triage models, their weights, provenance and measured metrics.

Each model ``NAME`` is three committed files under ``models/weights/``:

- ``NAME.pt``: the weights, a plain ``state_dict`` of tensors (loaded with ``weights_only=True``);
- ``NAME.json``: the card metadata: name, version, module, SHA-256 of the weights, training data
  and split, seed, architecture hyper-parameters, calibrated thresholds, and measured metrics;
- ``models/cards/NAME.md``: the human model card (data, split, metrics, limits).

``get(NAME)`` loads a model once per process, lazily, after checking the weights' SHA-256; a
missing or altered weight file, or a missing dependency, raises :class:`ModelUnavailable` naming
the model and the problem. A model module (``teleread.models.<module>``) exposes
``from_checkpoint(card, state_dict)`` returning its predictor object.
"""

from __future__ import annotations

import datetime as dt
import functools
import importlib
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from teleread.errors import TelereadError
from teleread.files import atomic_file, atomic_write_text, hash_file

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
CARDS_DIR = Path(__file__).resolve().parents[1] / "cards"

__all__ = ["ModelCard", "ModelUnavailable", "available", "card", "get", "save", "WEIGHTS_DIR", "CARDS_DIR"]


class ModelUnavailable(TelereadError):
    """A model's weights or code cannot be loaded (missing file, altered weights, missing package)."""

    code = "FAILED_PRECONDITION"
    default_reason = "MODEL_UNAVAILABLE"


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    module: str  # teleread.models.<module> holds from_checkpoint()
    sha256: str
    task: str
    training_data: str
    seed: int
    hyper: dict[str, Any] = field(default_factory=dict)  # architecture/preprocessing parameters
    thresholds: dict[str, Any] = field(default_factory=dict)  # chosen on validation data
    metrics: dict[str, Any] = field(default_factory=dict)  # measured (validation and evaluation)
    created: str = ""

    @property
    def label(self) -> str:
        """``name@version`` as triage output names it."""
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "module": self.module,
            "sha256": self.sha256,
            "task": self.task,
            "training_data": self.training_data,
            "seed": self.seed,
            "hyper": self.hyper,
            "thresholds": self.thresholds,
            "metrics": self.metrics,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        return cls(
            name=str(data["name"]),
            version=str(data["version"]),
            module=str(data["module"]),
            sha256=str(data["sha256"]),
            task=str(data.get("task", "")),
            training_data=str(data.get("training_data", "")),
            seed=int(data.get("seed", 0)),
            hyper=dict(data.get("hyper", {})),
            thresholds=dict(data.get("thresholds", {})),
            metrics=dict(data.get("metrics", {})),
            created=str(data.get("created", "")),
        )


def _dir(weights_dir: Path | None) -> Path:
    return weights_dir if weights_dir is not None else WEIGHTS_DIR


def available(weights_dir: Path | None = None) -> list[str]:
    """Names of the models whose card metadata is present."""
    return sorted(p.stem for p in _dir(weights_dir).glob("*.json"))


def card(name: str, weights_dir: Path | None = None) -> ModelCard:
    path = _dir(weights_dir) / f"{name}.json"
    try:
        return ModelCard.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ModelUnavailable(f"model {name!r}: no card {path.name} in the weights folder") from None
    except (ValueError, KeyError) as exc:
        raise ModelUnavailable(f"model {name!r}: card {path.name} is malformed ({type(exc).__name__})") from None


def _sha256(path: Path) -> str:
    return hash_file(path).sha256


def load_state(name: str, weights_dir: Path | None = None) -> tuple[ModelCard, dict[str, Any]]:
    """The card and the verified ``state_dict`` of ``name``."""
    meta = card(name, weights_dir)
    path = _dir(weights_dir) / f"{name}.pt"
    if not path.is_file():
        raise ModelUnavailable(f"model {meta.label}: weight file {path.name} is missing", metadata={"model": name})
    digest = _sha256(path)
    if digest != meta.sha256:
        raise ModelUnavailable(
            f"model {meta.label}: weight file {path.name} has SHA-256 {digest[:12]}…, card says {meta.sha256[:12]}…",
            reason="MODEL_WEIGHTS_MISMATCH",
            metadata={"model": name},
        )
    try:
        import torch
    except ImportError:
        raise ModelUnavailable(f"model {meta.label}: PyTorch is not installed", metadata={"model": name}) from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return meta, state


_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _get(name: str, weights_dir: Path | None) -> Any:
    meta, state = load_state(name, weights_dir)
    try:
        module = importlib.import_module(f"teleread.models.inference.{meta.module}")
    except ImportError as exc:
        raise ModelUnavailable(
            f"model {meta.label}: its code teleread.models.{meta.module} cannot be imported ({exc.name or 'module'})",
            metadata={"model": name},
        ) from None
    return module.from_checkpoint(meta, state)


def get(name: str, weights_dir: Path | None = None) -> Any:
    """The loaded predictor of ``name``: loaded once per process, on first use."""
    with _lock:
        return _get(name, weights_dir)


def clear_cache() -> None:
    _get.cache_clear()


def save(
    name: str,
    *,
    state_dict: Mapping[str, Any],
    module: str,
    version: str,
    task: str,
    training_data: str,
    seed: int,
    hyper: Mapping[str, Any] | None = None,
    thresholds: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    weights_dir: Path | None = None,
) -> ModelCard:
    """Write ``NAME.pt`` and ``NAME.json`` (SHA-256 of the written weights) atomically."""
    import torch

    folder = _dir(weights_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / f"{name}.pt") as out:
        torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, out)
    meta = ModelCard(
        name=name,
        version=version,
        module=module,
        sha256=_sha256(folder / f"{name}.pt"),
        task=task,
        training_data=training_data,
        seed=seed,
        hyper=dict(hyper or {}),
        thresholds=dict(thresholds or {}),
        metrics=dict(metrics or {}),
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
    )
    atomic_write_text(folder / f"{name}.json", json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n")
    clear_cache()
    return meta


def update_card(name: str, weights_dir: Path | None = None, **changes: Any) -> ModelCard:
    """Rewrite fields of a card (e.g. thresholds or metrics measured after training)."""
    data = card(name, weights_dir).to_dict()
    for key, value in changes.items():
        if isinstance(data.get(key), dict) and isinstance(value, Mapping):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = _dir(weights_dir) / f"{name}.json"
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
    clear_cache()
    return ModelCard.from_dict(data)
