"""Routing rules, read from a TOML file: modality -> specialty, modality and body part ->
subspecialty, site -> lead hospital, and the SLA clock per level, modality, subspecialty and
patient class (in minutes, or in working minutes of the calendar)."""

from __future__ import annotations

import tomllib
from importlib import resources
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from teleread.errors import InvalidInput
from teleread.reader.hub.workdays import WorkCalendar
from teleread.vocab import Level

DEFAULT_ROUTING = Path(str(resources.files("teleread") / "defaults" / "routing.toml"))
LEVEL_RANK = {str(level): level.queue_rank for level in Level}


@dataclass(frozen=True)
class SubspecialtyRule:
    """Exams of these modalities (and body parts; none: any) are read by this subspecialty."""

    subspecialty: str
    modalities: frozenset[str]
    body_parts: frozenset[str] = frozenset()

    def matches(self, modality: str, body_parts: frozenset[str]) -> bool:
        return modality.upper() in self.modalities and (not self.body_parts or bool(self.body_parts & body_parts))


@dataclass(frozen=True)
class SlaRule:
    """A reading deadline for a level, narrowed by modality, subspecialty and patient class (each
    empty: any); in minutes, or in working minutes of the calendar."""

    level: str
    minutes: int
    working: bool = False
    modalities: frozenset[str] = frozenset()
    subspecialty: str = ""
    patient_class: str = ""

    def matches(self, *, level: str, modality: str, subspecialty: str, patient_class: str) -> bool:
        return (
            self.level == level
            and (not self.modalities or modality.upper() in self.modalities)
            and (not self.subspecialty or self.subspecialty == subspecialty)
            and (not self.patient_class or self.patient_class == patient_class)
        )

    def describe(self) -> str:
        narrowed = [", ".join(sorted(self.modalities)), self.subspecialty, self.patient_class]
        where = " ".join(part for part in narrowed if part)
        unit = "working minutes" if self.working else "minutes"
        return f"{self.level}{' ' + where if where else ''}: {self.minutes} {unit}"


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

    subspecialties: tuple[SubspecialtyRule, ...] = ()
    sla_rules: tuple[SlaRule, ...] = ()

    def specialty_for(self, modality: str) -> str:
        return self.specialty_by_modality.get(modality.upper(), self.default_specialty)

    def subspecialty_for(self, modality: str, body_parts: frozenset[str] = frozenset()) -> str:
        """The subspecialty of the first rule that matches; '' when none does."""
        parts = frozenset(p.upper() for p in body_parts if p)
        return next((r.subspecialty for r in self.subspecialties if r.matches(modality, parts)), "")

    def sla_rule(self, *, level: str, modality: str = "", subspecialty: str = "", patient_class: str = "") -> SlaRule:
        """The first ``[[sla]]`` rule that matches, else the level's ``sla_minutes``."""
        for rule in self.sla_rules:
            if rule.matches(level=level, modality=modality, subspecialty=subspecialty, patient_class=patient_class):
                return rule
        return SlaRule(level=level, minutes=self.sla_minutes[level])

    def deadline_for(
        self, *, level: str, arrived: datetime, calendar: WorkCalendar | None = None, modality: str = "",
        subspecialty: str = "", patient_class: str = "",
    ) -> tuple[datetime, SlaRule]:  # fmt: skip
        """The reading deadline of an exam arriving at ``arrived``, and the rule it came from."""
        rule = self.sla_rule(level=level, modality=modality, subspecialty=subspecialty, patient_class=patient_class)
        if rule.working and calendar is not None:
            return calendar.add_working_minutes(arrived, rule.minutes), rule
        return arrived + timedelta(minutes=rule.minutes), rule

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
        subspecialties=_subspecialty_rules(data.get("subspecialty", [])),
        sla_rules=_sla_rules(data.get("sla", [])),
        **{name: steps for name, steps in escalations.items() if steps},
    )


def _names(value: Any) -> frozenset[str]:
    items = [value] if isinstance(value, str) else list(value or [])
    return frozenset(str(v).upper() for v in items)


def _subspecialty_rules(items: Any) -> tuple[SubspecialtyRule, ...]:
    try:
        return tuple(
            SubspecialtyRule(str(i["subspecialty"]), _names(i["modality"]), _names(i.get("body_parts", [])))
            for i in items
        )
    except (KeyError, TypeError) as exc:
        raise InvalidInput("each [[subspecialty]] needs subspecialty and modality", reason="BAD_ROUTING") from exc


def _sla_rules(items: Any) -> tuple[SlaRule, ...]:
    rules = []
    for item in items:
        try:
            working = "working_minutes" in item
            minutes = int(item["working_minutes"] if working else item["minutes"])
            level = str(item["level"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput("each [[sla]] needs level and minutes or working_minutes", reason="BAD_ROUTING") from exc
        if level not in LEVEL_RANK or minutes <= 0:
            raise InvalidInput("an [[sla]] rule names an unknown level or no time", reason="BAD_ROUTING")
        rules.append(SlaRule(level=level, minutes=minutes, working=working, modalities=_names(item.get("modality", [])),
                             subspecialty=str(item.get("subspecialty", "")),
                             patient_class=str(item.get("patient_class", ""))))  # fmt: skip
    return tuple(rules)


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
