"""Routing rules, read from a TOML file: modality -> specialty, site -> lead hospital, SLA clock."""

from __future__ import annotations

import tomllib
from importlib import resources
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from teleread.errors import InvalidInput
from teleread.vocab import Level

DEFAULT_ROUTING = Path(str(resources.files("teleread") / "defaults" / "routing.toml"))
LEVEL_RANK = {str(level): level.queue_rank for level in Level}


@dataclass(frozen=True)
class Routing:
    version: str
    specialty_by_modality: dict[str, str]
    default_specialty: str
    use_site_lead_hospital: bool
    lead_hospital_by_site: dict[str, str] = field(default_factory=dict)
    sla_minutes: dict[str, int] = field(default_factory=dict)
    # a critical exam still unclaimed this many minutes after arrival: who is notified, step by step
    critical_unclaimed: tuple[tuple[int, str], ...] = ((10, "on-call"), (20, "department-head"))
    # a critical result not acknowledged by the site this many minutes after it was published
    critical_unacknowledged: tuple[tuple[int, str], ...] = (
        (15, "second-contact"), (30, "site-supervisor"), (45, "duty-office"),
    )  # fmt: skip

    def specialty_for(self, modality: str) -> str:
        return self.specialty_by_modality.get(modality.upper(), self.default_specialty)

    def hospital_for(self, *, site_code: str, site_lead_hospital: str) -> str:
        return self.lead_hospital_by_site.get(site_code, site_lead_hospital)

    def deadline(self, *, level: str, arrived: datetime) -> datetime:
        return arrived + timedelta(minutes=self.sla_minutes[level])


def load_routing(path: Path | None = None) -> Routing:
    source = path or _packaged_default()
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput("routing file cannot be read or parsed", reason="BAD_ROUTING") from exc
    sla = {str(k): int(v) for k, v in data.get("sla_minutes", {}).items()}
    missing = set(LEVEL_RANK) - set(sla)
    if missing:
        raise InvalidInput("routing file lacks sla_minutes for a level", reason="BAD_ROUTING")
    routing = data.get("routing", {})
    escalations = {name: _steps(data, name) for name in ("critical_unclaimed", "critical_unacknowledged")}
    return Routing(
        version=str(data.get("version", "unversioned")),
        specialty_by_modality={k.upper(): v for k, v in data.get("specialty_by_modality", {}).items()},
        default_specialty=str(routing.get("default_specialty", "radiology")),
        use_site_lead_hospital=bool(routing.get("use_site_lead_hospital", True)),
        lead_hospital_by_site=dict(data.get("lead_hospital_by_site", {})),
        sla_minutes=sla,
        **{name: steps for name, steps in escalations.items() if steps},
    )


def _steps(data: dict[str, Any], name: str) -> tuple[tuple[int, str], ...] | None:
    """An escalation's steps, ``[[name]] steps = [{after_minutes, notify}, ...]``; None when not given."""
    steps = data.get(name, {}).get("steps")
    try:
        return tuple((int(step["after_minutes"]), str(step["notify"])) for step in steps) if steps else None
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInput(f"{name} steps need after_minutes and notify", reason="BAD_ROUTING") from exc


def _packaged_default() -> Path:
    # Installed: teleread/defaults sits beside this package's namespace parent.
    from importlib.resources import files

    return Path(str(files("teleread") / "defaults" / "routing.toml"))
