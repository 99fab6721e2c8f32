"""C-STORE ingest at the gateway's DICOM receiver, beside Orthanc, with dcmtk's storescu.

Run as root from the repository root: ``.venv/bin/python -m bench.gateway_ingest [--quick] [--json PATH]``.
It generates the spine benchmark's synthetic CT slices and DICOM ECGs (``bench/_data.py``) in a
temporary folder, moves itself into a private network namespace that has only loopback (Orthanc
1.10 listens on every interface), and for each dataset (CT, ECG) x associations (1, 4) x repeat
sends the whole set with ``storescu`` (``TCP_NODELAY=1``; for 4 associations, 4 storescu processes
on a quarter of the files each) to a fresh target: the gateway's real receiver
(``StoreScp(Outbox(...))`` in its own process, ``python -m bench.gateway_ingest _receiver``) and
Debian's Orthanc with a temporary configuration, alternating which goes first. It checks that every
storescu succeeded, that every instance was stored (rows of the outbox's ``objects`` table;
``CountInstances`` of Orthanc's ``/statistics``) and that both kept the sent transfer syntax, then
prints the median instances/s and MB/s (10^6 B/s) of each combination. The gateway's target is
Orthanc's median in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from rich.console import Console

from bench import _data
from bench._report import Figure, OtherLoad, machine, print_table, save_json

MB = 1e6
GATEWAY_AE, ORTHANC_AE, CALLING_AE = "TELEREAD_GW", "ORTHANC", "BENCH"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
TARGETS = ("gateway", "orthanc")
CLONE_NEWNET = 0x40000000
console = Console(soft_wrap=True)


@dataclass(frozen=True)
class Plan:
    ct_slices: int = 200
    ecgs: int = 500
    repeats: int = 3
    associations: tuple[int, ...] = (1, 4)
    datasets: tuple[str, ...] = ("CT", "ECG")
    targets: tuple[str, ...] = TARGETS
    receivers: int = 1  # the gateway's receiver processes (settings: gateway.receivers)


FULL_PLAN = Plan()
QUICK_PLAN = Plan(ct_slices=24, ecgs=40, repeats=1)


@dataclass
class Run:
    """One send of a whole dataset to one fresh target."""

    target: str
    dataset: str
    associations: int
    repeat: int
    instances: int
    bytes: int
    seconds: float
    stored: int
    transfer_syntax: str
    target_cpu_s: float
    storescu_cpu_s: float
    ok: bool
    error: str = ""

    @property
    def rate(self) -> float:
        return self.instances / self.seconds

    @property
    def mbps(self) -> float:
        return self.bytes / self.seconds / MB


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    failed: bool = False


# --------------------------------------------------------------------------- preflight, namespace


def preflight() -> tuple[str, str]:
    """The tools the benchmark needs, or a clear refusal."""
    problems = []
    if os.geteuid() != 0:
        problems.append("run it as root: it needs a private network namespace (Orthanc 1.10 listens on all interfaces)")
    storescu = shutil.which("storescu")
    if not (storescu and shutil.which("echoscu")):
        problems.append("dcmtk's storescu/echoscu are missing: apt-get install -y dcmtk")
    orthanc = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if not orthanc:
        problems.append(
            "Orthanc is missing: apt-get install -y --no-install-recommends orthanc "
            "(then stop and disable the packaged service: service orthanc stop; systemctl disable orthanc)"
        )
    if not shutil.which("ip"):
        problems.append("the ip command is missing: apt-get install -y iproute2")
    if problems:
        raise SystemExit("refusing to run:\n  - " + "\n  - ".join(problems))
    return str(storescu), str(orthanc)


def enter_private_network() -> None:
    """Move this process (and every child it starts) into a new network namespace with only
    loopback; the kernel removes the namespace when the last of them exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise SystemExit(f"unshare(CLONE_NEWNET) failed: {os.strerror(err)}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = [line.split(":")[1].strip() for line in links.splitlines() if line.strip()]
    if names != ["lo"]:
        raise SystemExit(f"the private network namespace has more than loopback: {names}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo(ae: str, port: int) -> bool:
    done = subprocess.run(
        ["echoscu", "-aet", CALLING_AE, "-aec", ae, "-to", "2", "127.0.0.1", str(port)],
        capture_output=True,
        env={"TCP_NODELAY": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    return done.returncode == 0


def wait_until(check: Callable[[], bool], *, timeout: float, what: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} while starting")
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")


# --------------------------------------------------------------------------- targets


class GatewayTarget:
    """The gateway's receiver in its own process: ``StoreScp(Outbox(root), ScpConfig(...))``."""

    name, ae = "gateway", GATEWAY_AE

    def __init__(self, work: Path, *, profile: Path | None = None, receivers: int = 1) -> None:
        self.root = work / "outbox"
        self.log = (work / "receiver.log").open("wb")
        port = free_port()
        cmd = [sys.executable, "-m", "bench.gateway_ingest", "_receiver", "--root", str(self.root), "--port", str(port)]
        cmd += ["--receivers", str(receivers)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().split()
        if line[:1] != ["READY"]:
            self.stop()
            raise RuntimeError(f"the receiver did not start (see {work / 'receiver.log'})")
        self.port = int(line[1])
        wait_until(lambda: echo(self.ae, self.port), timeout=20, what="the gateway receiver", proc=self.proc)
        self.spy: subprocess.Popen[bytes] | None = None
        if profile is not None:
            spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            self.spy = subprocess.Popen(
                [spy, "record", "--pid", str(self.proc.pid), "--rate", "250", "--threads", "--idle",
                 "--format", "raw", "--output", str(profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1.0)  # attached before the clock starts

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stored(self) -> int:
        db = sqlite3.connect(f"file:{self.root / 'outbox.db'}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM objects").fetchone()[0])
        finally:
            db.close()

    def transfer_syntax(self) -> str:
        import pydicom

        first = next((self.root / "objects").iterdir())
        return str(pydicom.dcmread(first, stop_before_pixels=True).file_meta.TransferSyntaxUID)

    def stop(self) -> None:
        if getattr(self, "spy", None) is not None and self.spy is not None and self.spy.poll() is None:
            self.spy.send_signal(signal.SIGINT)  # py-spy writes its profile on SIGINT
            try:
                self.spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.spy.kill()
                self.spy.wait()
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the receiver stops its server and closes the outbox
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class OrthancTarget:
    """Debian's Orthanc with a temporary configuration (no plugins, loopback only through the namespace)."""

    name, ae = "orthanc", ORTHANC_AE

    def __init__(self, work: Path, *, binary: str) -> None:
        self.port, self.http = free_port(), free_port()
        while self.http == self.port:
            self.http = free_port()
        config = {
            "Name": "bench",
            "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"),
            "DicomAet": ORTHANC_AE,
            "DicomPort": self.port,
            "HttpPort": self.http,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "Plugins": [],
        }  # everything else (SyncStorageArea true, MaximumPduLength 16384, DicomThreadsCount 4) at 1.10's defaults
        path = work / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = (work / "orthanc.log").open("wb")
        # dcmtk (Orthanc's DICOM layer) leaves Nagle's algorithm on unless TCP_NODELAY=1: without it
        # every C-STORE response waits for the client's delayed ACK (~20 inst/s); the gateway sets
        # TCP_NODELAY on its sockets itself
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([binary, str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_until(lambda: echo(self.ae, self.port), timeout=30, what="Orthanc", proc=self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as answer:
            body = answer.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body.decode()

    def stored(self) -> int:
        return int(self._get("/statistics")["CountInstances"])

    def transfer_syntax(self) -> str:
        first = self._get("/instances?since=0&limit=1")[0]
        return str(self._get(f"/instances/{first}/metadata/TransferSyntax")).strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- sending


def send(storescu: str, ae: str, port: int, parts: list[list[Path]], log: Path) -> tuple[float, float, list[str]]:
    """Run one storescu per part at once; return wall seconds, their CPU seconds, their errors."""
    env = {"TCP_NODELAY": "1", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    procs = []
    with log.open("wb") as out:
        started = time.perf_counter()
        for files in parts:
            # -xe: propose explicit VR little endian first (the files' syntax); -R: only the SOP
            # classes of the files; a failed store ends storescu with an error status
            cmd = [storescu, "-aet", CALLING_AE, "-aec", ae, "-xe", "-R", "127.0.0.1", str(port), *map(str, files)]
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=out, env=env))
        cpu, errors = 0.0, []
        for proc in procs:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            cpu += usage.ru_utime + usage.ru_stime
            if proc.returncode != 0:
                errors.append(f"storescu exited with status {proc.returncode}")
        seconds = time.perf_counter() - started
    return seconds, cpu, errors


def cpu_seconds(pid: int) -> float:
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(
    target_name: str,
    dataset: str,
    files: list[Path],
    associations: int,
    repeat: int,
    *,
    work: Path,
    storescu: str,
    orthanc: str,
    profile_dir: Path | None,
    receivers: int = 1,
) -> Run:
    folder = work / f"{target_name}-{dataset}-{associations}-{repeat}"
    folder.mkdir()
    os.sync()  # the previous run's writes do not spill into this one
    profile = None
    if profile_dir is not None and target_name == "gateway":
        profile = profile_dir / f"receiver-{dataset}-{associations}assoc-{repeat}.txt"
    target: GatewayTarget | OrthancTarget = (
        GatewayTarget(folder, profile=profile, receivers=receivers)
        if target_name == "gateway"
        else OrthancTarget(folder, binary=orthanc)
    )
    size = sum(f.stat().st_size for f in files)
    try:
        before = cpu_seconds(target.pid)
        parts = [files[i::associations] for i in range(associations)]
        seconds, client_cpu, errors = send(storescu, target.ae, target.port, parts, folder / "storescu.log")
        used = cpu_seconds(target.pid) - before
        stored = target.stored()
        syntax = target.transfer_syntax() if stored else ""
    finally:
        target.stop()
    if stored != len(files):
        errors.append(f"{stored} of {len(files)} instances stored")
    if syntax != EXPLICIT_LE:
        errors.append(f"stored with transfer syntax {syntax or '?'}")
    run = Run(
        target=target_name,
        dataset=dataset,
        associations=associations,
        repeat=repeat,
        instances=len(files),
        bytes=size,
        seconds=seconds,
        stored=stored,
        transfer_syntax=syntax,
        target_cpu_s=used,
        storescu_cpu_s=client_cpu,
        ok=not errors,
        error="; ".join(errors),
    )
    shutil.rmtree(folder, ignore_errors=True)  # keep the disk as it was for the next run
    return run


def run_all(plan: Plan, work: Path, *, storescu: str, orthanc: str, profile_dir: Path | None) -> Results:
    started = time.perf_counter()
    datasets: dict[str, list[Path]] = {}
    if "CT" in plan.datasets:
        rng = np.random.default_rng(20261)
        datasets["CT"] = sorted(_data.write_ct_study(work / "data" / "ct", slices=plan.ct_slices, rng=rng).iterdir())
    if "ECG" in plan.datasets:
        datasets["ECG"] = _data.write_ecgs(work / "data" / "ecg", count=plan.ecgs)
    sizes = ", ".join(f"{k} {len(v)} files ({_data.folder_bytes(v) / MB:.1f} MB)" for k, v in datasets.items())
    console.print(f"data: {sizes}, generated in {time.perf_counter() - started:.0f} s")
    results = Results()
    for repeat in range(plan.repeats):
        for dataset, files in datasets.items():
            for associations in plan.associations:
                order = plan.targets if (repeat + associations + len(dataset)) % 2 == 0 else plan.targets[::-1]
                for name in order:
                    try:
                        run = measure(
                            name, dataset, files, associations, repeat, work=work, storescu=storescu,
                            orthanc=orthanc, profile_dir=profile_dir, receivers=plan.receivers,
                        )  # fmt: skip
                    except Exception as exc:  # noqa: BLE001 - one failed measurement is a FAILED row
                        run = Run(
                            name,
                            dataset,
                            associations,
                            repeat,
                            len(files),
                            0,
                            float("nan"),
                            0,
                            "",
                            0,
                            0,
                            False,
                            str(exc),
                        )
                    results.runs.append(run)
                    results.failed |= not run.ok
                    rate = f"{run.rate:6.1f} inst/s {run.mbps:6.1f} MB/s" if run.ok else f"FAILED: {run.error}"
                    console.print(
                        f"  repeat {repeat + 1} {dataset:3} {associations} assoc {name:8} {rate}"
                        f"  (target {run.target_cpu_s / run.seconds if run.ok else 0:.2f} cores,"
                        f" storescu {run.storescu_cpu_s / run.seconds if run.ok else 0:.2f} cores)"
                    )
    return results


def figures_of(plan: Plan, results: Results) -> list[Figure]:
    figures = []
    for dataset in plan.datasets:
        for associations in plan.associations:
            medians: dict[str, float] = {}
            for name in [t for t in ("orthanc", "gateway") if t in plan.targets]:
                runs = [
                    r for r in results.runs if (r.target, r.dataset, r.associations) == (name, dataset, associations)
                ]
                good = [r for r in runs if r.ok]
                label = f"{dataset} C-STORE ingest"
                if len(good) != len(runs) or not good:
                    figures.append(
                        Figure(
                            label,
                            name,
                            associations,
                            float("nan"),
                            "inst/s",
                            "FAILED: " + "; ".join(r.error for r in runs if not r.ok),
                        )
                    )
                    continue
                rate = statistics.median(r.rate for r in good)
                mbps = statistics.median(r.mbps for r in good)
                medians[name] = rate
                seconds = statistics.median(r.seconds for r in good)
                detail = (
                    f"{rate:.0f} inst/s, {mbps:.1f} MB/s (median of {len(good)}: "
                    + ", ".join(f"{r.rate:.0f}" for r in good)
                    + f"; {good[0].instances} in {seconds:.2f} s)"
                )
                cores = {
                    name: statistics.median(r.target_cpu_s / r.seconds for r in good),
                    "storescu": statistics.median(r.storescu_cpu_s / r.seconds for r in good),
                }
                target = round(medians["orthanc"], 1) if name == "gateway" and "orthanc" in medians else None
                note = (
                    "fsync file + dir, SQLite WAL synchronous=FULL per instance"
                    if name == "gateway"
                    else "1.10.1 defaults: SyncStorageArea, SQLite index"
                )
                figures.append(
                    Figure(label, name, associations, rate, "inst/s", detail, target=target, note=note, cpu_cores=cores)
                )
    return figures


# --------------------------------------------------------------------------- the receiver process


def receiver(argv: list[str]) -> int:
    """The gateway's receiver as the product starts it; prints ``READY <port>``, stops at stdin EOF."""
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_ingest _receiver")
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--receivers", type=int, default=1)
    args = parser.parse_args(argv)
    from teleread.gateway.clinic.outbox import Outbox
    from teleread.gateway.clinic.scp import ScpConfig, StoreScp
    from teleread.gateway.clinic.scp_pool import ReceiverPool
    from teleread.logs import configure_logging

    configure_logging("INFO")  # as `teleread gateway run` does (JSON to stderr)
    box = Outbox(args.root)
    config = ScpConfig(ae_title=GATEWAY_AE, host="127.0.0.1", port=args.port)
    scp: StoreScp | ReceiverPool = (
        ReceiverPool(args.root, config, args.receivers) if args.receivers > 1 else StoreScp(box, config)
    ).start()
    print(f"READY {scp.port}", flush=True)
    try:
        sys.stdin.buffer.read()
    finally:
        scp.stop()
        box.close()
    return 0


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_ingest", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run (24 CT slices, 40 ECGs, 1 repeat)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="save the results here")
    parser.add_argument("--ct", type=int, default=None, help=f"CT slices (default {FULL_PLAN.ct_slices})")
    parser.add_argument("--ecg", type=int, default=None, help=f"ECGs (default {FULL_PLAN.ecgs})")
    parser.add_argument("--repeats", type=int, default=None, help=f"runs per combination (default {FULL_PLAN.repeats})")
    parser.add_argument("--associations", default=None, help="comma-separated association counts (default 1,4)")
    parser.add_argument("--datasets", default="CT,ECG", help="comma-separated subset of CT,ECG")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of gateway,orthanc")
    parser.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy profiles of the receiver here"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary folder")
    parser.add_argument("--receivers", type=int, default=1, help="the gateway's receiver processes (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_receiver"]:
        return receiver(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    datasets = tuple(d for d in args.datasets.split(",") if d)
    targets = tuple(t for t in args.targets.split(",") if t)
    if not datasets or set(datasets) - {"CT", "ECG"} or not targets or set(targets) - set(TARGETS):
        parser.error("--datasets takes a subset of CT,ECG and --targets a subset of gateway,orthanc")
    base = QUICK_PLAN if args.quick else FULL_PLAN
    plan = Plan(
        ct_slices=args.ct or base.ct_slices,
        ecgs=args.ecg or base.ecgs,
        repeats=args.repeats or base.repeats,
        associations=tuple(int(n) for n in args.associations.split(",")) if args.associations else base.associations,
        datasets=datasets,
        targets=targets,
        receivers=args.receivers,
    )
    storescu, orthanc = preflight()
    enter_private_network()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    info = machine()
    info["upload_parallel"] = "n/a (storescu associations)"
    info["orthanc"] = subprocess.run([orthanc, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    info["storescu"] = subprocess.run([storescu, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="teleread-cstore-", dir=args.workdir) as tmp:
        with OtherLoad(lambda: {os.getpid(), *_children()}) as other:
            results = run_all(plan, Path(tmp), storescu=storescu, orthanc=orthanc, profile_dir=args.profile)
    info["load_after"], info["other_cores"] = os.getloadavg()[0], other.cores
    figures = figures_of(plan, results)
    print_table(figures, info, console)
    console.print(f"{info['orthanc']}; {info['storescu']}; whole run {time.perf_counter() - started:.0f} s")
    if args.json:
        extra = {
            "benchmark": "gateway_ingest",
            "quick": args.quick,
            "plan": asdict(plan),
            "runs": [asdict(r) for r in results.runs],
        }
        save_json(args.json, figures=figures, info=info, extra=extra)
    return 1 if results.failed else 0


def _children() -> set[int]:
    import psutil

    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


if __name__ == "__main__":
    raise SystemExit(main())
