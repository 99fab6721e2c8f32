"""The README's first command ends in ``teleread demo``: the whole path on the embedded defaults,
from a modality and an ECG cart at the clinic's gateway to the signed PDF reports back at the clinic."""

from __future__ import annotations

from pathlib import Path

import pytest

from teleread.app.cli import main


@pytest.mark.timeout(180)
def test_demo_runs_the_whole_path(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["demo", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CRITICAL EXAM QUEUED" in out  # the synthetic pause was flagged and announced
    assert "3 of 3 stored" in out  # the modality's C-STORE to the gateway
    assert "2 report(s)" in out and "demo complete" in out and "link up" in out
    pdfs = sorted((tmp_path / "clinic" / "results").glob("*.pdf"))
    assert len(pdfs) == 2 and all(p.read_bytes().startswith(b"%PDF") for p in pdfs)
    assert not any((tmp_path / "clinic" / "watch").glob("*.hea"))  # the cart's record was taken
    logs = (tmp_path / "hub.log").read_text()
    assert '"rpc": "SignReport"' in logs  # JSON access logs were written
