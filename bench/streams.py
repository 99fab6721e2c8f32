"""The long-lived streams benchmark (RELIABILITY F20): do open streams starve the readers?

Run from the repository root: ``.venv/bin/python -m bench.streams [--json PATH]``.
A hub process on a private PostgreSQL cluster (local object directory) gets 2,000 queued
cardiology exams (bulk-inserted) and new identities: reader identities whose worklist watches
are open (a few in the readers' own queue, so every claim is fanned out to them; the rest in other
hospitals and specialties), site identities with open results watches, and site identities with
idle uploads (each opened, begun, sent its first 64 KiB message and then silent). One separate
client process holds all those streams with grpc.aio (50 per identity at most, below the hub's
default cap of 64). Then 8 reader threads in this process, each with its own channel and
cardiologist token, loop ClaimNext / ReleaseClaim. Printed: claim-next p50/p95/p99, the reader
calls refused (any failed status, with its code), how many streams were live before and after,
and the CPU each process used. Target: claim-next p99 <= 100 ms and no reader call refused.

The hub runs with its defaults except ``upload_idle_seconds`` (600 s), so that the idle uploads
stay open for the whole measurement instead of being closed after the default 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from bench import _backends, _hubproc
from bench._measure import bulk_insert_queued, cpu_meter
from bench._report import Figure, OtherLoad, machine, machine_line, save_json

console = Console()
PER_IDENTITY = 50  # streams per identity (the hub's default cap is 64)
CLAIM_P99_TARGET_MS = 100.0
READY_TIMEOUT_S = 120.0
CALL_TIMEOUT_S = 10.0
UPLOAD_SIZE = 1024 * 1024
FIRST_MESSAGE = 64 * 1024


@dataclass(frozen=True)
class Plan:
    watchers: int = 2000  # worklist + results watch streams
    results_share: float = 0.4  # of the watchers, results watches
    hot: int = 16  # worklist watches in the readers' own queue (every claim reaches them)
    change_batches: bool = True  # the watches ask for change batches, as the station and the CLI do
    uploads: int = 200
    readers: int = 8
    claims: int = 2000
    queued: int = 2000


# ---- identities ----------------------------------------------------------------------------------
def _groups(total: int) -> list[int]:
    """``total`` streams in identities of at most PER_IDENTITY."""
    return [min(PER_IDENTITY, total - start) for start in range(0, total, PER_IDENTITY)]


def make_identities(url: str, plan: Plan) -> dict[str, list[dict[str, Any]]]:
    """Register the identities that hold the streams (straight into the hub's database; the hub
    finds a new token on its first use). Returns, per kind, [{token, streams}]."""
    from teleread.auth import Role, add_principal, add_site
    from teleread.db.engine import make_engine

    engine = make_engine(url)
    out: dict[str, list[dict[str, Any]]] = {"hot": [], "worklist": [], "results": [], "uploads": []}
    try:
        for n, streams in enumerate(_groups(plan.hot)):
            token = add_principal(engine, name=f"hot-watch-{n}", role=Role.CARDIOLOGIST, hospital=_hubproc.HOSPITAL)
            out["hot"].append({"token": token, "streams": streams})
        cold = plan.watchers - plan.hot - round(plan.watchers * plan.results_share)
        for n, streams in enumerate(_groups(cold)):
            # the readers' hospital but radiology, or cardiology of other hospitals: open, quiet
            role, hospital = (Role.RADIOLOGIST, _hubproc.HOSPITAL) if n % 2 else (Role.CARDIOLOGIST, f"other-{n}")
            token = add_principal(engine, name=f"watch-{n}", role=role, hospital=hospital)
            out["worklist"].append({"token": token, "streams": streams})
        for kind, total in (("results", round(plan.watchers * plan.results_share)), ("uploads", plan.uploads)):
            for n, streams in enumerate(_groups(total)):
                code = f"{kind}-site-{n}"
                add_site(engine, code=code, name=f"Benchmark {kind} clinic {n}", lead_hospital=_hubproc.HOSPITAL)
                token = add_principal(engine, name=f"{code}-id", role=Role.SITE, site_code=code)
                out[kind].append({"token": token, "streams": streams})
    finally:
        engine.dispose()
    return out


# ---- the stream holder (a process of its own) -----------------------------------------------------
@dataclass
class Tally:
    live: Counter[str] = field(default_factory=Counter)  # streams the hub answered (snapshot end / headers)
    failed: Counter[str] = field(default_factory=Counter)  # kind:code of streams that ended
    events: int = 0  # worklist events received after the snapshots
    messages: int = 0  # the messages that carried them (several per message with change batches)


async def _hold(address: str, spec: dict[str, list[dict[str, Any]]], *, batches: bool) -> None:
    from teleread.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, results_pb2, results_pb2_grpc
    from teleread.v1 import worklist_pb2, worklist_pb2_grpc

    tally, release = Tally(), asyncio.Event()
    channels: list[grpc.aio.Channel] = []

    def channel() -> grpc.aio.Channel:
        channels.append(grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]))
        return channels[-1]

    def auth(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def watch(stub: Any, token: str, kind: str) -> None:
        request = worklist_pb2.WatchWorklistRequest(snapshot_batches=True, change_batches=batches)
        call = stub.Watch(request, metadata=auth(token), timeout=7200)
        live = False
        try:
            async for event in call:
                if event.type == worklist_pb2.WorklistEvent.TYPE_SNAPSHOT_END:
                    tally.live[kind], live = tally.live[kind] + 1, True
                elif live:
                    tally.events += len(event.changes) or 1
                    tally.messages += 1
        except grpc.aio.AioRpcError as err:
            tally.failed[f"{kind}:{err.code().name}"] += 1
            tally.live[kind] -= int(live)
            print(f"{kind} stream ended: {err.code().name} {err.details()!r}", file=sys.stderr)  # holder.log

    async def results(stub: Any, token: str) -> None:
        call = stub.WatchResults(results_pb2.WatchResultsRequest(after_cursor=0), metadata=auth(token), timeout=7200)
        live = False
        try:
            await call.initial_metadata()  # the hub sends headers once the watch is subscribed
            if not call.done():
                tally.live["results"], live = tally.live["results"] + 1, True
            await call
        except grpc.aio.AioRpcError as err:
            tally.failed[f"results:{err.code().name}"] += 1
            tally.live["results"] -= int(live)

    async def upload(stub: Any, token: str, number: int) -> None:
        data = os.urandom(UPLOAD_SIZE)
        live = False
        try:
            exam = await stub.OpenExam(
                ingest_pb2.OpenExamRequest(client_exam_key=f"idle-{number}", kind=common_pb2.EXAM_KIND_IMAGING),
                metadata=auth(token),
                timeout=60,
            )
            status = await stub.BeginUpload(
                ingest_pb2.BeginUploadRequest(
                    exam_id=exam.exam_id, size=len(data), sha256=hashlib.sha256(data).hexdigest(), role="dicom"
                ),
                metadata=auth(token),
                timeout=60,
            )

            async def messages() -> AsyncIterator[Any]:
                yield ingest_pb2.UploadChunk(upload_id=status.upload_id, offset=0, data=data[:FIRST_MESSAGE])
                await release.wait()  # then silence: a link that went quiet

            call = stub.Upload(messages(), metadata=auth(token), timeout=7200)
            tally.live["uploads"], live = tally.live["uploads"] + 1, True
            await call
        except grpc.aio.AioRpcError as err:
            tally.failed[f"uploads:{err.code().name}"] += 1
            tally.live["uploads"] -= int(live)

    tasks: list[asyncio.Task[None]] = []
    number = 0
    for kind in ("hot", "worklist"):
        for identity in spec[kind]:
            stub = worklist_pb2_grpc.WorklistStub(channel())
            tasks += [asyncio.create_task(watch(stub, identity["token"], kind)) for _ in range(identity["streams"])]
    for identity in spec["results"]:
        stub = results_pb2_grpc.ResultsStub(channel())
        tasks += [asyncio.create_task(results(stub, identity["token"])) for _ in range(identity["streams"])]
    for identity in spec["uploads"]:
        stub = ingest_pb2_grpc.IngestStub(channel())
        for _ in range(identity["streams"]):
            number += 1
            tasks.append(asyncio.create_task(upload(stub, identity["token"], number)))
    wanted = {kind: sum(i["streams"] for i in spec[kind]) for kind in spec}

    def snapshot() -> dict[str, Any]:
        return {
            "live": dict(tally.live), "failed": dict(tally.failed), "events": tally.events, "messages": tally.messages,
            "wanted": wanted,
        }  # fmt: skip

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        settled = {k: tally.live[k] + sum(v for f, v in tally.failed.items() if f.startswith(k + ":")) for k in wanted}
        if all(settled[k] >= wanted[k] for k in wanted):
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(2.0)  # the last uploads' first message reaches the hub
    print(json.dumps({"ready": snapshot()}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    print(json.dumps({"end": snapshot()}), flush=True)
    release.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


def hold_main(args: argparse.Namespace) -> None:
    spec = json.loads(Path(args.spec).read_text())
    asyncio.run(_hold(args.address, spec, batches=not args.single_events))


class Holder:
    """The stream-holding process, started with the identities' tokens in a private file."""

    def __init__(self, address: str, spec: dict[str, Any], run_dir: Path, *, batches: bool = True) -> None:
        spec_file = run_dir / "streams.json"
        spec_file.touch(mode=0o600)
        spec_file.write_text(json.dumps(spec))
        self._log = open(run_dir / "holder.log", "ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TELEREAD_")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.streams", "hold", "--address", address, "--spec", str(spec_file)]
            + ([] if batches else ["--single-events"]),
            cwd=_hubproc.REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    def read(self, key: str, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        result: dict[str, Any] = {}

        def reader() -> None:
            assert self.process.stdout is not None
            line = self.process.stdout.readline()
            if line:
                result.update(json.loads(line))

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        thread.join(timeout)
        if key not in result:
            raise RuntimeError(f"the stream holder did not report '{key}' (see holder.log)")
        return dict(result[key])

    def stop(self) -> dict[str, Any]:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.read("end", 60)
        finally:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
            self._log.close()

    def pids(self) -> list[int]:
        return [self.process.pid]


# ---- the readers -------------------------------------------------------------------------------------
@dataclass
class ReaderRun:
    latencies: list[float]
    refused: Counter[str]
    seconds: float


def run_readers(address: str, tokens: list[str], *, claims: int) -> ReaderRun:
    """Each reader: one unmeasured claim/release, then ClaimNext (timed) and ReleaseClaim in a loop
    until ``claims / readers`` claims were made. Any failed call counts as refused, by its code."""
    from teleread.client import open_channel
    from teleread.v1 import worklist_pb2, worklist_pb2_grpc

    latencies: list[list[float]] = [[] for _ in tokens]
    refused: Counter[str] = Counter()
    lock = threading.Lock()
    channels = [open_channel(address, token=token) for token in tokens]
    barrier = threading.Barrier(len(tokens) + 1)

    def call(name: str, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            with lock:
                refused[f"{name}:{err.code().name}"] += 1  # type: ignore[attr-defined]
            return None

    def reader(channel: grpc.Channel, out: list[float]) -> None:
        stub = worklist_pb2_grpc.WorklistStub(channel)
        warm = call("ClaimNext", stub.ClaimNext, worklist_pb2.ClaimNextRequest())
        if warm is not None:
            call(
                "ReleaseClaim",
                stub.ReleaseClaim,
                worklist_pb2.ReleaseClaimRequest(exam_id=warm.exam.exam_id, fence=warm.fence),
            )
        barrier.wait()
        for _ in range(claims // len(tokens)):
            started = time.perf_counter()
            claim = call("ClaimNext", stub.ClaimNext, worklist_pb2.ClaimNextRequest())
            if claim is None:
                continue
            out.append(time.perf_counter() - started)
            release = worklist_pb2.ReleaseClaimRequest(exam_id=claim.exam.exam_id, fence=claim.fence)
            call("ReleaseClaim", stub.ReleaseClaim, release)

    threads = [threading.Thread(target=reader, args=(ch, out), daemon=True) for ch, out in zip(channels, latencies)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    for ch in channels:
        ch.close()
    return ReaderRun([v for per in latencies for v in per], refused, seconds)


# ---- the run -------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q)) if values else float("nan")


def _live_text(state: dict[str, Any]) -> str:
    live, wanted = state["live"], state["wanted"]
    parts = [f"{kind} {live.get(kind, 0)}/{wanted[kind]}" for kind in ("hot", "worklist", "results", "uploads")]
    failed = ", ".join(f"{k} {v}" for k, v in sorted(state["failed"].items()))
    return "; ".join(parts) + (f"; ended: {failed}" if failed else "")


def run(
    plan: Plan, work: Path, *, logs: Path | None = None, profile: Path | None = None
) -> tuple[list[Figure], dict[str, Any]]:
    pg = _backends.PgCluster(Path(tempfile.mkdtemp(prefix="teleread-bench-pg-")))
    pg.start()
    figures: list[Figure] = []
    extra: dict[str, Any] = {}
    try:
        url = pg.new_database()
        run_dir = work / "run"
        settings = {"data_dir": str(run_dir / "data"), "database_url": url, "grpc": {"upload_idle_seconds": 600}}
        hub = _hubproc.start_hub(settings, run_dir=run_dir, readers=plan.readers, profile=profile)
        try:
            bulk_insert_queued(url, site_id=int(hub.info["site_id"]), count=plan.queued)
            spec = make_identities(url, plan)
            holder = Holder(hub.address, spec, run_dir, batches=plan.change_batches)
            try:
                console.log("opening the streams")
                opened = time.perf_counter()
                ready = holder.read("ready", READY_TIMEOUT_S + 60)
                console.log(f"streams after {time.perf_counter() - opened:.0f} s: {_live_text(ready)}")
                staged = len(list((run_dir / "data" / "staging").glob("*.part")))
                threads = _threads(hub.process.pid)
                groups = {
                    "hub": hub.tree,
                    "postgres": pg.pids,
                    "stream clients": holder.pids,
                    "readers": lambda: [os.getpid()],
                }
                tokens = [hub.tokens[f"cardio-{i}"] for i in range(plan.readers)]
                with cpu_meter(groups) as cores:
                    readers = run_readers(hub.address, tokens, claims=plan.claims)
                end = holder.stop()
            except BaseException:
                holder.process.kill()
                raise
        finally:
            hub.stop()
            if logs is not None:  # the hub's and the stream holder's logs, kept for a look
                logs.mkdir(parents=True, exist_ok=True)
                for name in ("hub.log", "holder.log"):
                    if (run_dir / name).exists():
                        shutil.copy(run_dir / name, logs / name)
    finally:
        pg.stop()
    lat = readers.latencies
    p50, p95, p99 = _pct(lat, 50), _pct(lat, 95), _pct(lat, 99)
    refused = sum(readers.refused.values())
    detail = (
        f"p50 {p50:.1f} ms, p95 {p95:.1f} ms, p99 {p99:.1f} ms, {len(lat) / readers.seconds:.0f} claims/s "
        f"({len(lat)} claims, {plan.queued} queued)"
    )
    claim = Figure("claim-next p99", "postgresql", plan.readers, p99, "ms", detail, CLAIM_P99_TARGET_MS, False)
    claim.cpu_cores = dict(cores)
    figures.append(claim)
    codes = ", ".join(f"{k} {v}" for k, v in sorted(readers.refused.items())) or "none"
    refusals = Figure("reader calls refused", "postgresql", plan.readers, refused, "calls", f"{refused} ({codes})")
    refusals.note = "target 0: " + ("pass" if refused == 0 else "MISS")
    figures.append(refusals)
    streams = sum(ready["live"].values())
    wanted = sum(ready["wanted"].values())
    live = Figure("streams live", "postgresql", 0, streams, "streams", f"before: {_live_text(ready)}")
    live.note = (
        f"after: {_live_text(end)}; staged first messages of the idle uploads: {staged}; "
        f"hub main process threads with the streams open: {threads}"
    )
    figures.append(live)
    fanned = Figure("worklist events to watchers", "postgresql", plan.hot, end["events"], "events", str(end["events"]))
    how = "in change batches" if plan.change_batches else "one event per message"
    fanned.note = (
        f"to the {plan.hot} watches of the readers' queue during the claims, {how}: {end.get('messages', 0)} messages"
    )
    figures.append(fanned)
    extra.update(
        plan=plan.__dict__,
        latencies_ms={"p50": p50, "p95": p95, "p99": p99},
        refused=dict(readers.refused),
        streams_before=ready,
        streams_after=end,
        wanted=wanted,
    )
    return figures, extra


def _threads(pid: int) -> int:
    import psutil

    try:
        return int(psutil.Process(pid).num_threads())
    except psutil.Error:
        return 0


def print_figures(figures: list[Figure], info: dict[str, Any]) -> None:
    table = Table(title="teleread streams benchmark (RELIABILITY F20)")
    for column in ("figure", "readers", "measured", "target", "result", "CPU cores busy", "note"):
        table.add_column(column)
    for f in figures:
        style = "" if f.passed is None else ("green" if f.passed else "bold red")
        verdict = f"[{style}]{f.verdict}[/]" if style else f.verdict
        table.add_row(f.figure, str(f.clients), f.detail, f.target_text, verdict, f.cpu_text, f.note)
    wide = Console(width=max(console.width, 200))
    wide.print(table)
    wide.print("machine: " + machine_line(info))


def _ours() -> set[int]:
    import psutil

    me = psutil.Process()
    return {me.pid, *(child.pid for child in me.children(recursive=True))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streams", description=(__doc__ or "").split("\n")[0])
    sub = parser.add_subparsers(dest="what")
    hold = sub.add_parser("hold", help=argparse.SUPPRESS)
    hold.add_argument("--address", required=True)
    hold.add_argument("--spec", required=True)
    hold.add_argument("--single-events", action="store_true")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="save the results here")
    parser.add_argument("--watchers", type=int, default=Plan.watchers, help="watch streams (worklist + results)")
    parser.add_argument("--uploads", type=int, default=Plan.uploads, help="idle upload streams")
    parser.add_argument("--hot", type=int, default=Plan.hot, help="watches of the readers' own queue")
    parser.add_argument(
        "--single-events", action="store_true", help="the watches ask for one event per message (no change batches)"
    )
    parser.add_argument("--claims", type=int, default=Plan.claims, help="claims by all readers together")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--logs", type=Path, default=None, metavar="DIR", help="keep the hub's and clients' logs here")
    parser.add_argument("--profile", type=Path, default=None, metavar="PATH", help="the hub's CPU profile (pstats)")
    args = parser.parse_args(argv)
    if args.what == "hold":
        hold_main(args)
        return 0
    plan = Plan(
        watchers=args.watchers, uploads=args.uploads, hot=args.hot, claims=args.claims,
        change_batches=not args.single_events,
    )  # fmt: skip
    info = machine()
    info["upload_parallel"] = "n/a (idle uploads: one message each)"
    with tempfile.TemporaryDirectory(prefix="teleread-bench-streams-", dir=args.workdir) as tmp:
        with OtherLoad(_ours) as other:
            figures, extra = run(plan, Path(tmp), logs=args.logs, profile=args.profile)
    info["load_after"], info["other_cores"] = os.getloadavg()[0], other.cores
    print_figures(figures, info)
    if args.json:
        save_json(args.json, figures=figures, info=info, extra=extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
