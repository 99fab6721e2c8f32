"""The spine benchmark: ingest, triage latency, claim-next and hub memory on both deployments.

Run from the repository root: ``.venv/bin/python -m bench.spine [--quick] [--json PATH]``.
It generates synthetic data in a temporary folder, starts the raw gRPC sink and, per deployment
("embedded": SQLite + local directory; "postgres_s3": a private PostgreSQL cluster + nanio), fresh
hub processes, and measures with the real upload client (``upload_exams``) and real gRPC readers:
ingest instances/s and MB/s (1 and 4 clients) beside the raw ceiling, ECG commit -> queued
p50/p95, claim-next p50/p99 with 10,000 bulk-inserted queued exams and 8 readers, and the hub's
peak RSS (VmHWM) while ingesting a 1 GiB study. It ends with a table of figures and targets.
MB means 10^6 bytes throughout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from bench import _data, _hubproc
from bench._measure import (
    QueueWatcher,
    bulk_insert_queued,
    claim_next_latencies,
    ingest,
    raw_ceiling,
    rss_sampler,
)
from teleread.gateway.upload import ScanExam, scan_paths

MB = 1e6
DEPLOYMENTS = ("embedded", "postgres_s3")
CT_TARGET, ECG_TARGET, CEILING_SHARE = 360.0, 170.0, 70.0
QUEUED_P95_TARGET_MS, CLAIM_P99_TARGET_MS, RSS_TARGET_MB = 1000.0, 50.0, 300.0
console = Console()


@dataclass
class Figure:
    """One measured figure; ``value`` is what is compared with ``target``."""

    figure: str
    deployment: str
    clients: int
    value: float
    unit: str
    detail: str
    target: float | None = None
    higher_is_better: bool = True
    note: str = ""

    @property
    def delta_pct(self) -> float | None:
        return None if not self.target else (self.value - self.target) / self.target * 100

    @property
    def passed(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    sizes: _data.Sizes
    queued_exams: int
    claims: int
    readers: int = 8
    deployments: tuple[str, ...] = DEPLOYMENTS


FULL_PLAN = Plan(sizes=_data.Sizes(), queued_exams=10_000, claims=2_000)
QUICK_PLAN = Plan(sizes=_data.QUICK_SIZES, queued_exams=1_000, claims=200)


@dataclass
class Scanned:
    ct: list[ScanExam]
    dx: list[ScanExam]
    ecg: list[ScanExam]
    big: ScanExam


def _scan(data: _data.Datasets) -> Scanned:
    """The client's scan (headers read, SHA-256 computed) done once, outside every timing."""
    ct = [scan_paths([study]).exams[0] for study in data.ct_studies]
    dx, ecg = scan_paths(data.dx_images).exams, scan_paths([data.ecgs[0].parent]).exams
    big = scan_paths([data.big_study]).exams
    if len(dx) != len(data.dx_images) or len(ecg) != len(data.ecgs) or len(big) != 1:
        raise RuntimeError("the generated data did not scan into the expected exams")
    return Scanned(ct=ct, dx=dx, ecg=ecg, big=big[0])


def split(exams: list[ScanExam], clients: int) -> list[list[ScanExam]]:
    return [exams[i::clients] for i in range(clients)]


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, q))


@dataclass
class Bench:
    plan: Plan
    work: Path
    profile_dir: Path | None = None
    figures: list[Figure] = field(default_factory=list)
    ceiling: dict[int, float] = field(default_factory=dict)
    pg: _hubproc.PgCluster | None = None
    nanio: _hubproc.NanioServer | None = None
    runs: int = 0

    # ---- servers ---------------------------------------------------------------------------
    def start_backends(self) -> None:
        if "postgres_s3" in self.plan.deployments:
            # Its own top-level temporary folder: the postgres user cannot enter ours (0700).
            self.pg = _hubproc.PgCluster(Path(tempfile.mkdtemp(prefix="teleread-bench-pg-")))
            self.pg.start()
            self.nanio = _hubproc.NanioServer(self.work / "nanio")
            self.nanio.start()

    def stop_backends(self) -> None:
        for backend in (self.nanio, self.pg):
            if backend is not None:
                backend.stop()

    def _settings(self, deployment: str, run_dir: Path) -> tuple[dict[str, Any], str, str]:
        """(hub settings, database URL, S3 bucket or "") for a fresh hub."""
        data_dir = run_dir / "data"
        if deployment == "embedded":
            return {"data_dir": str(data_dir)}, f"sqlite:///{(data_dir / 'teleread.db').resolve()}", ""
        assert self.pg is not None and self.nanio is not None
        bucket = f"bench-{self.runs}-{os.urandom(3).hex()}"
        url = self.pg.new_database()
        settings = {"data_dir": str(data_dir), "database_url": url, "storage": self.nanio.settings(bucket)}
        return settings, url, bucket

    @contextmanager
    def hub(self, deployment: str, name: str) -> Iterator[tuple[_hubproc.ServerProcess, str]]:
        """A fresh hub process (new data dir, database and bucket); removed afterwards."""
        self.runs += 1
        run_dir = self.work / "runs" / f"{self.runs:02d}-{deployment}-{name}"
        settings, url, bucket = self._settings(deployment, run_dir)
        profile = self.profile_dir / f"{deployment}-{name}.pstats" if self.profile_dir else None
        hub = _hubproc.start_hub(settings, run_dir=run_dir, readers=self.plan.readers, profile=profile)
        try:
            yield hub, url
        finally:
            hub.stop()
            shutil.rmtree(run_dir / "data", ignore_errors=True)
            if bucket and self.nanio is not None:
                self.nanio.remove_bucket(bucket)

    # ---- measurements ----------------------------------------------------------------------
    def measure_ceiling(self, sizes: list[int]) -> None:
        sink = _hubproc.start_sink(self.work / "runs" / "sink")
        try:
            raw_ceiling(sink.address, sizes, clients=1)  # warm-up: connections, allocator
            for clients in (1, 4):
                seconds = raw_ceiling(sink.address, sizes, clients=clients)
                self.ceiling[clients] = sum(sizes) / seconds / MB
                self.add(
                    Figure(
                        "raw gRPC ceiling (DX bytes)",
                        "raw gRPC",
                        clients,
                        self.ceiling[clients],
                        "MB/s",
                        f"{self.ceiling[clients]:.1f} MB/s",
                    )
                )
        finally:
            sink.stop()

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        verdict = "" if figure.passed is None else ("pass" if figure.passed else "MISS")
        console.log(f"{figure.deployment:<11} {figure.figure:<34} {figure.clients}c  {figure.detail}  {verdict}")

    def ingest_runs(self, deployment: str, scanned: Scanned) -> None:
        for clients in (1, 4):
            with self.hub(deployment, f"ingest-{clients}c") as (hub, _url):
                token = hub.tokens["site"]
                ct = ingest(hub.address, token, [[exam] for exam in scanned.ct[:clients]])
                self._rate("CT ingest", deployment, clients, ct, target=CT_TARGET if clients == 1 else None)
                dx = ingest(hub.address, token, split(scanned.dx, clients))
                self._dx(deployment, clients, dx)
                with QueueWatcher(hub.address, hub.tokens["cardio-0"]) as watcher:
                    ecg = ingest(hub.address, token, split(scanned.ecg, clients))
                    latencies = watcher.latencies(ecg.commits, timeout=300)
                self._rate("ECG ingest", deployment, clients, ecg, target=ECG_TARGET if clients == 1 else None)
                self._queued(deployment, clients, latencies)

    def _rate(self, name: str, deployment: str, clients: int, run: Any, *, target: float | None) -> None:
        rate = run.instances / run.seconds
        self.add(
            Figure(
                name,
                deployment,
                clients,
                rate,
                "inst/s",
                f"{rate:.0f} inst/s, {run.bytes / run.seconds / MB:.1f} MB/s ({run.instances} in {run.seconds:.1f} s)",
                target=target,
            )
        )

    def _dx(self, deployment: str, clients: int, run: Any) -> None:
        rate = run.bytes / run.seconds / MB
        share = rate / self.ceiling[clients] * 100
        self.add(
            Figure(
                "DX ingest, % of raw ceiling",
                deployment,
                clients,
                share,
                "%",
                f"{rate:.1f} MB/s = {share:.0f} % of {self.ceiling[clients]:.0f} MB/s "
                f"({run.instances / run.seconds:.1f} inst/s)",
                target=CEILING_SHARE,
            )
        )

    def _queued(self, deployment: str, clients: int, latencies: list[float]) -> None:
        p50, p95 = percentile_ms(latencies, 50), percentile_ms(latencies, 95)
        self.add(
            Figure(
                "ECG commit -> queued p95",
                deployment,
                clients,
                p95,
                "ms",
                f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(latencies) * 1000:.0f} ms (n={len(latencies)})",
                target=QUEUED_P95_TARGET_MS,
                higher_is_better=False,
            )
        )

    def claim_run(self, deployment: str) -> None:
        with self.hub(deployment, "claim") as (hub, url):
            bulk_insert_queued(url, site_id=int(hub.info["site_id"]), count=self.plan.queued_exams)
            tokens = [hub.tokens[f"cardio-{i}"] for i in range(self.plan.readers)]
            latencies, seconds = claim_next_latencies(hub.address, tokens, total=self.plan.claims)
        p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
        self.add(
            Figure(
                "claim-next p99",
                deployment,
                self.plan.readers,
                p99,
                "ms",
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(latencies) / seconds:.0f} claims/s "
                f"({len(latencies)} claims, {self.plan.queued_exams} queued)",
                target=CLAIM_P99_TARGET_MS,
                higher_is_better=False,
                note="" if deployment == "postgres_s3" else "comparison (target is for PostgreSQL)",
            )
        )

    def rss_run(self, deployment: str, big: ScanExam) -> None:
        with self.hub(deployment, "rss") as (hub, _url):
            idle = hub.status_kib("VmRSS") * 1024 / MB
            with rss_sampler(lambda: hub.status_kib("VmRSS")) as samples:
                run = ingest(hub.address, hub.tokens["site"], [[big]])
                time.sleep(1.0)  # the exam's triage runs after the commit
            peak = hub.status_kib("VmHWM") * 1024 / MB
        self.add(
            Figure(
                "hub peak RSS, 1 GiB study",
                deployment,
                1,
                peak,
                "MB",
                f"VmHWM {peak:.0f} MB (idle after start {idle:.0f} MB, sampled max "
                f"{max(samples, default=0) * 1024 / MB:.0f} MB); {run.instances} objects "
                f"{run.bytes / MB:.0f} MB at {run.bytes / run.seconds / MB:.1f} MB/s",
                target=RSS_TARGET_MB,
                higher_is_better=False,
            )
        )


def machine() -> dict[str, Any]:
    import psutil

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next(
        (ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")),
        platform.processor() or "?",
    )
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "kernel": platform.release(),
    }


def _result(figure: Figure) -> str:
    if figure.passed is None:
        return "-"
    pct = f"{figure.delta_pct:+.0f} %"
    return f"[green]pass[/] ({pct})" if figure.passed else f"[bold red]MISS[/] ({pct})"


def _target(figure: Figure) -> str:
    if figure.target is None:
        return "-"
    sign = ">=" if figure.higher_is_better else "<="
    return f"{sign} {figure.target:g} {figure.unit}"


def print_table(figures: list[Figure], info: dict[str, Any]) -> None:
    table = Table(title="teleread spine benchmark", show_lines=False)
    for column in ("figure", "deployment", "clients", "measured", "target", "result", "note"):
        table.add_column(column)
    for f in figures:
        table.add_row(f.figure, f.deployment, str(f.clients), f.detail, _target(f), _result(f), f.note)
    console.print(table)
    console.print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, "
        f"Python {info['python']}, grpcio {info['grpc']}, Linux {info['kernel']}"
    )


def run(plan: Plan, *, work: Path, profile_dir: Path | None) -> tuple[list[Figure], dict[str, float]]:
    bench, phases = Bench(plan=plan, work=work, profile_dir=profile_dir), {}
    started = time.perf_counter()
    data = _data.generate(work / "data", plan.sizes)
    scanned = _scan(data)
    phases["generate_and_scan_s"] = time.perf_counter() - started
    try:
        bench.start_backends()
        bench.measure_ceiling([exam.total_bytes for exam in scanned.dx])
        for deployment in plan.deployments:
            phase = time.perf_counter()
            bench.ingest_runs(deployment, scanned)
            bench.claim_run(deployment)
            bench.rss_run(deployment, scanned.big)
            phases[f"{deployment}_s"] = time.perf_counter() - phase
    finally:
        bench.stop_backends()
    phases["total_s"] = time.perf_counter() - started
    return bench.figures, phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.spine", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (well under a minute)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="save the results here")
    parser.add_argument(
        "--deployments", default=",".join(DEPLOYMENTS), help="comma-separated subset of: " + ", ".join(DEPLOYMENTS)
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="write each hub's per-thread CPU profile (pstats) into DIR",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    args = parser.parse_args(argv)
    chosen = tuple(d for d in args.deployments.split(",") if d)
    if not chosen or set(chosen) - set(DEPLOYMENTS):
        parser.error(f"--deployments takes a subset of {', '.join(DEPLOYMENTS)}")
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    plan = Plan(sizes=plan.sizes, queued_exams=plan.queued_exams, claims=plan.claims, deployments=chosen)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    info = machine()
    with tempfile.TemporaryDirectory(prefix="teleread-bench-", dir=args.workdir) as tmp:
        figures, phases = run(plan, work=Path(tmp), profile_dir=args.profile)
    print_table(figures, info)
    console.print("phases: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    if args.json:
        payload = {
            "machine": info,
            "quick": args.quick,
            "plan": asdict(plan),
            "phases_s": phases,
            "figures": [{**asdict(f), "passed": f.passed, "delta_pct": f.delta_pct} for f in figures],
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
