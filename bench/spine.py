"""The spine benchmark: ingest, triage latency, claim-next and hub memory on both deployments.

Run from the repository root: ``.venv/bin/python -m bench.spine [--quick] [--json PATH]``.
It generates synthetic data in a temporary folder, starts the raw gRPC sink and, per deployment
("embedded": SQLite + local directory; "postgres_s3": a private PostgreSQL cluster + nanio), fresh
hub processes, and measures with the real upload client (``upload_exams``) and real gRPC readers:
ingest instances/s and MB/s (1 and 4 clients) beside the raw ceiling, ECG commit -> queued
p50/p95, claim-next p50/p99 with 10,000 bulk-inserted queued exams and 8 readers, and the hub's
peak memory (summed RSS of its processes) while ingesting a 1 GiB study. It ends with a table of
figures, targets and the CPU each process used. MB means 10^6 bytes throughout; see README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from rich.console import Console

from bench import _backends, _data, _hubproc
from bench._measure import (
    IngestRun,
    QueueWatcher,
    bulk_insert_queued,
    claim_next_latencies,
    cpu_meter,
    exam_states,
    ingest,
    raw_ceiling,
    memory_sampler,
)
from bench._report import Figure, OtherLoad, machine, print_table, save_json
from teleread.gateway.uploader import client as upload
from teleread.gateway.uploader.client import ScanExam, scan_paths

MB = 1e6
DEPLOYMENTS = ("embedded", "postgres_s3")
CT_TARGET, ECG_TARGET, CEILING_SHARE = 360.0, 170.0, 70.0
QUEUED_P95_TARGET_MS, CLAIM_P99_TARGET_MS, RSS_TARGET_MB = 1000.0, 50.0, 300.0
CEILING_REPEATS = 3
console = Console()


@dataclass(frozen=True)
class Plan:
    """What one run measures."""

    sizes: _data.Sizes
    queued_exams: int
    claims: int
    readers: int = 8
    deployments: tuple[str, ...] = DEPLOYMENTS
    client_counts: tuple[int, ...] = (1, 4)


FULL_PLAN = Plan(sizes=_data.Sizes(), queued_exams=10_000, claims=2_000)
# The smoke run skips the 4-client ingest: each hub process takes ~3.5 s to start (CPU workers).
QUICK_PLAN = Plan(sizes=_data.QUICK_SIZES, queued_exams=1_000, claims=200, client_counts=(1,))


@dataclass
class Scanned:
    ct: list[ScanExam]
    dx: list[ScanExam]
    ecg: list[ScanExam]
    big: ScanExam


def scan(data: _data.Datasets) -> Scanned:
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


def _rate_text(run: IngestRun) -> str:
    return (
        f"{run.instances / run.seconds:.0f} inst/s, {run.bytes / run.seconds / MB:.1f} MB/s "
        f"({run.instances} in {run.seconds:.1f} s)"
    )


@dataclass
class Bench:
    """One run: the backing servers, a fresh hub per measurement, and the figures collected."""

    plan: Plan
    work: Path
    profile_dir: Path | None = None
    figures: list[Figure] = field(default_factory=list)
    ceiling: dict[int, float] = field(default_factory=dict)
    pg: _backends.PgCluster | None = None
    nanio: _backends.NanioServer | None = None
    runs: int = 0
    failed: bool = False

    # ---- servers ---------------------------------------------------------------------------
    def start_backends(self) -> None:
        if "postgres_s3" in self.plan.deployments:
            # Its own top-level temporary folder: the postgres user cannot enter ours (0700).
            self.pg = _backends.PgCluster(Path(tempfile.mkdtemp(prefix="teleread-bench-pg-")))
            self.pg.start()
            self.nanio = _backends.NanioServer(self.work / "nanio")
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
        return {"data_dir": str(data_dir), "database_url": url, "storage": self.nanio.settings(bucket)}, url, bucket

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

    def cpu_groups(self, hub: _hubproc.ServerProcess, deployment: str) -> dict[str, Callable[[], list[int]]]:
        groups: dict[str, Callable[[], list[int]]] = {"hub": hub.tree, "bench": lambda: [os.getpid()]}
        if deployment == "postgres_s3" and self.pg is not None and self.nanio is not None:
            groups.update(nanio=self.nanio.pids, postgres=self.pg.pids)
        return groups

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        console.log(f"{figure.deployment} | {figure.figure} | {figure.clients}c | {figure.detail} | {figure.verdict}")

    def guarded(self, deployment: str, name: str, measure: Callable[[], None]) -> None:
        """Run one measurement; a failure becomes a FAILED row (and exit status 1), not a lost run."""
        try:
            measure()
        except Exception as exc:  # noqa: BLE001 - reported in the table, the other figures still count
            console.print_exception(max_frames=5)
            failure = Figure(f"{name} (FAILED)", deployment, 0, float("nan"), "", f"{type(exc).__name__}: {exc}"[:300])
            failure.note, self.failed = "measurement failed", True
            self.add(failure)

    # ---- measurements ----------------------------------------------------------------------
    def measure_ceiling(self, sizes: list[int]) -> None:
        """Best of CEILING_REPEATS runs per client count (after one warm-up run)."""
        sink = _hubproc.start_sink(self.work / "runs" / "sink")
        try:
            raw_ceiling(sink.address, sizes, clients=1)
            for clients in self.plan.client_counts:
                rates = [
                    sum(sizes) / raw_ceiling(sink.address, sizes, clients=clients) / MB for _ in range(CEILING_REPEATS)
                ]
                self.ceiling[clients] = best = max(rates)
                detail = f"{best:.0f} MB/s (best of {len(rates)}: {', '.join(f'{r:.0f}' for r in rates)})"
                self.add(Figure("raw gRPC ceiling (DX bytes)", "raw gRPC", clients, best, "MB/s", detail))
        finally:
            sink.stop()

    def _ingest(
        self, hub: _hubproc.ServerProcess, deployment: str, parts: list[list[ScanExam]]
    ) -> tuple[IngestRun, dict[str, float]]:
        with cpu_meter(self.cpu_groups(hub, deployment)) as cores:
            run = ingest(hub.address, hub.tokens["site"], parts)
        return run, cores

    def ingest_runs(self, deployment: str, scanned: Scanned) -> None:
        """Per client count, one fresh hub takes the CT studies, the DX images and the ECGs."""
        for clients in self.plan.client_counts:
            with self.hub(deployment, f"ingest-{clients}c") as (hub, _url):
                run, cores = self._ingest(hub, deployment, [[exam] for exam in scanned.ct[:clients]])
                self._rate("CT ingest", deployment, clients, run, cores, target=CT_TARGET if clients == 1 else None)
                run, cores = self._ingest(hub, deployment, split(scanned.dx, clients))
                self._dx(deployment, clients, run, cores)
                with QueueWatcher(hub.address, hub.tokens["cardio-0"]) as watcher:
                    run, cores = self._ingest(hub, deployment, split(scanned.ecg, clients))
                    latencies, missed = watcher.latencies(run.commits, timeout=300)
                self._rate("ECG ingest", deployment, clients, run, cores, target=ECG_TARGET if clients == 1 else None)
                self._queued(deployment, clients, latencies, missed=self._missed(hub, missed))

    def _rate(
        self, name: str, deployment: str, clients: int, run: IngestRun, cores: dict[str, float], *, target: float | None
    ) -> None:
        rate = run.instances / run.seconds
        self.add(Figure(name, deployment, clients, rate, "inst/s", _rate_text(run), target, cpu_cores=cores))

    @staticmethod
    def _missed(hub: _hubproc.ServerProcess, missed: set[str]) -> int:
        """Exams whose TYPE_QUEUED never came on the Watch stream must still be queued in the hub."""
        states = exam_states(hub.address, hub.tokens["site"], missed) if missed else {}
        stuck = [state for state in states.values() if state != "queued"]
        if stuck:
            raise RuntimeError(f"{len(stuck)} committed ECG exams were never queued (states: {set(stuck)})")
        return len(missed)

    def _dx(self, deployment: str, clients: int, run: IngestRun, cores: dict[str, float]) -> None:
        rate = run.bytes / run.seconds / MB
        share = rate / self.ceiling[clients] * 100
        detail = (
            f"{rate:.1f} MB/s = {share:.0f} % of {self.ceiling[clients]:.0f} MB/s "
            f"({run.instances / run.seconds:.1f} inst/s)"
        )
        self.add(
            Figure(
                "DX ingest, % of raw ceiling", deployment, clients, share, "%", detail, CEILING_SHARE, cpu_cores=cores
            )
        )

    def _queued(self, deployment: str, clients: int, latencies: list[float], *, missed: int) -> None:
        p50, p95 = percentile_ms(latencies, 50), percentile_ms(latencies, 95)
        detail = f"p50 {p50:.0f} ms, p95 {p95:.0f} ms, max {max(latencies) * 1000:.0f} ms (n={len(latencies)})"
        figure = Figure("ECG commit -> queued p95", deployment, clients, p95, "ms", detail, QUEUED_P95_TARGET_MS, False)
        if missed:
            figure.note = f"hub bug: Watch never sent TYPE_QUEUED for {missed} exams that are queued"
        self.add(figure)

    def claim_run(self, deployment: str) -> None:
        with self.hub(deployment, "claim") as (hub, url):
            bulk_insert_queued(url, site_id=int(hub.info["site_id"]), count=self.plan.queued_exams)
            tokens = [hub.tokens[f"cardio-{i}"] for i in range(self.plan.readers)]
            with cpu_meter(self.cpu_groups(hub, deployment)) as cores:
                latencies, seconds = claim_next_latencies(hub.address, tokens, total=self.plan.claims)
        p50, p99 = percentile_ms(latencies, 50), percentile_ms(latencies, 99)
        detail = (
            f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, {len(latencies) / seconds:.0f} claims/s "
            f"({len(latencies)} claims, {self.plan.queued_exams} queued)"
        )
        note = "" if deployment == "postgres_s3" else "comparison (the target is for PostgreSQL)"
        figure = Figure("claim-next p99", deployment, self.plan.readers, p99, "ms", detail, CLAIM_P99_TARGET_MS, False)
        figure.note, figure.cpu_cores = note, cores
        self.add(figure)

    def rss_run(self, deployment: str, big: ScanExam) -> None:
        """Peak memory of the hub (main process and its CPU workers) over the 1 GiB study."""
        with self.hub(deployment, "rss") as (hub, _url):
            idle = sum(hub.status_kib(pid, "VmRSS") for pid in hub.tree()) * 1024 / MB
            with memory_sampler(hub.tree) as peaks:
                run, cores = self._ingest(hub, deployment, [[big]])
                time.sleep(1.0)  # the exam's triage runs after the commit
            hwm = {pid: hub.status_kib(pid, "VmHWM") * 1024 / MB for pid in hub.tree()}
        main = hwm.pop(hub.process.pid, 0.0)
        total = peaks.rss_sum / MB
        detail = (
            f"sampled peak of summed RSS {total:.0f} MB (PSS {peaks.pss_sum / MB:.0f} MB) over the hub and its "
            f"{len(hwm)} child processes; VmHWM main {main:.0f} MB, children "
            f"{' + '.join(f'{v:.0f}' for v in hwm.values())} MB; idle after start {idle:.0f} MB; "
            f"{run.instances} objects, {run.bytes / MB:.0f} MB at {run.bytes / run.seconds / MB:.1f} MB/s"
        )
        figure = Figure("hub peak RSS, 1 GiB study", deployment, 1, total, "MB", detail, RSS_TARGET_MB, False)
        figure.cpu_cores = cores
        self.add(figure)


def run(bench: Bench) -> dict[str, float]:
    """Every measurement of the plan; returns the seconds each phase took."""
    phases, started = {}, time.perf_counter()
    scanned = scan(_data.generate(bench.work / "data", bench.plan.sizes))
    phases["generate_and_scan_s"] = time.perf_counter() - started
    try:
        bench.start_backends()
        bench.measure_ceiling([exam.total_bytes for exam in scanned.dx])
        for deployment in bench.plan.deployments:
            phase = time.perf_counter()
            bench.guarded(deployment, "ingest", partial(bench.ingest_runs, deployment, scanned))
            bench.guarded(deployment, "claim-next", partial(bench.claim_run, deployment))
            bench.guarded(deployment, "peak RSS", partial(bench.rss_run, deployment, scanned.big))
            phases[f"{deployment}_s"] = time.perf_counter() - phase
    finally:
        bench.stop_backends()
    phases["total_s"] = time.perf_counter() - started
    return phases


def _ours(bench: Bench) -> set[int]:
    """This run's processes: this one, its descendants and its PostgreSQL cluster's."""
    import psutil

    me = psutil.Process()
    pids = {me.pid, *(child.pid for child in me.children(recursive=True))}
    try:
        pids.update(bench.pg.pids() if bench.pg is not None else [])
    except (OSError, ValueError, IndexError):  # the cluster is starting or stopping
        pass
    return pids


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.spine", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (under a minute)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="save the results here")
    parser.add_argument("--deployments", default=",".join(DEPLOYMENTS), help="comma-separated subset of the two")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR", help="hub CPU profiles (pstats) here")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    chosen = tuple(d for d in args.deployments.split(",") if d)
    if not chosen or set(chosen) - set(DEPLOYMENTS):
        parser.error(f"--deployments takes a subset of {', '.join(DEPLOYMENTS)}")
    base = QUICK_PLAN if args.quick else FULL_PLAN
    plan = replace(base, deployments=chosen)
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["upload_parallel"] = getattr(upload, "DEFAULT_PARALLEL", 1)  # streams per client (library default)
    with tempfile.TemporaryDirectory(prefix="teleread-bench-", dir=args.workdir) as tmp:
        bench = Bench(plan=plan, work=Path(tmp), profile_dir=args.profile)
        with OtherLoad(partial(_ours, bench)) as other:
            phases = run(bench)
    info["load_after"], info["other_cores"] = os.getloadavg()[0], other.cores
    print_table(bench.figures, info, console)
    console.print("phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    if args.json:
        extra = {"quick": args.quick, "plan": asdict(plan), "phases_s": phases}
        save_json(args.json, figures=bench.figures, info=info, extra=extra)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
