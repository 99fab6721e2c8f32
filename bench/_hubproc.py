"""Server processes of the spine benchmark: the hub and the raw gRPC sink.

Run as ``python -m bench._hubproc hub --settings-json FILE`` it builds the hub from the settings in
FILE (a private file: it may hold S3 keys), registers the site "bench-clinic" (lead hospital
"bench-hosp"), its upload identity and reader identities, prints one JSON line (port, tokens, site
id) and serves until SIGTERM. ``python -m bench._hubproc sink`` serves the raw ceiling instead: the
Ingest ``Upload`` method with the hub's server options, discarding the bytes. The benchmark side
uses :func:`start_hub` / :func:`start_sink` (one separate process each, so the hub's memory and
CPU are its own and measurable).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SITE = "bench-clinic"
HOSPITAL = "bench-hosp"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


# --- inside the server process -------------------------------------------------------------------


def _install_thread_profiler() -> list[cProfile.Profile]:
    """A CPU-time (``thread_time``) cProfile in every thread started from now on."""
    profiles: list[cProfile.Profile] = []

    def start(_frame: Any, _event: str, _arg: Any) -> None:
        profile = cProfile.Profile(time.thread_time)
        profiles.append(profile)
        profile.enable()

    threading.setprofile(start)
    return profiles


def _dump_profiles(profiles: list[cProfile.Profile], path: Path) -> None:
    import pstats

    stats: pstats.Stats | None = None
    for profile in profiles:
        profile.disable()
        profile.create_stats()
        if not getattr(profile, "stats", None):  # a thread that ran no Python code: nothing to add
            continue
        if stats is None:
            stats = pstats.Stats(profile)
        else:
            stats.add(profile)
    if stats is not None:
        stats.dump_stats(str(path))


def _register(engine: Any, *, readers: int) -> tuple[int, dict[str, str]]:
    from teleread.auth import Role, add_principal, add_site

    site_id = add_site(engine, code=SITE, name="Benchmark clinic", lead_hospital=HOSPITAL)
    tokens = {
        "site": add_principal(engine, name="bench-site", role=Role.SITE, site_code=SITE),
        "radio": add_principal(engine, name="bench-radio", role=Role.RADIOLOGIST, hospital=HOSPITAL),
    }
    for number in range(readers):
        tokens[f"cardio-{number}"] = add_principal(
            engine, name=f"bench-cardio-{number}", role=Role.CARDIOLOGIST, hospital=HOSPITAL
        )
    return site_id, tokens


def _wait_for_sigterm() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def serve_hub(args: argparse.Namespace) -> None:
    from teleread.app.hub import build_hub, create_dicomweb, create_server
    from teleread.logs import configure_logging
    from teleread.settings import Settings

    raw = json.loads(Path(args.settings_json).read_text())
    settings = Settings.model_validate(raw)
    configure_logging(settings.log_level)
    profiles = _install_thread_profiler() if args.profile else []
    hub = build_hub(settings)
    site_id, tokens = _register(hub.engine, readers=args.readers)
    server, port = create_server(hub, host=HOST, port=0)
    server.start()
    web = create_dicomweb(hub) if "http" in raw else None  # the HTTP port only when the settings ask for it
    if web is not None:
        web.start()
    info = {"port": port, "site_id": site_id, "tokens": tokens, "http_port": web.port if web else None}
    print(json.dumps(info), flush=True)
    _wait_for_sigterm()
    if web is not None:
        web.stop()
    server.stop(grace=2).wait()
    hub.close()
    if args.profile:
        threading.setprofile(None)  # type: ignore[arg-type]
        _dump_profiles(profiles, Path(args.profile))


def serve_sink(_args: argparse.Namespace) -> None:
    """The raw client-streaming ceiling: the hub's server options, Upload discards its bytes."""
    import grpc

    from teleread.app.hub import MAX_MESSAGE
    from teleread.settings import GrpcSettings
    from teleread.v1 import ingest_pb2, ingest_pb2_grpc

    class Sink(ingest_pb2_grpc.IngestServicer):
        def Upload(
            self, request_iterator: Iterator[ingest_pb2.UploadChunk], context: grpc.ServicerContext
        ) -> ingest_pb2.UploadStatus:
            received = sum(len(chunk.data) for chunk in request_iterator)
            return ingest_pb2.UploadStatus(
                committed_offset=received, size=received, state=ingest_pb2.UPLOAD_STATE_STORED
            )

    workers = GrpcSettings().max_workers
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ],
        maximum_concurrent_rpcs=workers * 4,
    )
    ingest_pb2_grpc.add_IngestServicer_to_server(Sink(), server)
    port = server.add_insecure_port(f"{HOST}:0")
    server.start()
    print(json.dumps({"port": port, "tokens": {}}), flush=True)
    _wait_for_sigterm()
    server.stop(grace=1).wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._hubproc")
    sub = parser.add_subparsers(dest="what", required=True)
    hub = sub.add_parser("hub", help="serve the hub")
    hub.add_argument("--settings-json", required=True, help="file holding the Settings as JSON")
    hub.add_argument("--readers", type=int, default=8, help="cardiologist identities to create")
    hub.add_argument("--profile", default="", help="write merged per-thread CPU profiles here")
    hub.set_defaults(func=serve_hub)
    sub.add_parser("sink", help="serve the raw gRPC ceiling").set_defaults(func=serve_sink)
    args = parser.parse_args(argv)
    args.func(args)


# --- on the benchmark side -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _read_line(stream: IO[bytes], process: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server process exited early: {_log_tail(log_path)}")
        ready, _, _ = select.select([stream], [], [], 0.2)
        if ready:
            return stream.readline().decode()
    raise RuntimeError(f"server process did not start in {START_TIMEOUT_S:.0f} s: {_log_tail(log_path)}")


def _log_tail(log_path: Path, lines: int = 4) -> str:
    """The last lines the server wrote (its own JSON logs or a traceback), for the failure row."""
    try:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        tail = []
    return " / ".join(tail) or "(its log is empty)"


@dataclass
class ServerProcess:
    """A running hub or sink process and what it printed when ready."""

    process: subprocess.Popen[bytes]
    info: dict[str, Any]
    log_path: Path

    @property
    def address(self) -> str:
        return f"{HOST}:{self.info['port']}"

    @property
    def tokens(self) -> dict[str, str]:
        return dict(self.info["tokens"])

    def tree(self) -> list[int]:
        """The process and its children (the hub's CPU worker processes)."""
        return process_tree(self.process.pid)

    @staticmethod
    def status_kib(pid: int, name: str) -> int:
        """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in KiB; 0 if the process is gone."""
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return 0
        return next((int(line.split()[1]) for line in lines if line.startswith(name + ":")), 0)

    def stop(self) -> None:
        """SIGTERM by PID (kill if it lingers) and wait for the process."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)
        if self.process.stdout is not None:
            self.process.stdout.close()


def _spawn(args: list[str], *, log_path: Path) -> ServerProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEREAD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench._hubproc", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    try:
        info = json.loads(_read_line(process.stdout, process, log_path))
    except BaseException:
        ServerProcess(process, {}, log_path).stop()
        raise
    return ServerProcess(process, info, log_path)


def start_hub(
    settings: dict[str, Any], *, run_dir: Path, readers: int = 8, profile: Path | None = None
) -> ServerProcess:
    """A hub process serving ``settings`` (its data dir and logs under ``run_dir``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    settings_file = run_dir / "settings.json"
    settings_file.touch(mode=0o600)
    settings_file.write_text(json.dumps(settings))
    args = ["hub", "--settings-json", str(settings_file), "--readers", str(readers)]
    if profile is not None:
        args += ["--profile", str(profile)]
    return _spawn(args, log_path=run_dir / "hub.log")


def upload_folders(address: str, token: str, folders: list[Path]) -> list[str]:
    """Upload every exam found in ``folders`` with the real upload client (4 streams); their exam
    IDs, or RuntimeError naming the exams that did not commit."""
    from teleread.client import open_channel
    from teleread.gateway.uploader.client import scan_paths, upload_exams
    from teleread.v1 import ingest_pb2_grpc

    with open_channel(address, token=token) as channel:
        stub = ingest_pb2_grpc.IngestStub(channel)
        outcomes = upload_exams(stub, scan_paths(folders).exams, parallel=4)
    missing = [o.errors for o in outcomes if not o.exam_id]
    if missing:
        raise RuntimeError(f"exams did not commit: {missing}")
    return [o.exam_id for o in outcomes]


def start_sink(run_dir: Path) -> ServerProcess:
    run_dir.mkdir(parents=True, exist_ok=True)
    return _spawn(["sink"], log_path=run_dir / "sink.log")


def process_tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


if __name__ == "__main__":
    main()
