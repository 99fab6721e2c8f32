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


@pytest.mark.timeout(240)
def test_demo_with_the_station_serves_the_demo_readers_their_worklist(tmp_path: Path, capsys, monkeypatch) -> None:
    import json

    import httpx

    from helpers import wait_for
    from teleread.app.demo import run_demo

    monkeypatch.setenv("COLUMNS", "200")
    seen: dict[str, object] = {}

    def serving(url: str, password: str) -> None:  # a reader opens the station while the demo runs
        with httpx.Client(base_url=url) as client:
            login_csrf = client.get("/api/session").json()["login_csrf"]
            answer = client.post(
                "/api/login",
                json={"user": "dr-cardio", "password": password},
                headers={"X-CSRF-Token": login_csrf, "Origin": url},
            )
            seen["login"] = answer.status_code

            def snapshot() -> list[dict[str, object]]:
                with client.stream("GET", "/api/worklist/events") as events:
                    for line in events.iter_lines():
                        if line.startswith("data:") and '"SNAPSHOT"' in line:
                            return list(json.loads(line[5:])["exams"])
                return []

            seen["exams"] = wait_for(lambda: len(snapshot()) >= 6 and snapshot(), timeout=60)  # 1 + the 5 new ECGs

    assert run_demo(data_dir=tmp_path, station=True, station_port=0, serving=serving) == 0
    out = capsys.readouterr().out
    assert "reading station on http://127.0.0.1:" in out and "sign in as dr-cardio" in out
    assert seen["login"] == 200
    exams = seen["exams"]
    assert isinstance(exams, list) and {e["modality"] for e in exams} == {"ECG"}
