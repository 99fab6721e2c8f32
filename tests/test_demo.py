"""The README's first command ends in ``teleread demo``: the whole path on the embedded defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from teleread.cli import main


@pytest.mark.timeout(180)
def test_demo_runs_the_whole_path(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["demo", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "CRITICAL EXAM QUEUED" in out  # the synthetic pause was flagged and announced
    assert "2 result(s)" in out and "demo complete" in out
    logs = (tmp_path / "hub.log").read_text()
    assert '"rpc": "SignReport"' in logs  # JSON access logs were written
