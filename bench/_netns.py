"""An emulated rural link between two network namespaces, for the gateway link benchmark.

Topology (every name starts with ``tr-`` so a leftover of an interrupted run is recognised)::

    tr-clinic: tr-c0 10.203.0.1 ==veth== tr-c1 [tr-wan: relay] tr-h1 ==veth== tr-h0 10.203.0.2 :tr-hub

The kernel of this machine has no ``netem`` (nor ``fq``), so the link is emulated in user space: a
relay process in ``tr-wan`` reads every IPv4 frame that arrives on ``tr-c1`` / ``tr-h1`` through an
``AF_PACKET`` socket and writes it out of the other one after netem's model, per direction: a random
loss (Bernoulli, before the queue), a bottleneck of ``rate`` bit/s serialising whole Ethernet frames
out of a FIFO of at most ``queue`` frames (tail drop), then a fixed propagation ``delay``. ``tr-wan``
has no IP address, so its kernel forwards nothing; both ends have static neighbour entries, so no ARP
crosses the lossy link. The relay is in a namespace of its own, so the sender's TCP sees drops only
as a real path shows them (no local qdisc back-pressure). Segmentation and checksum offloads are off
on the end points (the relay forwards wire-sized frames with finished checksums). A "cut" drops every
frame both ways (and those in flight) until it is restored, as a dead radio link would.

Run inside a namespace by :class:`Link`: ``python -m bench._netns relay|offload-off|rtt|sink|send``.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
CLINIC, WAN, HUB = "tr-clinic", "tr-wan", "tr-hub"
NAMESPACES = (CLINIC, WAN, HUB)
CLINIC_DEV, CLINIC_WAN_DEV, HUB_WAN_DEV, HUB_DEV = "tr-c0", "tr-c1", "tr-h1", "tr-h0"
CLINIC_IP, HUB_IP = "10.203.0.1", "10.203.0.2"
PREFIX = 24
ETH_P_ALL, ETH_P_IP = 0x0003, 0x0800
PACKET_OUTGOING = 4
SOL_PACKET, PACKET_STATISTICS = 263, 6
SIOCETHTOOL = 0x8946
# ethtool "set" commands of the legacy ioctl: tx checksum, scatter-gather, TSO, GSO, GRO
ETHTOOL_OFF = {"tx-checksum": 0x17, "scatter-gather": 0x19, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}
ETHTOOL_GTXCSUM = 0x16
DATA_FRAME = 300  # a frame at least this long carries payload (not a bare ACK)
ALLOWED_CC = Path("/proc/sys/net/ipv4/tcp_allowed_congestion_control")


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def in_ns(ns: str, *cmd: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def module_cmd(ns: str, module: str, *args: str) -> list[str]:
    return in_ns(ns, sys.executable, "-m", module, *args)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEREAD_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    return env


def missing_requirements() -> list[str]:
    """Why this machine cannot run the link emulation ([] when it can)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("run it as root: it creates network namespaces and veth pairs")
    for tool in ("ip", "tc", "sysctl"):
        if shutil.which(tool) is None:
            problems.append(f"`{tool}` is missing (Debian: apt-get install iproute2 procps)")
    return problems


def existing_namespaces() -> set[str]:
    done = run("ip", "netns", "list", check=False)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def remove_leftovers() -> list[str]:
    """Stop the processes still inside our namespaces (a run that was killed), delete the
    namespaces (their veths go with them) and any of our veths left in this namespace."""
    removed = []
    present = existing_namespaces()
    for ns in NAMESPACES:
        if ns not in present:
            continue
        for _ in range(50):
            pids = [int(p) for p in run("ip", "netns", "pids", ns, check=False).stdout.split()]
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        run("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    for dev in (CLINIC_DEV, CLINIC_WAN_DEV, HUB_WAN_DEV, HUB_DEV):
        if run("ip", "link", "show", dev, check=False).returncode == 0:
            run("ip", "link", "del", dev, check=False)
            removed.append(f"link {dev}")
    return removed


@dataclass(frozen=True)
class LinkSpec:
    rate_bps: float = 10e6
    delay_s: float = 0.050  # one way
    loss: float = 0.01  # each direction
    queue: int = 200  # bottleneck FIFO, frames

    @property
    def text(self) -> str:
        return (
            f"{self.rate_bps / 1e6:g} Mbit/s, {self.delay_s * 1000:g} ms each way, {self.loss * 100:g} % loss "
            f"each way, {self.queue}-frame queue"
        )


class Link:
    """The three namespaces, the two veth pairs and the relay process; :meth:`close` undoes all."""

    def __init__(self, spec: LinkSpec, *, log_dir: Path, seed: int) -> None:
        self.spec, self.log_dir, self.seed = spec, log_dir, seed
        self.relay: subprocess.Popen[str] | None = None
        self._log: IO[str] | None = None
        self._allowed_before: str | None = None

    def __enter__(self) -> Link:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def setup(self) -> None:
        remove_leftovers()
        for ns in NAMESPACES:
            run("ip", "netns", "add", ns)
            run("ip", "-n", ns, "link", "set", "lo", "up")
        run(
            "ip",
            "link",
            "add",
            CLINIC_DEV,
            "netns",
            CLINIC,
            "type",
            "veth",
            "peer",
            "name",
            CLINIC_WAN_DEV,
            "netns",
            WAN,
        )
        run("ip", "link", "add", HUB_DEV, "netns", HUB, "type", "veth", "peer", "name", HUB_WAN_DEV, "netns", WAN)
        for ns, dev in ((CLINIC, CLINIC_DEV), (WAN, CLINIC_WAN_DEV), (WAN, HUB_WAN_DEV), (HUB, HUB_DEV)):
            run("ip", "-n", ns, "link", "set", dev, "gso_max_segs", "1")
            run(*module_cmd(ns, "bench._netns", "offload-off", dev))
            run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1")
        run("ip", "-n", CLINIC, "addr", "add", f"{CLINIC_IP}/{PREFIX}", "dev", CLINIC_DEV)
        run("ip", "-n", HUB, "addr", "add", f"{HUB_IP}/{PREFIX}", "dev", HUB_DEV)
        for ns, dev in ((CLINIC, CLINIC_DEV), (WAN, CLINIC_WAN_DEV), (WAN, HUB_WAN_DEV), (HUB, HUB_DEV)):
            run("ip", "-n", ns, "link", "set", dev, "up")
        for ns, dev in ((WAN, CLINIC_WAN_DEV), (WAN, HUB_WAN_DEV)):
            run("ip", "-n", ns, "link", "set", dev, "promisc", "on")
        clinic_mac, hub_mac = self._mac(CLINIC, CLINIC_DEV), self._mac(HUB, HUB_DEV)
        run("ip", "-n", CLINIC, "neigh", "replace", HUB_IP, "lladdr", hub_mac, "dev", CLINIC_DEV, "nud", "permanent")
        run("ip", "-n", HUB, "neigh", "replace", CLINIC_IP, "lladdr", clinic_mac, "dev", HUB_DEV, "nud", "permanent")
        self._start_relay()

    @staticmethod
    def _mac(ns: str, dev: str) -> str:
        info = json.loads(run("ip", "-j", "-n", ns, "link", "show", dev).stdout)
        return str(info[0]["address"])

    def _start_relay(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_dir / "relay.log", "a")
        s = self.spec
        args = [
            "relay",
            "--up-in",
            CLINIC_WAN_DEV,
            "--up-out",
            HUB_WAN_DEV,
            "--rate",
            str(s.rate_bps),
            "--delay",
            str(s.delay_s),
            "--loss",
            str(s.loss),
            "--queue",
            str(s.queue),
            "--seed",
            str(self.seed),
        ]
        self.relay = subprocess.Popen(
            module_cmd(WAN, "bench._netns", *args),
            cwd=REPO,
            env=child_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.command("stats")  # answers once both sockets are bound

    def command(self, what: str) -> dict[str, Any]:
        """Send the relay a command (cut, restore, reset, stats) and return its JSON answer."""
        relay = self.relay
        if relay is None or relay.stdin is None or relay.stdout is None:
            raise RuntimeError("the link relay is not running")
        relay.stdin.write(what + "\n")
        relay.stdin.flush()
        ready, _, _ = select.select([relay.stdout], [], [], 30.0)
        line = relay.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the link relay did not answer {what!r} (exit status {relay.poll()})")
        return dict(json.loads(line))

    def cut(self) -> None:
        self.command("cut")

    def restore(self) -> None:
        self.command("restore")

    def set_congestion_control(self, ns: str, algorithm: str) -> None:
        """Make ``algorithm`` the default of the namespace. A namespace other than the first may only
        pick an algorithm the first one lists as allowed, so it is added there for the run (and the
        list put back by :meth:`close`)."""
        allowed = ALLOWED_CC.read_text().split()
        if algorithm not in allowed:
            if self._allowed_before is None:
                self._allowed_before = " ".join(allowed)
            ALLOWED_CC.write_text(" ".join([*allowed, algorithm]))
        run("ip", "netns", "exec", ns, "sysctl", "-qw", f"net.ipv4.tcp_congestion_control={algorithm}")

    @staticmethod
    def congestion_control(ns: str) -> str:
        done = run("ip", "netns", "exec", ns, "sysctl", "-n", "net.ipv4.tcp_congestion_control")
        return done.stdout.strip()

    @staticmethod
    def forget_tcp_metrics() -> None:
        """Forget cached per-destination TCP metrics (ssthresh, RTT) so each run starts alike."""
        for ns in (CLINIC, HUB):
            run("ip", "-n", ns, "tcp_metrics", "flush", "all", check=False)

    def close(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None and relay.poll() is None:
            try:
                assert relay.stdin is not None
                relay.stdin.write("quit\n")
                relay.stdin.flush()
                relay.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, AssertionError):
                relay.kill()
                relay.wait(timeout=5)
        if relay is not None:
            for stream in (relay.stdin, relay.stdout):
                if stream is not None:
                    stream.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        remove_leftovers()
        if self._allowed_before is not None:
            ALLOWED_CC.write_text(self._allowed_before)
            self._allowed_before = None


# --- inside a namespace ----------------------------------------------------------------------------


def offload_off(dev: str) -> None:
    """Turn the offloads off with the legacy ethtool ioctl (no ethtool binary needed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for name, cmd in ETHTOOL_OFF.items():
            value = ctypes.create_string_buffer(struct.pack("II", cmd, 0), 8)
            request = bytearray(struct.pack("16sP", dev.encode(), ctypes.addressof(value)).ljust(40, b"\0"))
            try:
                fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
            except OSError as err:
                if name == "tx-checksum":  # without it the relayed frames would carry partial checksums
                    raise SystemExit(f"cannot turn off {name} on {dev}: {err}") from None
        value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_GTXCSUM, 1), 8)
        request = bytearray(struct.pack("16sP", dev.encode(), ctypes.addressof(value)).ljust(40, b"\0"))
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, request)
        if struct.unpack("II", value.raw)[1] != 0:
            raise SystemExit(f"tx checksum offload is still on for {dev}")
    finally:
        sock.close()


class _Direction:
    """One direction of the link: Bernoulli loss, a FIFO bottleneck of ``rate`` bit/s (tail drop at
    ``limit`` frames), then ``delay`` s of propagation."""

    def __init__(
        self, name: str, out: socket.socket, *, rate: float, delay: float, loss: float, limit: int, rng: random.Random
    ) -> None:
        self.name, self.out = name, out
        self.rate, self.delay, self.loss, self.limit, self.rng = rate, delay, loss, limit, rng
        self.wire: deque[tuple[float, bytes]] = deque()  # (delivery time, frame), in order
        self.backlog: deque[float] = deque()  # end of serialisation of frames not yet serialised
        self.free_at = 0.0
        self.stats: dict[str, float] = {}
        self.reset()

    def reset(self) -> None:
        keys = ("frames_in", "bytes_in", "lost_random", "dropped_queue", "dropped_cut", "frames_out", "bytes_out")
        self.stats = {key: 0 for key in keys} | {"send_errors": 0, "max_queue": 0, "max_frame": 0}

    def offer(self, frame: bytes, now: float, *, cut: bool) -> None:
        s = self.stats
        s["frames_in"] += 1
        s["bytes_in"] += len(frame)
        s["max_frame"] = max(s["max_frame"], len(frame))
        if cut:
            s["dropped_cut"] += 1
            return
        if self.rng.random() < self.loss:
            s["lost_random"] += 1
            return
        while self.backlog and self.backlog[0] <= now:
            self.backlog.popleft()
        if len(self.backlog) >= self.limit:
            s["dropped_queue"] += 1
            return
        done = max(now, self.free_at) + len(frame) * 8 / self.rate
        self.free_at = done
        self.backlog.append(done)
        s["max_queue"] = max(s["max_queue"], len(self.backlog))
        self.wire.append((done + self.delay, frame))

    def deliver(self, now: float) -> tuple[int, float | None]:
        """Send the frames whose time has come; return (data frames sent, next due time)."""
        data = 0
        while self.wire and self.wire[0][0] <= now:
            _, frame = self.wire.popleft()
            try:
                self.out.send(frame)
            except OSError:
                self.stats["send_errors"] += 1
                continue
            self.stats["frames_out"] += 1
            self.stats["bytes_out"] += len(frame)
            data += len(frame) >= DATA_FRAME
        return data, (self.wire[0][0] if self.wire else None)

    def drop_in_flight(self) -> None:
        self.stats["dropped_cut"] += len(self.wire)
        self.wire.clear()
        self.backlog.clear()
        self.free_at = 0.0


def _packet_socket(dev: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((dev, 0))
    sock.setblocking(False)
    return sock


def _kernel_drops(sock: socket.socket) -> int:
    """Frames the kernel dropped before the relay read them (since the last call)."""
    raw = sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    return int(struct.unpack("II", raw)[1])


def relay(args: argparse.Namespace) -> None:
    """The link itself: forwards frames between the two devices until stdin says quit."""
    try:
        os.nice(-10)  # timing matters more than anything else this process does
    except OSError:
        pass
    rng = random.Random(args.seed)
    a, b = _packet_socket(args.up_in), _packet_socket(args.up_out)
    spec = {"rate": args.rate, "delay": args.delay, "loss": args.loss, "limit": args.queue, "rng": rng}
    up, down = _Direction("up", b, **spec), _Direction("down", a, **spec)
    sources = {a.fileno(): (a, up), b.fileno(): (b, down)}
    stdin = sys.stdin.fileno()
    cut, cut_at, restored_at = False, 0.0, 0.0
    recoveries: list[dict[str, float]] = []
    waiting_first_data = False
    kernel_drops = 0
    for sock, _ in sources.values():
        _kernel_drops(sock)

    def answer(payload: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(payload) + "\n")
        sys.stdout.flush()

    while True:
        now = time.monotonic()
        due: list[float] = []
        for direction in (up, down):
            sent, next_due = direction.deliver(now)
            if sent and direction is up and waiting_first_data:
                waiting_first_data = False
                recoveries[-1]["first_data_after_s"] = now - restored_at
            if next_due is not None:
                due.append(next_due)
        timeout = max(0.0, min(due) - time.monotonic()) if due else 0.5
        readable, _, _ = select.select([stdin, a, b], [], [], min(timeout, 0.5))
        now = time.monotonic()
        for item in readable:
            if item == stdin:
                line = sys.stdin.readline()
                what = line.strip()
                if what in ("quit", ""):
                    return
                if what == "cut":
                    cut, cut_at = True, now
                    up.drop_in_flight()
                    down.drop_in_flight()
                elif what == "restore" and cut:
                    cut, restored_at = False, now
                    recoveries.append({"cut_s": now - cut_at})
                    waiting_first_data = True
                elif what == "reset":
                    up.reset()
                    down.reset()
                    recoveries.clear()
                    kernel_drops = 0
                for sock, _ in sources.values():
                    kernel_drops += _kernel_drops(sock)
                answer(
                    {
                        "up": up.stats,
                        "down": down.stats,
                        "cut": cut,
                        "recoveries": recoveries,
                        "kernel_drops": kernel_drops,
                    }
                )
                continue
            sock, direction = sources[item.fileno()]
            while True:
                try:
                    frame, address = sock.recvfrom(65536)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING or frame[12:14] != b"\x08\x00":
                    continue  # our own transmissions, or not IPv4
                direction.offer(frame, now, cut=cut)


# --- small probes run inside a namespace -------------------------------------------------------------


def rtt_probe(args: argparse.Namespace) -> None:
    """TCP handshake times (SYN -> SYN/ACK = one round trip) to host:port."""
    times = []
    for _ in range(args.count):
        started = time.perf_counter()
        with socket.create_connection((args.host, args.port), timeout=10):
            times.append(time.perf_counter() - started)
        time.sleep(0.05)
    print(json.dumps({"rtt_ms": [t * 1000 for t in times], "median_ms": statistics.median(times) * 1000}))


def sink(args: argparse.Namespace) -> None:
    """Accept TCP connections one after the other; for each, print the bytes received and the time
    from its first to its last byte."""
    server = socket.create_server((args.host, 0))
    print(json.dumps({"port": server.getsockname()[1]}), flush=True)
    while True:
        conn, _ = server.accept()
        received, first, last = 0, 0.0, 0.0
        with conn:
            while block := conn.recv(1 << 20):
                last = time.monotonic()
                first = first or last
                received += len(block)
        if received:  # not a handshake of the round-trip probe
            print(json.dumps({"bytes": received, "seconds": last - first}), flush=True)


def send(args: argparse.Namespace) -> None:
    """Send zeros for ``seconds`` over one TCP connection with congestion control ``cc``."""
    sock = socket.create_connection((args.host, args.port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, args.cc.encode())
    block, deadline = bytes(64 * 1024), time.monotonic() + args.seconds
    while time.monotonic() < deadline:
        sock.sendall(block)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the sink closes when it has everything
    sock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._netns")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("relay")
    p.add_argument("--up-in", required=True)
    p.add_argument("--up-out", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--delay", type=float, required=True)
    p.add_argument("--loss", type=float, required=True)
    p.add_argument("--queue", type=int, required=True)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(func=relay)
    p = sub.add_parser("offload-off")
    p.add_argument("dev")
    p.set_defaults(func=lambda a: offload_off(a.dev))
    p = sub.add_parser("rtt")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=20)
    p.set_defaults(func=rtt_probe)
    p = sub.add_parser("sink")
    p.add_argument("--host", required=True)
    p.set_defaults(func=sink)
    p = sub.add_parser("send")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--cc", required=True)
    p.set_defaults(func=send)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
