"""The folders say which process runs each file, and the imports keep to it: the plumbing imports no
capability (only its composition root ``teleread.app`` does), nothing imports the composition
root, the runtime never imports the offline trainers, and code that runs at the clinic or in a
client never imports what runs in the hub."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {"teleread": "teleread", "gateway": "teleread.gateway", "reader": "teleread.reader", "models": "teleread.models"}


def _modules() -> dict[str, tuple[Path, list[tuple[str, bool]]]]:
    """Module name -> (file, [(imported module, imported at module level)])."""
    found = {}
    for folder, package in TOP.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([package, *parts])
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top_level = {id(n) for n in tree.body}
            imports = []
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imports += [(a.name, id(node) in top_level) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imports += [(f"{node.module}.{a.name}", id(node) in top_level) for a in node.names]
            found[name] = (path, imports)
    return found


MODULES = _modules()


def _offences(source: str, target: str, *, lazy_ok: tuple[str, ...] = (), exact: bool = False) -> list[str]:
    out = []
    for name, (path, imports) in MODULES.items():
        if not (name == source or (not exact and name.startswith(source + "."))):
            continue
        for imported, top_level in imports:
            if imported == target or imported.startswith(target + "."):
                if not top_level and name in lazy_ok:
                    continue
                out.append(f"{path.relative_to(ROOT)} imports {imported}")
    return out


def _plumbing() -> list[str]:
    return [n for n in MODULES if n.startswith("teleread.") and not n.startswith("teleread.app")
            and n.split(".")[1] not in ("gateway", "reader", "models")] + ["teleread"]  # fmt: skip


def test_the_plumbing_imports_no_capability() -> None:
    bad = []
    for name in _plumbing():
        for capability in ("teleread.gateway", "teleread.reader", "teleread.models", "teleread.app"):
            bad += _offences(name, capability, exact=True)
    assert sorted(set(bad)) == []


def test_nothing_imports_the_composition_root() -> None:
    bad = []
    for package in ("teleread.gateway", "teleread.reader", "teleread.models"):
        bad += _offences(package, "teleread.app")
    assert bad == []


def test_the_runtime_never_imports_the_trainers() -> None:
    bad = _offences("teleread.models.inference", "teleread.models.training")
    for package in ("teleread.gateway", "teleread.reader"):
        bad += _offences(package, "teleread.models.training")
    bad += _offences("teleread.app", "teleread.models.training", lazy_ok=("teleread.app.cli",))
    assert bad == []


def test_clinic_and_client_code_never_imports_the_hub() -> None:
    bad = []
    for source in (
        "teleread.gateway.clinic",
        "teleread.gateway.uploader",
        "teleread.reader.clients",
        "teleread.reader.station",
    ):
        for hub in ("teleread.gateway.hub", "teleread.reader.hub", "teleread.models.inference.worker"):
            bad += _offences(source, hub)
    assert bad == []


def test_the_station_reaches_the_hub_only_through_its_grpc_api() -> None:
    bad = []
    for inside in ("teleread.db", "teleread.auth", "teleread.signin", "teleread.storage", "teleread.lifecycle"):
        bad += _offences("teleread.reader.station", inside)
    assert bad == []


def test_the_hub_services_import_no_client() -> None:
    bad = []
    for source in ("teleread.gateway.hub", "teleread.reader.hub", "teleread.models.inference"):
        clients = (
            "teleread.gateway.clinic",
            "teleread.gateway.uploader",
            "teleread.reader.clients",
            "teleread.reader.station",
        )
        for client in clients:
            bad += _offences(source, client)
    assert bad == []


def test_the_rule_would_catch_an_offence() -> None:
    assert _offences("teleread.app.cli", "teleread.models.training") != []  # imported inside functions
    assert any(n == "teleread.gateway.clinic.service" for n in MODULES)
