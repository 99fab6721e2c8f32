"""Static checks: lint, formatting, typing, and the dependency rule of the architecture
(each third-party adapter library is imported in one place; domain services never import the
generated gRPC code)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CODE = ["teleread", "gateway", "reader", "models"]

# library -> the only modules allowed to import it
ADAPTERS = {
    "minio": {"teleread/storage/s3.py"},
    "wfdb": {"teleread/ecgio.py", "models/inference/ecg_measure.py", "models/inference/synthetic.py"},  # ecgio: lazily
    "pynetdicom": {
        "teleread/logs.py",
        "gateway/clinic/scp.py",
        "gateway/clinic/scp_reactor.py",
        "gateway/clinic/dicom_send.py",
    },  # logs: identifier logging off; the DICOM receiver and its event-driven acceptor
    "reportlab": {  # the printed report, at the hub
        "reader/hub/report_pdf.py",
        "reader/hub/report_font.py",
        "reader/hub/report_pages.py",
        "reader/hub/report_ecg.py",
    },
    "imagecodecs": {"teleread/pixels.py"},  # the 12-bit JPEG extended decoder plugin
    # the learned models: the registry loads weights, each model module and its trainer use torch
    "torch": {
        "models/inference/registry.py",
        "models/inference/pipeline.py",
        "models/inference/ecg_rhythm.py",
        "models/inference/ecg_12lead.py",
        "models/inference/chest_xray.py",
        "models/training/train_ecg_rhythm.py",
        "models/training/train_ecg_12lead.py",
        "models/training/train_chest_xray.py",
    },
    "sklearn": {"models/training/metrics.py", "models/training/train_chest_xray.py"},  # metrics; ROC thresholds
}
# domain and service modules: no gRPC, no generated contract
SERVICE_LAYER = [
    "gateway/hub/ingest.py",
    "gateway/validate.py",
    "reader/hub/queue.py",
    "reader/hub/reports.py",
    "reader/hub/results.py",
    "reader/hub/routing.py",
    "models/inference/triage.py",
    "models/inference/ecg_measure.py",
    "models/inference/ecg_rules.py",
    "models/inference/worker.py",
    "teleread/auth.py",
    "teleread/events.py",
    "gateway/hub/janitor.py",
    "reader/hub/feed.py",  # the watch feed: the servicers turn what it yields into messages
    "reader/hub/directory.py",
    "reader/hub/report_pdfs.py",  # the printed reports: the servicers turn what it opens into chunks
    "reader/hub/report_pdf.py",
    "reader/hub/report_font.py",
    # every model module: none needs gRPC (the triage result's protobuf form lives in teleread/)
    *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "models").glob("*.py")),
]
# gRPC servicers convert messages and call the services: no SQL of their own
SERVICERS = ["gateway/hub/servicer.py", "reader/hub/servicers.py"]
# services that work only through the unit of work of reader/hub/repository.py
ON_THE_REPOSITORY = ["reader/hub/reports.py", "reader/hub/results.py", "reader/hub/report_pdfs.py"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _sources() -> list[Path]:
    return [p for d in CODE for p in (ROOT / d).rglob("*.py") if "_pb2" not in p.name and "versions" not in p.parts]


@pytest.mark.parametrize("library", sorted(ADAPTERS))
def test_adapter_libraries_are_imported_in_one_place(library: str) -> None:
    users = {
        str(p.relative_to(ROOT))
        for p in _sources()
        if any(name == library or name.startswith(library + ".") for name in _imports(p))
    }
    assert users <= ADAPTERS[library], users - ADAPTERS[library]


def test_service_layer_does_not_import_grpc() -> None:
    for rel in SERVICE_LAYER:
        names = _imports(ROOT / rel)
        assert not [n for n in names if n == "grpc" or n.startswith(("grpc.", "teleread.v1"))], rel


def test_servicers_and_repository_services_do_not_import_sqlalchemy() -> None:
    for rel in SERVICERS + ON_THE_REPOSITORY:
        names = _imports(ROOT / rel)
        assert not [n for n in names if n == "sqlalchemy" or n.startswith(("sqlalchemy.", "teleread.db"))], rel


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_lint_and_format() -> None:
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = _run("ruff", "format", "--check", ".")
    assert fmt.returncode == 0, fmt.stdout[-3000:]


@pytest.mark.timeout(300)
def test_mypy_strict_defs() -> None:
    result = _run("mypy", *CODE)
    assert result.returncode == 0, result.stdout[-3000:]


# The datasets folder is found beside the checkout (tests: helpers.datasets_dir); no file names a
# fixed machine path for it.
FIXED_PATH = "/work" + "/shared"
FIXED_PATH_PENDING: set[str] = set()


def test_no_file_names_a_fixed_machine_path() -> None:
    found = {
        str(p.relative_to(ROOT))
        for d in ("tests", "bench", "gateway", "reader", "models", "teleread")
        for p in (ROOT / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and FIXED_PATH.encode() in p.read_bytes()
    }
    assert found <= FIXED_PATH_PENDING, sorted(found - FIXED_PATH_PENDING)
    assert found == FIXED_PATH_PENDING, f"fixed, remove from FIXED_PATH_PENDING: {sorted(FIXED_PATH_PENDING - found)}"


def test_row_locks_are_taken_in_one_place() -> None:
    """``FOR UPDATE`` waits on rows other transactions merely reference (and deadlocked two streams
    of one upload): every row lock goes through ``teleread.db.engine.locked_for_change``."""
    found = []
    for folder in ("gateway", "reader", "models", "teleread"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text(encoding="utf-8")
            if rel != "teleread/db/engine.py" and (".with_for_update(" in text or "FOR UPDATE" in text.upper()):
                found.append(rel)
    assert found == []
