"""How close the hub's ECG intervals and axis come to cardiologists' annotations (LUDB).

Run from the repository root: ``.venv/bin/python -m bench.ecg_intervals --ludb PATH [--json OUT]``
(or ``TELEREAD_LUDB_DIR``), where PATH is the ``data`` folder of the Lobachevsky University
Electrocardiography Database 1.0.1 (PhysioNet, ODC-By 1.0: 200 ten-second 12-lead records at
500 Hz, P, QRS and T onsets, peaks and ends annotated by cardiologists in every lead). It is not
shipped with teleread.

Each record goes through the hub's own measurement (``measure_ecg``, as triage runs it). The
reference is global, as a 12-lead program measures: for each beat the earliest P onset and QRS
onset and the latest QRS end and T end over the twelve leads' annotations, then the median over
the record's beats: PR = QRS onset - P onset, QRS = QRS end - QRS onset, QT = T end - QRS onset.
Printed per interval: records measured (of those with a reference), mean error (ours - reference)
and its standard deviation, median absolute error, in ms; for the QRS axis, agreement with the
record's "Electric axis of the heart" statement.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench._report import machine

console = Console()
LEADS = ("i", "ii", "iii", "avr", "avl", "avf", "v1", "v2", "v3", "v4", "v5", "v6")
NAMES = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
MATCH_S = 0.08  # a lead's QRS belongs to lead II's beat when its peak is this close


def _waves(path: Path, lead: str) -> list[tuple[str, int, int, int]]:
    import wfdb

    ann = wfdb.rdann(str(path), lead)
    s, sym = ann.sample, ann.symbol
    return [
        (c, int(s[i - 1]), int(s[i]), int(s[i + 1]))
        for i, c in enumerate(sym)
        if c in "pNt" and 0 < i < len(sym) - 1 and sym[i - 1] == "(" and sym[i + 1] == ")"
    ]


def reference(path: Path, fs: float) -> dict[str, float]:
    """The record's global PR, QRS and QT (ms), each the median over its beats."""
    per_lead = {lead: _waves(path, lead) for lead in LEADS}
    beats = [w for w in per_lead["ii"] if w[0] == "N"]
    pr, qrs, qt = [], [], []
    tol = MATCH_S * fs
    for _, _, peak, _ in beats:
        p_on, q_on, q_off, t_end = [], [], [], []
        for waves in per_lead.values():
            for j, (kind, on, pk, off) in enumerate(waves):
                if kind != "N" or abs(pk - peak) > tol:
                    continue
                q_on.append(on)
                q_off.append(off)
                if j > 0 and waves[j - 1][0] == "p":
                    p_on.append(waves[j - 1][1])
                if j + 1 < len(waves) and waves[j + 1][0] == "t":
                    t_end.append(waves[j + 1][3])
        if not q_on:
            continue
        onset = min(q_on)
        qrs.append(max(q_off) - onset)
        if p_on:
            pr.append(onset - min(p_on))
        if t_end:
            qt.append(max(t_end) - onset)
    ms = 1000.0 / fs
    out = {}
    for name, values in (("pr_ms", pr), ("qrs_ms", qrs), ("qt_ms", qt)):
        if len(values) >= 2:
            out[name] = float(np.median(values)) * ms
    return out


def axis_statement(path: Path) -> str:
    for line in Path(str(path) + ".hea").read_text(encoding="utf-8", errors="replace").splitlines():
        if "Electric axis of the heart:" in line:
            return line.split(":", 1)[1].strip().rstrip(".").strip().lower()
    return ""


def axis_class(deg: float) -> str:
    """LUDB's words for the frontal QRS axis (the Russian convention its cardiologists use)."""
    if deg < 0 or deg >= 180:
        return "left axis deviation"
    if deg < 30:
        return "horizontal"
    if deg < 70:
        return "normal"
    if deg <= 90:
        return "vertical"
    return "right axis deviation"


def run(data: Path) -> dict[str, Any]:
    import wfdb

    from teleread.models.inference.ecg_measure import measure_ecg

    warnings.filterwarnings("ignore")
    records = sorted((p.with_suffix("") for p in data.glob("*.hea")), key=lambda p: int(p.stem))
    errors: dict[str, list[float]] = {"pr_ms": [], "qrs_ms": [], "qt_ms": []}
    referenced = dict.fromkeys(errors, 0)
    axes: list[tuple[str, str]] = []
    seconds: list[float] = []
    for path in records:
        signal, info = wfdb.rdsamp(str(path))
        truth = reference(path, float(info["fs"]))
        started = time.perf_counter()
        m = measure_ecg(signal, fs=float(info["fs"]), lead_names=list(NAMES))
        seconds.append(time.perf_counter() - started)
        ours = m.summary().values
        for name in errors:
            if name in truth:
                referenced[name] += 1
                if name in ours:
                    errors[name].append(ours[name] - truth[name])
        stated = axis_statement(path)
        if stated and "qrs_axis_deg" in ours:
            axes.append((stated, axis_class(ours["qrs_axis_deg"])))
    summary: dict[str, Any] = {"records": len(records), "seconds_per_record_median": float(np.median(seconds))}
    for name, values in errors.items():
        e = np.asarray(values)
        summary[name] = {
            "measured": int(e.size),
            "with_reference": referenced[name],
            "mean_ms": float(e.mean()) if e.size else None,
            "sd_ms": float(e.std()) if e.size else None,
            "median_abs_ms": float(np.median(np.abs(e))) if e.size else None,
        }
    summary["qrs_axis"] = {
        "records": len(axes),
        "same_class": sum(1 for a, b in axes if a == b),
        "same_side": sum(1 for a, b in axes if ("left" in a) == ("left" in b) and ("right" in a) == ("right" in b)),
    }
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ludb", type=Path, default=os.environ.get("TELEREAD_LUDB_DIR"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.ludb is None or not Path(args.ludb).is_dir():
        parser.error("give --ludb (or TELEREAD_LUDB_DIR): the data folder of LUDB 1.0.1")
    info = machine()
    summary = run(Path(args.ludb))
    table = Table(title=f"ECG intervals against LUDB ({summary['records']} records)")
    for col in ("interval", "measured / with reference", "mean error (ms)", "SD (ms)", "median |error| (ms)"):
        table.add_column(col)
    for name in ("pr_ms", "qrs_ms", "qt_ms"):
        s = summary[name]
        table.add_row(
            name.removesuffix("_ms").upper(),
            f"{s['measured']} / {s['with_reference']}",
            f"{s['mean_ms']:+.1f}" if s["mean_ms"] is not None else "—",
            f"{s['sd_ms']:.1f}" if s["sd_ms"] is not None else "—",
            f"{s['median_abs_ms']:.1f}" if s["median_abs_ms"] is not None else "—",
        )
    console.print(table)
    ax = summary["qrs_axis"]
    console.print(
        f"QRS axis: the statement's class in {ax['same_class']} of {ax['records']} records; "
        f"the same side (left deviation / right deviation / neither) in {ax['same_side']}"
    )
    console.print(f"median time to measure one record: {summary['seconds_per_record_median'] * 1000:.0f} ms")
    console.print(
        f"machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}; code at {info['commit'] or '?'}"
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
