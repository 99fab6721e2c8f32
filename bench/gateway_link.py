"""The clinic gateway's upload over an emulated rural link: goodput and bytes re-sent after cuts.

Run as root from the repository root: ``.venv/bin/python -m bench.gateway_link [--quick] [--json PATH]``.

The requirement: over a link of 10 Mbit/s, 100 ms round trip and 1 % packet loss, a 100 MB imaging
study goes from the gateway's outbox to the hub at >= 80 % of the link rate (>= 8 Mbit/s of goodput),
and when the link is cut during an upload the bytes sent again per cut are <= one upload chunk (1 MiB).

How it is measured. The link (``bench/_netns.py``) joins two network namespaces: ``tr-clinic``, where
the gateway runs, and ``tr-hub``, where a hub process serves (embedded deployment: SQLite and a local
object store, production defaults). A relay in a third namespace emulates the link as netem would
(this kernel has no netem): per direction 1 % random loss, a 10 Mbit/s bottleneck with a 200-frame
FIFO and 50 ms of delay; a cut drops everything both ways. Before measuring, TCP handshake times check
the round trip, and one bare TCP connection per congestion control sends for a while (the ceiling of
one connection on this link). The gateway is its own process in ``tr-clinic``
(``python -m bench.gateway_link _gateway``): the product's ``Outbox`` and ``Forwarder`` with the
gateway service's settings (4 streams, outbox backoff 2-120 s, 0.5 s polling, one gRPC channel from
``open_channel``); compression is off so that goodput is the transport's, not gzip's. Each run gets a
fresh synthetic CT study (``bench/_data.py``: 512x512 int16 slices of random pixels, ~525 kB per file),
put into a fresh outbox and marked complete before the gateway starts. The clock runs from the first
``drain_once`` to the ``CommitExam`` answer (both in the gateway process); goodput is the study's
bytes x 8 / that time. Congestion control is per network namespace: the gateway's namespace is set to
cubic (Linux's default) or bbr before each run, and cached TCP metrics are flushed.

(a) Goodput of the 100 MB study with cubic and with bbr. A run that has not committed after the cap
(1.2 x the time the target allows) is stopped; its goodput is then the bytes the hub had stored by then.
When a run misses 80 %, the same study (smaller) is also sent with more streams on the one connection
and with several gRPC channels (separate TCP connections; the bench hands the Forwarder a stub that
gives each upload thread its own channel) to show what would reach the target.
(b) Cuts: during a further upload (bbr unless ``--cut-cc``) the relay cuts the link at random
moments (after a random share of the study, plus up to 1 s) for a random 5-20 s each. The gateway
process wraps ``_ChunkReader.chunks`` and counts every data byte it yields to gRPC; a byte of an
object at an offset already yielded before is "re-sent" (their sum equals yielded - study size), and
each re-send is charged to the last cut before it. Yielded-but-undelivered bytes of a cut stream
count as re-sent: an upper bound. The relay records how long after each restore the first data frame
crossed. (c) Every run's commit is checked in the hub: exam state, object count, and each stored
object read back from the object store with its SHA-256 compared with the file's.

Output: a table of figures with the machine line (``bench/_report.py``) and, with ``--json``, a file.
MB = 10^6 bytes, Mbit/s = 10^6 bit/s, MiB = 2^20 bytes.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import select
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Iterator

from teleread.files import hash_stream
from teleread.gateway.clinic.forward import MESSAGE_BYTES, SpreadStub
from teleread.gateway.uploader.client import CHUNK_SIZE

MB = 1e6
MIB = 1024 * 1024
TARGET_SHARE = 0.80
HUB_START_TIMEOUT_S = 120.0
TOKEN_ENV = "BENCH_GATEWAY_TOKEN"


# --- the gateway process (inside tr-clinic) --------------------------------------------------------


class _WireMeter:
    """Counts the payload bytes the gateway yields to gRPC, per object offset, to find re-sends."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.yielded = 0
        self.resent = 0
        self.high: dict[str, int] = {}  # object sha256 -> highest offset yielded so far
        self.resends: list[tuple[float, int]] = []  # (monotonic time, bytes yielded again)
        self.streams: list[tuple[float, str, int, bool]] = []  # (time, sha256[:12], offset, object seen before)

    def install(self) -> None:
        from teleread.gateway.uploader import client as upload

        original = upload._ChunkReader.chunks
        meter = self

        def chunks(reader: Any, mark: Any) -> Iterator[Any]:
            position = reader.offset
            meter.stream(reader.obj.sha256, position)
            for message in original(reader, mark):
                meter.sent(reader.obj.sha256, position, len(message.data))
                position += len(message.data)
                yield message

        upload._ChunkReader.chunks = chunks  # type: ignore[method-assign]

    def stream(self, sha: str, offset: int) -> None:
        with self.lock:
            self.streams.append((time.monotonic(), sha[:12], offset, sha in self.high))

    def sent(self, sha: str, position: int, size: int) -> None:
        with self.lock:
            high = self.high.get(sha, 0)
            again = max(0, min(position + size, high) - position)
            self.yielded += size
            if again:
                self.resent += again
                self.resends.append((time.monotonic(), again))
            self.high[sha] = max(high, position + size)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"yielded": self.yielded, "resent": self.resent, "streams": len(self.streams)}


def _emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def gateway_process(argv: list[str]) -> int:
    """``_gateway``: drain the outbox to the hub as the gateway service's loop does, reporting
    progress as JSON lines on stdout, until the exam is committed."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_link _gateway")
    parser.add_argument("--outbox", type=Path, required=True)
    parser.add_argument("--hub", required=True)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--compression", default="off")
    parser.add_argument("--chunk-size", type=int, default=0, help="upload message size (0: the product's)")
    args = parser.parse_args(argv)

    from teleread import client
    from teleread.gateway.clinic.forward import Forwarder
    from teleread.backoff import Backoff
    from teleread.gateway.clinic.outbox import Outbox
    from teleread.settings import GatewaySettings
    from teleread.v1 import ingest_pb2_grpc

    signal.signal(signal.SIGTERM, lambda *_: os._exit(3))
    meter = _WireMeter()
    meter.install()
    config = GatewaySettings()
    outbox = Outbox(args.outbox, backoff=Backoff(base_s=config.retry_base_seconds, cap_s=config.retry_cap_seconds))
    token = os.environ.pop(TOKEN_ENV)
    base_options = client.CHANNEL_OPTIONS
    channels = []
    for _ in range(args.channels):
        if args.channels > 1:  # a subchannel of its own, hence a TCP connection of its own
            client.CHANNEL_OPTIONS = (*base_options, ("grpc.use_local_subchannel_pool", 1))
        channels.append(client.open_channel(args.hub, token=token))
        client.CHANNEL_OPTIONS = base_options
    stubs = [ingest_pb2_grpc.IngestStub(channel) for channel in channels]
    ingest = stubs[0] if len(stubs) == 1 else SpreadStub(stubs)
    if args.chunk_size:  # what-if: the Forwarder does not expose upload_exams' chunk_size
        from teleread.gateway.clinic import forward
        from teleread.gateway.uploader import client as upload

        forward.upload_exams = functools.partial(upload.upload_exams, chunk_size=args.chunk_size)  # type: ignore[assignment]
    forwarder = Forwarder(outbox, ingest, parallel=args.parallel, compression=args.compression)
    stop = threading.Event()

    def report() -> None:
        while not stop.wait(0.25):
            _emit({"event": "progress", "t": time.monotonic(), **meter.snapshot()})

    cpu_before = time.process_time()
    started = time.monotonic()
    _emit({"event": "start", "t": started})
    threading.Thread(target=report, daemon=True).start()
    results = []
    while True:
        try:
            result = forwarder.drain_once()
        except Exception as exc:  # noqa: BLE001 - the service loop logs and carries on, so do we
            _emit({"event": "error", "t": time.monotonic(), "detail": f"{type(exc).__name__}: {exc}"[:300]})
            outbox.recover()
            time.sleep(config.poll_seconds)
            continue
        if result is None:
            time.sleep(config.poll_seconds)
            continue
        results.append(asdict(result) | {"t": time.monotonic()})
        _emit({"event": "drain", **results[-1]})
        if result.outcome == "committed":
            break
        if result.outcome == "rejected":
            break
    ended = time.monotonic()
    stop.set()
    with meter.lock:
        done = {
            "event": "done",
            "t0": started,
            "t1": ended,
            "yielded": meter.yielded,
            "resent": meter.resent,
            "resends": meter.resends,
            "streams": meter.streams,
            "results": results,
            "cpu_s": time.process_time() - cpu_before,
        }
    _emit(done)
    for channel in channels:
        channel.close()
    outbox.close()
    return 0


# --- the hub process (inside tr-hub) ---------------------------------------------------------------


def hub_process(argv: list[str]) -> int:
    """``_hub``: the hub of ``bench._hubproc`` (site "bench-clinic" and its upload token), but
    listening on the hub namespace's address instead of loopback."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_link _hub")
    parser.add_argument("--settings-json", type=Path, required=True)
    parser.add_argument("--host", required=True)
    args = parser.parse_args(argv)
    from bench._hubproc import _register, _wait_for_sigterm
    from teleread.app.hub import build_hub, create_server
    from teleread.logs import configure_logging
    from teleread.settings import Settings

    settings = Settings.model_validate(json.loads(args.settings_json.read_text()))
    configure_logging(settings.log_level)
    hub = build_hub(settings)
    site_id, tokens = _register(hub.engine, readers=0)
    server, port = create_server(hub, host=args.host, port=0)
    server.start()
    _emit({"port": port, "site_id": site_id, "tokens": tokens})
    _wait_for_sigterm()
    server.stop(grace=2).wait()
    hub.close()
    return 0


# --- the benchmark side ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    slices: int = 200  # the study of (a) and (b): 200 x ~525 kB = ~105 MB
    probe_slices: int = 80  # the smaller study of the what-if runs
    probe_cap_s: float = 45.0
    raw_seconds: float = 15.0
    rtt_probes: int = 20
    cuts: int = 4
    cut_seconds: tuple[float, float] = (5.0, 20.0)
    long_cut_s: float = 45.0  # one of the cuts outlasts the channel's keepalive timeout (20 s): 0 for none
    cut_cc: str = "bbr"
    what_if: bool = True
    parallel: int = 4  # the gateway service's Forwarder default


FULL_PLAN = Plan()
QUICK_PLAN = Plan(slices=40, raw_seconds=5.0, rtt_probes=10, cuts=1, long_cut_s=0.0, what_if=False)


@dataclass
class Study:
    folder: Path
    study_uid: str
    files: list[tuple[Path, str, str, int]]  # (path, SOP instance UID, sha256, size)

    @property
    def size(self) -> int:
        return sum(item[3] for item in self.files)


@dataclass
class UploadRun:
    name: str
    cc: str
    parallel: int
    channels: int
    study_bytes: int
    objects: int
    cap_s: float
    chunk_size: int = MESSAGE_BYTES
    seconds: float = 0.0
    committed: bool = False
    stored_bytes: int = 0
    yielded: int = 0
    resent: int = 0
    verified: str = ""
    hub_state: str = ""
    attempts: list[dict[str, Any]] = field(default_factory=list)
    cuts: list[dict[str, Any]] = field(default_factory=list)
    link: dict[str, Any] = field(default_factory=dict)
    cpu_cores: dict[str, float] = field(default_factory=dict)
    gateway_cpu_s: float = 0.0
    error: str = ""

    @property
    def goodput_mbps(self) -> float:
        bytes_ = self.study_bytes if self.committed else self.stored_bytes
        return bytes_ * 8 / max(self.seconds, 1e-9) / 1e6


class _Lines:
    """JSON lines from a child's stdout, read straight from the pipe so that nothing waits in a buffer."""

    def __init__(self, stream: IO[str]) -> None:
        self.fd = stream.fileno()
        self.buffer = b""

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next line, or None when none came within ``timeout`` s; EOFError when the pipe closed."""
        deadline = time.monotonic() + max(0.0, timeout)
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise EOFError
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return dict(json.loads(line))


def _stop(process: subprocess.Popen[Any], *, timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout)
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            stream.close()


def _log_tail(path: Path, lines: int = 4) -> str:
    try:
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


class Bench:
    def __init__(self, plan: Plan, work: Path, *, seed: int, console: Any) -> None:
        from bench import _netns

        self.plan, self.work, self.console = plan, work, console
        self.rng = random.Random(seed)
        self.seed = seed
        self.link = _netns.Link(_netns.LinkSpec(), log_dir=work / "logs", seed=seed)
        self.hub: subprocess.Popen[str] | None = None
        self.hub_info: dict[str, Any] = {}
        self.hub_dir = work / "hub"
        self.runs: list[UploadRun] = []
        self.link_check: dict[str, Any] = {}
        self.figures: list[Any] = []
        self.failed = False
        self._studies = itertools.count(1)
        self._np_rng: Any = None

    # ---- processes ---------------------------------------------------------------------------
    def start_hub(self) -> None:
        from bench import _netns

        self.hub_dir.mkdir(parents=True, exist_ok=True)
        settings_file = self.work / "hub-settings.json"
        settings_file.write_text(json.dumps({"data_dir": str(self.hub_dir)}))
        log = self.work / "logs" / "hub.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as stderr:
            self.hub = subprocess.Popen(
                _netns.module_cmd(
                    _netns.HUB,
                    "bench.gateway_link",
                    "_hub",
                    "--settings-json",
                    str(settings_file),
                    "--host",
                    _netns.HUB_IP,
                ),
                cwd=_netns.REPO,
                env=_netns.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        assert self.hub.stdout is not None
        info = _Lines(self.hub.stdout).next(HUB_START_TIMEOUT_S)
        if info is None:
            raise RuntimeError(f"the hub did not start in {HUB_START_TIMEOUT_S:.0f} s: {_log_tail(log)}")
        self.hub_info = info

    @property
    def hub_address(self) -> str:
        from bench import _netns

        return f"{_netns.HUB_IP}:{self.hub_info['port']}"

    def close(self) -> None:
        if self.hub is not None:
            _stop(self.hub)
            self.hub = None
        self.link.close()

    def pids(self) -> set[int]:
        """This run's processes: this one and its descendants."""
        import psutil

        me = psutil.Process()
        try:
            return {me.pid, *(child.pid for child in me.children(recursive=True))}
        except psutil.Error:
            return {me.pid}

    @staticmethod
    def _tree(pid: int | None) -> list[int]:
        import psutil

        if pid is None:
            return []
        try:
            return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
        except psutil.Error:
            return []

    # ---- link check --------------------------------------------------------------------------
    def check_link(self) -> None:
        """Round trip (TCP handshakes to a sink) and one bare TCP connection per congestion control."""
        from bench import _netns

        log = open(self.work / "logs" / "sink.log", "ab")
        sink = subprocess.Popen(
            _netns.module_cmd(_netns.HUB, "bench._netns", "sink", "--host", _netns.HUB_IP),
            cwd=_netns.REPO,
            env=_netns.child_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            assert sink.stdout is not None
            lines = _Lines(sink.stdout)
            first = lines.next(30.0)
            if first is None:
                raise RuntimeError("the TCP sink did not start")
            port = str(first["port"])
            self.link.command("reset")
            probe = _netns.run(
                *_netns.module_cmd(
                    _netns.CLINIC,
                    "bench._netns",
                    "rtt",
                    "--host",
                    _netns.HUB_IP,
                    "--port",
                    port,
                    "--count",
                    str(self.plan.rtt_probes),
                )
            )
            self.link_check["rtt"] = json.loads(probe.stdout)
            self.link_check["raw"] = {}
            for cc in ("cubic", "bbr"):
                _netns.Link.forget_tcp_metrics()
                self.link.command("reset")
                _netns.run(
                    *_netns.module_cmd(
                        _netns.CLINIC,
                        "bench._netns",
                        "send",
                        "--host",
                        _netns.HUB_IP,
                        "--port",
                        port,
                        "--seconds",
                        str(self.plan.raw_seconds),
                        "--cc",
                        cc,
                    )
                )
                got = lines.next(60.0)
                if got is None:
                    raise RuntimeError("the TCP sink reported nothing")
                stats = self.link.command("stats")
                self.link_check["raw"][cc] = got | {"mbps": got["bytes"] * 8 / got["seconds"] / 1e6, "link": stats}
                self.console.log(f"bare TCP, {cc}: {got['bytes'] * 8 / got['seconds'] / 1e6:.2f} Mbit/s")
        finally:
            _stop(sink, timeout=5)
            log.close()
        rtt = self.link_check["rtt"]
        self.console.log(f"round trip: median {rtt['median_ms']:.1f} ms over {len(rtt['rtt_ms'])} TCP handshakes")

    # ---- studies -----------------------------------------------------------------------------
    def make_study(self, slices: int) -> Study:
        import numpy as np
        import pydicom

        from bench import _data
        from teleread.gateway.uploader.client import file_sha256

        if self._np_rng is None:
            self._np_rng = np.random.default_rng(self.seed)
        folder = _data.write_ct_study(self.work / f"study-{next(self._studies)}", slices=slices, rng=self._np_rng)
        files = []
        study_uid = ""
        for path in sorted(folder.iterdir()):
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study_uid = str(ds.StudyInstanceUID)
            files.append((path, str(ds.SOPInstanceUID), file_sha256(path), path.stat().st_size))
        return Study(folder, study_uid, files)

    def fill_outbox(self, study: Study, root: Path) -> None:
        """The study as the DICOM receiver leaves it: every instance durable, the study complete."""
        from teleread.gateway.clinic.outbox import Outbox

        box = Outbox(root)
        try:
            for path, sop_uid, _sha, _size in study.files:
                with path.open("rb") as stream:
                    box.receive(stream, group_key=study.study_uid, instance_key=sop_uid, role="dicom", kind="image")
            box.complete(study.study_uid)
        finally:
            box.close()

    # ---- hub-side checks ---------------------------------------------------------------------
    def _hub_db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.hub_dir / 'teleread.db'}?mode=ro", uri=True, timeout=30)

    def stored_bytes(self, study: Study) -> int:
        shas = {item[2] for item in study.files}
        db = self._hub_db()
        try:
            rows = db.execute("SELECT sha256, size FROM objects").fetchall()
        finally:
            db.close()
        return sum(size for sha, size in rows if sha in shas)

    def verify(self, study: Study, hub_exam_id: str) -> tuple[str, str]:
        """(hub exam state, verdict): every object of the study stored once under the exam, each
        read back from the object store with its SHA-256 and size matching the file's."""
        from teleread.settings import Settings
        from teleread.storage.factory import build_object_store

        db = self._hub_db()
        try:
            exam = db.execute(
                "SELECT state, object_count, total_bytes FROM exams WHERE id=?", (hub_exam_id,)
            ).fetchone()
            rows = db.execute(
                "SELECT sha256, size, storage_key FROM objects WHERE exam_id=?", (hub_exam_id,)
            ).fetchall()
        finally:
            db.close()
        if exam is None:
            return "missing", "the hub has no such exam"
        store = build_object_store(Settings(data_dir=self.hub_dir))
        expected = {(sha, size) for _p, _u, sha, size in study.files}
        good = 0
        for sha, size, key in rows:
            with store.open_verified(key, sha256=sha, size=size) as stream:
                read_back = hash_stream(stream)
            good += read_back == (sha, size) and (sha, size) in expected
        state, count, total = exam
        ok = good == len(study.files) == len(rows) == count and total == study.size
        verdict = (
            f"{'OK' if ok else 'MISMATCH'}: exam {state}, {count} objects ({total / MB:.1f} MB) in the hub; "
            f"{good}/{len(study.files)} read back with the file's SHA-256"
        )
        return str(state), verdict

    # ---- one upload --------------------------------------------------------------------------
    def upload(
        self,
        name: str,
        *,
        cc: str,
        slices: int,
        cap_s: float,
        parallel: int,
        channels: int = 1,
        cut_plan: list[tuple[float, float]] | None = None,
        chunk_size: int = 0,
    ) -> UploadRun:
        from bench import _netns
        from bench._measure import cpu_meter

        study = self.make_study(slices)
        outbox = self.work / f"outbox-{name.replace(' ', '-')}"
        self.fill_outbox(study, outbox)
        run = UploadRun(name, cc, parallel, channels, study.size, len(study.files), cap_s)
        run.chunk_size = chunk_size or MESSAGE_BYTES
        self.link.set_congestion_control(_netns.CLINIC, cc)
        _netns.Link.forget_tcp_metrics()
        self.link.command("reset")
        log = open(self.work / "logs" / f"gateway-{name.replace(' ', '-')}.log", "ab")
        env = _netns.child_env() | {TOKEN_ENV: self.hub_info["tokens"]["site"]}
        args = ["--outbox", str(outbox), "--hub", self.hub_address, "--parallel", str(parallel)]
        args += ["--channels", str(channels), "--compression", "off", "--chunk-size", str(chunk_size)]
        gateway = subprocess.Popen(
            _netns.module_cmd(_netns.CLINIC, "bench.gateway_link", "_gateway", *args),
            cwd=_netns.REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        hub_pid = self.hub.pid if self.hub is not None else None
        relay_pid = self.link.relay.pid if self.link.relay is not None else None
        groups = {"hub": lambda: self._tree(hub_pid), "link relay": lambda: self._tree(relay_pid)}
        try:
            with cpu_meter(groups) as cores:
                done = self._follow(gateway, run, study, cut_plan=list(cut_plan or []))
            run.cpu_cores = dict(cores)
        finally:
            _stop(gateway, timeout=10)
            log.close()
            if self.link.relay is not None and self.link.command("stats")["cut"]:
                self.link.restore()
        run.link = self.link.command("stats")
        if done is not None:
            run.seconds = done["t1"] - done["t0"]
            run.yielded, run.resent, run.gateway_cpu_s = done["yielded"], done["resent"], done["cpu_s"]
            run.attempts = [{k: r[k] for k in ("outcome", "detail", "delay_s", "t")} for r in done["results"]]
            committed = [r for r in done["results"] if r["outcome"] == "committed"]
            run.committed = bool(committed)
            if committed:
                run.hub_state, run.verified = self.verify(study, committed[-1]["detail"])
            else:
                run.error = "; ".join(r["detail"] for r in done["results"])[:300]
            self._charge_cuts(run, done)
        run.stored_bytes = self.stored_bytes(study)
        for cut in run.cuts:
            recoveries = run.link.get("recoveries", [])
            index = cut["index"]
            if index < len(recoveries):
                cut["first_data_after_restore_s"] = recoveries[index].get("first_data_after_s")
        self.runs.append(run)
        self.console.log(
            f"{name}: {run.goodput_mbps:.2f} Mbit/s, {'committed' if run.committed else 'NOT committed'} "
            f"in {run.seconds:.1f} s; re-sent {run.resent} B; {run.verified or run.error}"
        )
        shutil.rmtree(study.folder, ignore_errors=True)
        shutil.rmtree(outbox, ignore_errors=True)
        return run

    def _cut_plan(self, cuts: int) -> list[tuple[float, float]]:
        """(share of the study yielded when the cut comes, cut length in s), one cut in each of
        ``cuts`` equal parts of the upload; with ``long_cut_s``, one of them (at random) lasts that long."""
        low, high = self.plan.cut_seconds
        plan = []
        for number in range(cuts):
            share = 0.05 + 0.9 * (number + self.rng.uniform(0.15, 0.85)) / cuts
            plan.append((share, self.rng.uniform(low, high)))
        if self.plan.long_cut_s and cuts > 1:
            chosen = self.rng.randrange(cuts)
            plan[chosen] = (plan[chosen][0], self.plan.long_cut_s)
        return plan

    def _follow(
        self, gateway: subprocess.Popen[str], run: UploadRun, study: Study, *, cut_plan: list[tuple[float, float]]
    ) -> dict[str, Any] | None:
        """Read the gateway's progress until it reports done or the cap passes; cut and restore the
        link on the way when asked to."""
        assert gateway.stdout is not None
        lines = _Lines(gateway.stdout)
        start = lines.next(120.0)
        if start is None or start.get("event") != "start":
            raise RuntimeError("the gateway process did not start")
        t0 = float(start["t"])
        plan = cut_plan
        pending_cut: float | None = None
        restore_at: float | None = None
        yielded = 0
        while True:
            now = time.monotonic()
            if now - t0 > run.cap_s:
                run.seconds = now - t0
                run.error = f"not committed after the {run.cap_s:.0f} s cap"
                run.yielded = yielded
                return None
            if restore_at is not None and now >= restore_at:
                self.link.restore()
                run.cuts[-1].update(restored_t=time.monotonic(), yielded_at_restore=yielded)
                restore_at = None
            if pending_cut is not None and now >= pending_cut and restore_at is None:
                self.link.cut()
                share, length = plan.pop(0)
                run.cuts.append(
                    {
                        "index": len(run.cuts),
                        "at_share": share,
                        "seconds": length,
                        "cut_t": time.monotonic(),
                        "yielded_at_cut": yielded,
                    }
                )
                restore_at, pending_cut = time.monotonic() + length, None
            waits = [t for t in (pending_cut, restore_at) if t is not None]
            timeout = min([0.5, *(t - time.monotonic() for t in waits)])
            try:
                message = lines.next(timeout)
            except EOFError:
                raise RuntimeError(f"the gateway process ended without a result (exit {gateway.wait()})") from None
            if message is None:
                continue
            if message["event"] == "progress":
                yielded = int(message["yielded"])
                last = run.cuts[-1] if run.cuts else None
                if last and "restored_t" in last and "progress_after_restore_s" not in last:
                    if yielded > last["yielded_at_restore"]:
                        last["progress_after_restore_s"] = float(message["t"]) - last["restored_t"]
                if plan and pending_cut is None and restore_at is None and yielded >= plan[0][0] * study.size:
                    pending_cut = time.monotonic() + self.rng.uniform(0.0, 1.0)
            elif message["event"] == "done":
                if restore_at is not None:
                    self.link.restore()
                    run.cuts[-1].update(restored_t=time.monotonic(), yielded_at_restore=yielded)
                return message

    @staticmethod
    def _charge_cuts(run: UploadRun, done: dict[str, Any]) -> None:
        """Charge each re-send (and each stream restarted on an object already begun) to the last
        cut that started before it."""
        for cut in run.cuts:
            cut.update(resent_bytes=0, restarted_streams=0, resumed_mid_object=0)

        def owner(t: float) -> dict[str, Any] | None:
            before = [cut for cut in run.cuts if cut["cut_t"] <= t]
            return before[-1] if before else None

        for t, size in done["resends"]:
            cut = owner(t)
            if cut is not None:
                cut["resent_bytes"] += size
        for t, _sha, offset, seen in done["streams"]:
            cut = owner(t)
            if cut is not None and seen:
                cut["restarted_streams"] += 1
                cut["resumed_mid_object"] += offset > 0
        ends = [cut["cut_t"] for cut in run.cuts[1:]] + [float("inf")]
        for cut, end in zip(run.cuts, ends):
            failed = [a for a in run.attempts if cut["cut_t"] <= a["t"] < end and a["outcome"] != "committed"]
            cut["failed_attempts"] = len(failed)
            cut["until_restore_s"] = cut.get("restored_t", cut["cut_t"]) - cut["cut_t"]

    # ---- the plan ----------------------------------------------------------------------------
    def run_all(self) -> None:
        plan, rate = self.plan, self.link.spec.rate_bps
        self.link.setup()
        self.check_link()
        self.start_hub()
        cap = 1.2 * self._study_bytes_estimate(plan.slices) * 8 / (TARGET_SHARE * rate)
        goodput: dict[str, UploadRun | None] = {}
        for cc in ("cubic", "bbr"):
            goodput[cc] = self.guarded(
                f"goodput {cc}",
                lambda cc=cc: self.upload(
                    f"goodput {cc}", cc=cc, slices=plan.slices, cap_s=cap, parallel=plan.parallel
                ),
            )
        missed = [cc for cc, r in goodput.items() if r is not None and r.goodput_mbps * 1e6 < TARGET_SHARE * rate]
        if plan.what_if:
            variants = [("cubic", 8, 1), ("cubic", 4, 4), ("cubic", 8, 8)] if "cubic" in missed else []
            variants += [("bbr", 8, 1), ("bbr", 4, 4)] if "bbr" in missed else []
            for cc, parallel, channels in variants:
                name = f"what-if {cc} {parallel} streams {channels} connections"
                self.guarded(
                    name,
                    lambda cc=cc, p=parallel, c=channels, n=name: self.upload(
                        n, cc=cc, slices=plan.probe_slices, cap_s=plan.probe_cap_s, parallel=p, channels=c
                    ),
                )
        reference = goodput.get(plan.cut_cc)
        base = reference.seconds if reference is not None and reference.committed else cap
        if plan.cuts:
            cuts = self._cut_plan(plan.cuts)
            cut_cap = base + sum(3 * length + 30 for _, length in cuts) + 60
            self.guarded(
                "cuts",
                lambda: self.upload(
                    f"cuts {plan.cut_cc}",
                    cc=plan.cut_cc,
                    slices=plan.slices,
                    cap_s=cut_cap,
                    parallel=plan.parallel,
                    cut_plan=cuts,
                ),
            )
        if plan.what_if and plan.long_cut_s:
            # the same long cut with messages of CHUNK_SIZE / streams: what bounds the bytes lost per cut?
            chunk = CHUNK_SIZE // plan.parallel
            cut = [(0.5 + self.rng.uniform(-0.2, 0.2), plan.long_cut_s)]
            self.guarded(
                "what-if cut",
                lambda: self.upload(
                    f"what-if cut {chunk // 1024} KiB messages",
                    cc=plan.cut_cc,
                    slices=plan.probe_slices,
                    cap_s=base + 3 * plan.long_cut_s + 90,
                    parallel=plan.parallel,
                    cut_plan=cut,
                    chunk_size=chunk,
                ),
            )

    @staticmethod
    def _study_bytes_estimate(slices: int) -> float:
        return slices * (512 * 512 * 2 + 1200)

    def guarded(self, name: str, measure: Any) -> UploadRun | None:
        try:
            return measure()  # type: ignore[no-any-return]
        except Exception as exc:  # noqa: BLE001 - reported in the table; the other figures still count
            self.console.print_exception(max_frames=5)
            self.failed = True
            failure = UploadRun(name, "", 0, 0, 0, 0, 0.0, error=f"{type(exc).__name__}: {exc}"[:300])
            self.runs.append(failure)
            return None


# --- figures -------------------------------------------------------------------------------------


def _loss_text(link: dict[str, Any]) -> str:
    parts = []
    for direction in ("up", "down"):
        s = link.get(direction) or {}
        offered = max(1, s.get("frames_in", 0) - s.get("dropped_cut", 0))
        parts.append(
            f"{direction} {s.get('lost_random', 0) / offered * 100:.2f} % lost of {offered} frames"
            + (f", {s['dropped_queue']} queue drops" if s.get("dropped_queue") else "")
        )
    if link.get("kernel_drops"):
        parts.append(f"{link['kernel_drops']} frames dropped before the relay read them")
    return "; ".join(parts)


def figures_of(bench: Bench) -> list[Any]:
    from bench._report import Figure

    rate = bench.link.spec.rate_bps / 1e6
    target = TARGET_SHARE * rate
    figures = []
    check = bench.link_check
    if "rtt" in check:
        rtt = check["rtt"]["rtt_ms"]
        ordered = sorted(rtt)
        detail = (
            f"median {check['rtt']['median_ms']:.1f} ms, min {ordered[0]:.1f}, max {ordered[-1]:.1f} ms over "
            f"{len(rtt)} TCP handshakes (a lost SYN adds 1 s)"
        )
        figures.append(Figure("round trip (link check)", "emulated link", 1, check["rtt"]["median_ms"], "ms", detail))
    for cc, raw in check.get("raw", {}).items():
        detail = (
            f"{raw['mbps']:.2f} Mbit/s = {raw['mbps'] / rate * 100:.0f} % of {rate:g} Mbit/s "
            f"({raw['bytes'] / MB:.1f} MB in {raw['seconds']:.1f} s); {_loss_text(raw['link'])}"
        )
        figures.append(Figure(f"bare TCP, 1 connection, {cc}", "emulated link", 1, raw["mbps"], "Mbit/s", detail))
    for run in bench.runs:
        if not run.cc:
            failure = Figure(f"{run.name} (FAILED)", "gateway -> hub", 0, float("nan"), "", run.error)
            failure.note = "measurement failed"
            figures.append(failure)
            continue
        conns = f"{run.channels} TCP connection{'s' if run.channels > 1 else ''}"
        what = f"{run.cc}, {run.parallel} streams, {conns}"
        if run.chunk_size != MESSAGE_BYTES:
            what += f", {run.chunk_size // 1024} KiB messages"
        if run.cuts:
            plain = [r for r in bench.runs if r.name == f"goodput {run.cc}" and r.committed]
            rate_s = plain[0].seconds / plain[0].study_bytes if plain else None
            figures.extend(_cut_figures(run, what, rate_s))
            continue
        share = run.goodput_mbps / rate * 100
        if run.committed:
            head = f"{run.study_bytes / MB:.1f} MB committed in {run.seconds:.1f} s"
        else:
            stored = f"{run.stored_bytes / MB:.1f} of {run.study_bytes / MB:.1f} MB"
            head = f"NOT committed: {stored} stored in {run.seconds:.1f} s"
        detail = (
            f"{run.goodput_mbps:.2f} Mbit/s = {share:.0f} % of {rate:g} Mbit/s; {head}; "
            f"{run.verified or run.error}; re-sent {run.resent} B; {_loss_text(run.link)}; gateway CPU "
            f"{run.gateway_cpu_s / max(run.seconds, 1e-9):.2f} cores"
        )
        is_main = run.name.startswith("goodput")
        label = f"goodput 100 MB study, {what}" if is_main else f"what-if ({run.study_bytes / MB:.0f} MB), {what}"
        figure = Figure(label, "gateway -> hub", 1, run.goodput_mbps, "Mbit/s", detail, target if is_main else None)
        figure.cpu_cores = run.cpu_cores
        if is_main and run.channels == 1 and run.cc == "cubic":
            figure.note = "Linux's default congestion control"
        figures.append(figure)
    return figures


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"+{value:.1f} s"


def _cut_figures(run: UploadRun, what: str, seconds_per_byte: float | None) -> list[Any]:
    """The worst cut's re-sent bytes (against one chunk) and the upload's time; with the uncut run's
    pace (``seconds_per_byte``), the time the cuts cost beyond their own length."""
    from bench._report import Figure

    per_cut = [cut.get("resent_bytes", 0) for cut in run.cuts]
    worst = max(per_cut) if per_cut else 0
    cut_text = "; ".join(
        f"#{cut['index'] + 1} at {cut['at_share'] * 100:.0f} % for {cut.get('until_restore_s', cut['seconds']):.1f} s: "
        f"{cut.get('resent_bytes', 0)} B ({cut.get('resent_bytes', 0) / MIB:.2f} chunks), "
        f"{cut.get('restarted_streams', 0)} streams restarted ({cut.get('resumed_mid_object', 0)} mid-object), "
        f"{cut.get('failed_attempts', 0)} failed attempts; after the restore the first data frame crossed at "
        f"{_seconds(cut.get('first_data_after_restore_s'))}, the gateway yielded new bytes at "
        f"{_seconds(cut.get('progress_after_restore_s'))}"
        for cut in run.cuts
    )
    detail = (
        f"worst cut {worst} B = {worst / MIB:.2f} chunks of 1 MiB; total re-sent {run.resent} B "
        f"(yielded {run.yielded} - study {run.study_bytes} = {run.yielded - run.study_bytes} B); {cut_text}. "
        "Bytes yielded to a stream that was then cut count as re-sent (upper bound)"
    )
    label = "what-if: re-sent per cut" if run.name.startswith("what-if") else "re-sent per cut"
    name = f"{label} ({len(run.cuts)} cut{'s' if len(run.cuts) > 1 else ''}), {what}"
    resent = Figure(name, "gateway -> hub", 1, worst / MIB, "MiB", detail, 1.0, False)
    resent.note = "worst cut"
    cut_total = sum(cut.get("until_restore_s", 0.0) for cut in run.cuts)
    head = "committed" if run.committed else "NOT committed"
    lost = ""
    if seconds_per_byte is not None and run.committed:
        extra = run.seconds - seconds_per_byte * run.study_bytes - cut_total
        lost = f"; beyond the cuts themselves the upload took {extra:.0f} s longer than the uncut run's pace"
    detail = (
        f"{run.study_bytes / MB:.1f} MB {head} in {run.seconds:.1f} s with {cut_total:.0f} s of cuts "
        f"({run.goodput_mbps:.2f} Mbit/s overall){lost}; {run.verified or run.error}; {_loss_text(run.link)}"
    )
    label = "what-if: upload with cuts" if run.name.startswith("what-if") else "upload with cuts"
    total = Figure(f"{label}, {what}", "gateway -> hub", 1, run.seconds, "s", detail)
    total.cpu_cores = run.cpu_cores
    return [resent, total]


# --- main ----------------------------------------------------------------------------------------


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # so that the namespaces and processes are cleaned up on SIGTERM too


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_link", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (~20 MB, 1 cut, no what-if runs)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="save the results here")
    parser.add_argument("--cuts", type=int, default=None, help="link cuts during the cut run (0: no cut run)")
    parser.add_argument("--cut-cc", choices=("cubic", "bbr"), default=None, help="congestion control of the cut run")
    parser.add_argument("--long-cut", type=float, default=None, help="length of the one long cut, s (0: none)")
    parser.add_argument("--no-what-if", action="store_true", help="skip the what-if runs (more streams, channels)")
    parser.add_argument("--seed", type=int, default=20261, help="seed of the data, loss and cut moments")
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_gateway"]:
        return gateway_process(argv[1:])
    if argv[:1] == ["_hub"]:
        return hub_process(argv[1:])
    args = _parser().parse_args(argv)
    from bench import _netns

    problems = _netns.missing_requirements()
    if problems:
        print("bench.gateway_link cannot run here:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    from rich.console import Console

    from bench._report import OtherLoad, machine, print_table, save_json
    from teleread.gateway.uploader import client as upload

    console = Console()
    plan = QUICK_PLAN if args.quick else FULL_PLAN
    if args.cuts is not None:
        plan = replace(plan, cuts=args.cuts)
    if args.cut_cc:
        plan = replace(plan, cut_cc=args.cut_cc)
    if args.long_cut is not None:
        plan = replace(plan, long_cut_s=args.long_cut)
    if args.no_what_if:
        plan = replace(plan, what_if=False)
    info = machine()
    info["upload_parallel"] = plan.parallel
    info["chunk_size"] = upload.CHUNK_SIZE
    # new network namespaces start with this machine's default (Linux's own default is cubic)
    info["default_congestion_control"] = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    with tempfile.TemporaryDirectory(prefix="teleread-link-", dir=args.workdir) as tmp:
        bench = Bench(plan, Path(tmp), seed=args.seed, console=console)
        try:
            with OtherLoad(bench.pids) as other:
                bench.run_all()
        finally:
            bench.close()
            signal.signal(signal.SIGTERM, previous)
    info["load_after"], info["other_cores"] = os.getloadavg()[0], other.cores
    info["link"] = bench.link.spec.text + " (user-space relay, netem's model)"
    figures = figures_of(bench)
    console.print(f"[bold]gateway upload over an emulated rural link[/]: {info['link']}")
    print_table(figures, info, console)
    console.print(f"whole run {time.perf_counter() - started:.0f} s; seed {args.seed}")
    if args.json:
        extra = {
            "benchmark": "gateway_link",
            "quick": args.quick,
            "plan": asdict(plan),
            "seed": args.seed,
            "link_check": bench.link_check,
            "runs": [asdict(run) | {"goodput_mbps": run.goodput_mbps} for run in bench.runs],
        }
        save_json(args.json, figures=figures, info=info, extra=extra)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
