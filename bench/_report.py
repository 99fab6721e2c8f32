"""Figures of the spine benchmark and how they are reported.

Owns :class:`Figure` (a measured value, its target and direction, the pass/miss verdict with the
percentage from the target, the CPU each process used meanwhile), the description of the machine
(``lscpu`` model, cores, RAM, versions, load average, and :class:`OtherLoad`: the CPU that processes
outside the benchmark used during the run), the rich table and the JSON file.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Callable

import grpc
from rich.console import Console
from rich.table import Table


@dataclass
class Figure:
    """One measured figure; ``value`` (in ``unit``) is what is compared with ``target``."""

    figure: str
    deployment: str
    clients: int
    value: float
    unit: str
    detail: str
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""
    cpu_cores: dict[str, float] = field(default_factory=dict)  # process group -> cores busy

    @property
    def delta_pct(self) -> float | None:
        """How far the value is from the target, in percent of the target."""
        return None if not self.target else (self.value - self.target) / self.target * 100

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    @property
    def verdict(self) -> str:
        if self.passed is None:
            return "-"
        return f"{'pass' if self.passed else 'MISS'} ({self.delta_pct:+.0f} %)"

    @property
    def target_text(self) -> str:
        if self.target is None:
            return "-"
        return f"{'>=' if self.higher_is_better else '<='} {self.target:g} {self.unit}"

    @property
    def cpu_text(self) -> str:
        return ", ".join(f"{name} {cores:.2f}" for name, cores in self.cpu_cores.items())


def machine() -> dict[str, Any]:
    """The machine line: CPU model, cores, RAM, Python, grpcio, kernel."""
    import psutil

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
        platform.processor() or "?",
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "kernel": platform.release(),
        "load_before": os.getloadavg()[0],  # other work on the machine skews every figure
        "commit": _git("rev-parse", "--short", "HEAD"),
        "hub_code_modified": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench")),
    }


def _git(*args: str) -> str:
    """A read-only git query about the code under test ("" outside a work tree)."""
    done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


class OtherLoad:
    """CPU seconds used by processes that are not the benchmark's (nor kernel threads) while the
    block runs, sampled every ``interval`` s: other work on a 2-core machine skews every figure."""

    def __init__(self, ours: Callable[[], set[int]], *, interval: float = 1.0) -> None:
        self._ours, self._interval = ours, interval
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.seconds, self.started, self.ended = 0.0, time.perf_counter(), 0.0

    def _sample(self) -> None:
        import psutil

        mine = self._ours()
        for proc in psutil.process_iter(["ppid", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is None or proc.pid == 2 or proc.info["ppid"] == 2:  # gone, or a kernel thread
                continue
            used, before = times.user + times.system, self._last.get(proc.pid)
            self._last[proc.pid] = used
            if before is not None and proc.pid not in mine:
                self.seconds += max(0.0, used - before)

    def _run(self) -> None:
        self._sample()
        while not self._stop.wait(self._interval):
            self._sample()

    @property
    def cores(self) -> float:
        return self.seconds / max((self.ended or time.perf_counter()) - self.started, 1e-9)

    def __enter__(self) -> OtherLoad:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.ended = time.perf_counter()


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, Python {info['python']}, "
        f"grpcio {info['grpc']}, Linux {info['kernel']}; load average (1 min) "
        f"{info['load_before']:.2f} before, {info.get('load_after', float('nan')):.2f} after; other processes "
        f"kept {info.get('other_cores', float('nan')):.2f} cores busy on average during the run; code at "
        f"{info['commit'] or '?'}{' with uncommitted hub changes' if info['hub_code_modified'] else ''}; "
        f"upload client streams per client: {info.get('upload_parallel', '?')}"
    )


def print_table(figures: list[Figure], info: dict[str, Any], console: Console) -> None:
    table = Table(title="teleread spine benchmark")
    for column in ("figure", "deployment", "clients", "measured", "target", "result", "CPU cores busy", "note"):
        table.add_column(column)
    for f in figures:
        style = "" if f.passed is None else ("green" if f.passed else "bold red")
        verdict = f"[{style}]{f.verdict}[/]" if style else f.verdict
        row = (f.figure, f.deployment, str(f.clients), f.detail, f.target_text, verdict, f.cpu_text, f.note)
        table.add_row(*row)
    wide = Console(width=max(console.width, 200))
    wide.print(table)
    wide.print("machine: " + machine_line(info))


def save_json(path: Path, *, figures: list[Figure], info: dict[str, Any], extra: dict[str, Any]) -> None:
    rows = [{**asdict(f), "passed": f.passed, "delta_pct": f.delta_pct} for f in figures]
    path.write_text(json.dumps({"machine": info, **extra, "figures": rows}, indent=2))
