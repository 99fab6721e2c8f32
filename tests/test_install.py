"""A regular (non-editable) install works: the project installs with ``pip install --no-deps .``
into a virtual environment that already has the dependencies, its command runs, its package data
(weights, rules, routing defaults, migrations, the contract) is inside, nothing lands as a top-level
``gateway``/``reader``/``models`` package, and a smoke subset of the tests passes from the
repository root against the installed copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["tests/unit", "tests/test_lifecycle.py", "tests/test_contract_drift.py"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("install")
    venv, source = base / "venv", base / "source"
    # a copy of the project to build from: a build leaves its build/ folder where it runs
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                  "teleread-data", "node_modules"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    # The dependencies: this environment's site-packages, after the new one's own (a path in a
    # .pth file: the editable install's finder there is not activated).
    (Path(purelib) / "teleread-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", str(source)],
        capture_output=True, text=True, timeout=600, cwd=venv.parent,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    return venv


def _run(venv: Path, *args: str, isolated: bool = True) -> subprocess.CompletedProcess[str]:
    python = str(venv / "bin" / "python")
    return subprocess.run(
        [python, *(["-P"] if isolated else []), *args], cwd=ROOT, capture_output=True, text=True, timeout=900,
        # a session of its own: not this worker's (pytest-xdist's variables), not this path
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith(("PYTEST_", "XDIST"))},
    )  # fmt: skip


def test_the_installed_package_holds_its_data_and_no_top_level_capability_package(installed: Path) -> None:
    probe = (
        "import json, teleread, teleread.app.hub, teleread.gateway.clinic.service, teleread.reader.hub.queue\n"
        "from teleread.models.inference import registry, ecg_rules, fusion\n"
        "from teleread.reader.hub.routing import DEFAULT_ROUTING\n"
        "from teleread.db.engine import MIGRATIONS\n"
        "import teleread.v1.common_pb2 as c\n"
        "from teleread.reader.station import app as station\n"
        "from teleread.reader.hub.statements import load_library\n"
        "import importlib.util as u\n"
        "weights = sorted(p.name for p in registry.WEIGHTS_DIR.glob('*.pt'))\n"
        "print(json.dumps({'teleread': teleread.__file__, 'weights': weights,"
        " 'rules': ecg_rules.DEFAULT_RULES_PATH.is_file(), 'fusion': fusion.DEFAULT_POLICY_PATH.is_file(),"
        " 'routing': DEFAULT_ROUTING.is_file(), 'migrations': len(list((MIGRATIONS / 'versions').glob('0*.py'))),"
        " 'station': [(station.STATIC / f).is_file() for f in"
        " ('index.html', 'app.js', 'app.css', 'dom.js', 'ecg.js', 'ecg.css', 'statements.js')]"
        " + [len(station.load_templates())], 'statements': len(load_library().statements),"
        " 'contract': c.__file__, 'top': [n for n in ('gateway', 'reader', 'models', 'proto') if u.find_spec(n)]}))\n"
    )
    out = _run(installed, "-c", probe)
    assert out.returncode == 0, out.stderr[-2000:]
    import json

    found = json.loads(out.stdout)
    site = str(installed)
    assert found["teleread"].startswith(site) and found["contract"].startswith(site)
    assert found["weights"] == ["chest_pneumonia.pt", "ecg_12lead.pt", "ecg_rhythm.pt"]
    assert found["rules"] and found["fusion"] and found["routing"] and found["migrations"] >= 5
    assert found["top"] == []
    assert found["station"][:7] == [True] * 7 and found["station"][7] >= 10  # the page, its scripts and templates
    assert found["statements"] >= 60  # the ECG statement library ships with the hub
    help_text = subprocess.run([installed / "bin" / "teleread", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert help_text.returncode == 0 and "serve" in help_text.stdout


@pytest.mark.parametrize("isolated", [True, False], ids=["installed-copy", "checkout-first-on-path"])
def test_a_smoke_subset_passes_from_the_repository_root(installed: Path, isolated: bool) -> None:
    # isolated (-P): the repository root is not on the path, so the tests import the installed
    # copy; otherwise the checkout's teleread/ comes first and must find its capabilities beside it.
    out = _run(installed, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", *SMOKE, isolated=isolated)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout
