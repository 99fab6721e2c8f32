"""The clinic gateway under real faults: a modality (pynetdicom SCU) keeps pushing studies while the
gateway-hub link is cut at random byte offsets, stalled, throttled and taken down by a TCP proxy,
the gateway process is SIGKILLed at random moments and restarted, the hub process is stopped and
restarted, and the gateway's disk (a small tmpfs) is filled up. At least ``FAULTS`` faults per run.

Pass: every instance the modality was told Success for is at the hub exactly once, in one committed
exam (a late instance in a follow-up exam of its study), with the SHA-256 the gateway recorded and the
pixel data / waveform the modality sent; no hub exam is left half-open; no manual step.

The fault schedule is random; the seed is printed, and ``TELEREAD_FAULT_SEED`` replays a run.
"""

from __future__ import annotations

import copy
import errno
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from faultproxy import FaultProxy
from helpers import wait_for

pytestmark = pytest.mark.timeout(900)

FAULTS = int(os.environ.get("TELEREAD_FAULTS", "60"))
SEED = int(os.environ.get("TELEREAD_FAULT_SEED", str(int(time.time()) % 100_000)))
TMPFS_BYTES = 16 * 1024 * 1024
CHUNK = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---------------------------------------------------------------------------------- the data


@dataclass
class Instance:
    study: str
    sop: str
    path: Path
    key: str  # "PixelData" or "WaveformSequence"


def _make_studies(folder: Path, rng: random.Random, *, studies: int) -> list[list[Instance]]:
    """CT studies (some with 1.5-3.5 MB slices, so cuts land inside objects) and 12-lead ECGs."""
    folder.mkdir(parents=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ecg = pydicom.dcmread(get_testdata_file("waveform_ecg.dcm"))
    out: list[list[Instance]] = []
    for n in range(studies):
        study_uid = generate_uid()
        items = []
        is_ecg = n % 4 == 3
        for k in range(1 if is_ecg else rng.randint(1, 3)):
            ds = copy.deepcopy(ecg if is_ecg else ct)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = generate_uid()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientName = f"FAULT^TEST{n}"
            if not is_ecg and n % 3 == 0 and k == 0:  # a large slice
                side = rng.choice((896, 1024, 1280))
                ds.Rows = ds.Columns = side
                ds.PixelData = (
                    np.random.default_rng(rng.randrange(1 << 30)).integers(0, 4096, (side, side), "<i2").tobytes()
                )
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = folder / f"{n:03d}-{k}.dcm"
            ds.save_as(path, enforce_file_format=True)
            items.append(
                Instance(study_uid, str(ds.SOPInstanceUID), path, "WaveformSequence" if is_ecg else "PixelData")
            )
        out.append(items)
    return out


# ---------------------------------------------------------------------------------- the processes


class HubProcess:
    def __init__(self, data_dir: Path, port: int) -> None:
        self.data_dir, self.port = data_dir, port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = data_dir / "hub.log"

    def start(self) -> None:
        env = {**os.environ, "TELEREAD_CPU_WORKERS": "0", "TELEREAD_LOG_LEVEL": "WARNING"}
        cmd = [sys.executable, "-m", "teleread.cli", "serve", "--data-dir", str(self.data_dir)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--host", "127.0.0.1", "--port", str(self.port)], env=env, stdout=log, stderr=log
            )
        wait_for(lambda: _listening(self.port), timeout=60)

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


class GatewayProcess:
    def __init__(self, data_dir: Path, outbox: Path, *, hub: str, token: str, dicom_port: int) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = data_dir / "gateway.log"
        self.dicom_port = dicom_port
        self.env = {
            **os.environ,
            "TELEREAD_DATA_DIR": str(data_dir),
            "TELEREAD_LOG_LEVEL": "INFO",
            "TELEREAD_GATEWAY__OUTBOX": str(outbox),
            "TELEREAD_GATEWAY__HUB": hub,
            "TELEREAD_GATEWAY__TOKEN": token,
            "TELEREAD_GATEWAY__DICOM_HOST": "127.0.0.1",
            "TELEREAD_GATEWAY__DICOM_PORT": str(dicom_port),
            "TELEREAD_GATEWAY__QUIET_SECONDS": "0.5",
            "TELEREAD_GATEWAY__POLL_SECONDS": "0.05",
            "TELEREAD_GATEWAY__RETRY_BASE_SECONDS": "0.2",
            "TELEREAD_GATEWAY__RETRY_CAP_SECONDS": "1.5",
            "TELEREAD_GATEWAY__KEEP_SENT_HOURS": "0",
            "TELEREAD_GATEWAY__RESULTS_POLL_SECONDS": "30",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with open(self.log, "ab") as log:
            cmd = [sys.executable, "-m", "teleread.cli", "gateway", "run"]
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        self.starts += 1
        wait_for(lambda: _listening(self.dicom_port), timeout=60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


# ---------------------------------------------------------------------------------- the modality


@dataclass
class Modality:
    """Pushes each instance until the gateway answers Success, as a modality's send queue does."""

    port: int
    studies: list[list[Instance]]
    rng: random.Random
    acknowledged: list[Instance] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    done: threading.Event = field(default_factory=threading.Event)
    enough: threading.Event = field(default_factory=threading.Event)  # no new study after this is set
    pause: tuple[float, float] = (0.3, 1.5)
    studies_sent: int = 0

    def send(self, instance: Instance) -> None:
        from pynetdicom import AE

        ds = pydicom.dcmread(instance.path)
        while True:
            ae = AE(ae_title="CT_ROOM_1")
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
            try:
                assoc = ae.associate("127.0.0.1", self.port, ae_title="TELEREAD_GW")
            except (OSError, RuntimeError):
                assoc = None
            if assoc is None or not assoc.is_established:
                self.statuses["no association"] += 1
                time.sleep(0.2)
                continue
            try:
                status = assoc.send_c_store(ds)
            except (OSError, RuntimeError, ValueError):
                status = None
            finally:
                if assoc.is_established:
                    assoc.release()
            code = int(status.Status) if status is not None and "Status" in status else -1
            self.statuses[f"0x{code:04X}" if code >= 0 else "aborted"] += 1
            if code == 0:
                self.acknowledged.append(instance)
                return
            time.sleep(0.2)  # out of resources, or the gateway died mid-association: send again

    def run(self, *, late: Instance | None = None, before_late: Any = None) -> None:
        try:
            for study in self.studies:
                if self.enough.is_set():
                    break
                for instance in study:
                    self.send(instance)
                self.studies_sent += 1
                time.sleep(self.rng.uniform(*self.pause))
            if late is not None:
                before_late()
                self.send(late)
        finally:
            self.done.set()


# ---------------------------------------------------------------------------------- the faults


class Chaos:
    def __init__(self, rng: random.Random, proxy: FaultProxy, gateway: GatewayProcess, hub: HubProcess, disk: Path):
        self.rng, self.proxy, self.gateway, self.hub, self.disk = rng, proxy, gateway, hub, disk
        self.injected: Counter[str] = Counter()

    def total(self) -> int:
        return sum(self.injected.values())

    def cut(self) -> None:
        before = self.proxy.stats.resets
        self.proxy.cut_after(self.rng.randint(0, 3 * CHUNK))
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and self.proxy.stats.resets == before:
            time.sleep(0.02)
        self.proxy.heal()
        if self.proxy.stats.resets > before:  # only a cut that happened counts
            self.injected["cut at a random byte offset"] += 1

    def stall(self) -> None:
        self.proxy.stall(self.rng.uniform(0.5, 2.5))
        self.injected["stall"] += 1
        time.sleep(2.5)

    def throttle(self) -> None:
        self.proxy.throttle(self.rng.uniform(100e3, 600e3), self.rng.uniform(1.0, 3.0))
        self.injected["throttle"] += 1
        time.sleep(1.0)

    def link_down(self) -> None:
        self.proxy.down(self.rng.uniform(0.5, 3.0))
        self.injected["link down"] += 1
        time.sleep(1.0)

    def kill_gateway(self) -> None:
        time.sleep(self.rng.uniform(0.0, 1.0))  # a random moment of whatever it is doing
        self.gateway.kill()
        self.injected["SIGKILL gateway"] += 1
        time.sleep(self.rng.uniform(0.0, 1.0))
        self.gateway.start()

    def restart_hub(self) -> None:
        self.hub.stop(self.rng.choice((signal.SIGKILL, signal.SIGTERM)))
        self.injected["hub stopped and restarted"] += 1
        time.sleep(self.rng.uniform(0.5, 3.0))
        self.hub.start()

    def fill_disk(self) -> None:
        ballast = self.disk / f"ballast-{self.total()}"
        try:
            with open(ballast, "wb") as f:
                block = b"\0" * (256 * 1024)
                while True:
                    f.write(block)
                    f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
            self.injected["ENOSPC at the gateway"] += 1
            time.sleep(self.rng.uniform(1.0, 3.0))
        finally:
            ballast.unlink(missing_ok=True)

    def run(self, count: int) -> None:
        actions = [
            (self.cut, 40),
            (self.stall, 8),
            (self.throttle, 8),
            (self.link_down, 10),
            (self.kill_gateway, 14),
            (self.restart_hub, 8),
            (self.fill_disk, 12),
        ]
        funcs, weights = zip(*actions)
        while self.total() < count:
            self.rng.choices(funcs, weights)[0]()
            time.sleep(self.rng.uniform(0.1, 0.6))
        self.proxy.heal()


# ---------------------------------------------------------------------------------- the test


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 16 MB tmpfs for the gateway's outbox: a real ENOSPC when it fills."""
    mount = tmp_path / "gwdisk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    assert done.returncode == 0, f"mounting a tmpfs needs root (CI runs as root): {done.stderr.strip()}"
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _register_hub(data_dir: Path) -> str:
    from teleread.auth import Role, add_principal, add_site
    from teleread.hub import build_hub
    from teleread.settings import Settings

    hub = build_hub(Settings(data_dir=data_dir, cpu_workers=0))
    try:
        add_site(hub.engine, code="clinic-f", name="Township clinic F", lead_hospital="county-hosp")
        return add_principal(hub.engine, name="gw-clinic-f", role=Role.SITE, site_code="clinic-f")
    finally:
        hub.close()


def _outbox_states(outbox: Path) -> Counter[str]:
    db = sqlite3.connect(f"file:{outbox / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        return Counter(dict(db.execute("SELECT state, count(*) FROM exams GROUP BY state").fetchall()))
    finally:
        db.close()


def _stuck(outbox: Path) -> list[tuple[str, ...]]:
    db = sqlite3.connect(f"file:{outbox / 'outbox.db'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("SELECT state, attempts, last_error FROM exams WHERE state != 'committed'").fetchall()
    finally:
        db.close()


def test_no_instance_is_lost_or_duplicated_under_random_faults(tmp_path: Path, small_disk: Path) -> None:
    rng = random.Random(SEED)
    print(f"fault schedule seed {SEED} (TELEREAD_FAULT_SEED={SEED} replays it)")
    studies = _make_studies(tmp_path / "modality", rng, studies=120)  # more than the faults take: sent while they last
    late_study = studies[0]
    late = _make_studies(tmp_path / "late", rng, studies=1)[0][0]
    late.study = late_study[0].study
    ds = pydicom.dcmread(late.path)
    ds.StudyInstanceUID = late.study
    ds.save_as(late.path, enforce_file_format=True)

    hub_dir = tmp_path / "hub"
    token = _register_hub(hub_dir)
    hub = HubProcess(hub_dir, _free_port())
    proxy = FaultProxy(hub.port)
    gateway = GatewayProcess(tmp_path / "gw", small_disk, hub=proxy.address, token=token, dicom_port=_free_port())
    chaos = Chaos(rng, proxy, gateway, hub, small_disk)
    modality = Modality(gateway.dicom_port, studies, rng)

    def first_study_committed() -> None:  # the late instance arrives after its study was sent
        wait_for(lambda: _outbox_states(small_disk)["committed"] >= 1, timeout=300)

    sender = threading.Thread(
        target=modality.run, kwargs={"late": late, "before_late": first_study_committed}, daemon=True
    )
    try:
        hub.start()
        gateway.start()
        started = time.monotonic()
        sender.start()
        chaos.run(FAULTS)
        chaos_s = time.monotonic() - started
        modality.enough.set()
        sender.join(timeout=300)
        assert modality.done.is_set(), "the modality could not deliver every instance to the gateway"
        expected = len(modality.acknowledged)
        try:
            wait_for(
                lambda: (s := _outbox_states(small_disk))["committed"] == sum(s.values()) and s["committed"] > 0,
                timeout=300,
                interval=0.5,
            )
        except AssertionError:
            raise AssertionError(f"the outbox did not drain: {_stuck(small_disk)}") from None
    finally:
        modality.enough.set()
        gateway.stop()
        proxy.close()
        hub.stop(signal.SIGTERM)
    print(f"faults injected: {dict(chaos.injected)} (total {chaos.total()}) in {chaos_s:.0f} s")
    print(f"modality: {modality.studies_sent} studies, {expected} instances, statuses {dict(modality.statuses)}")
    print(f"gateway starts: {gateway.starts}; proxy: {proxy.stats}")
    assert chaos.total() >= FAULTS
    assert expected == sum(len(s) for s in studies[: modality.studies_sent]) + 1
    assert modality.studies_sent >= 10

    _check_hub(hub_dir, small_disk, modality.acknowledged, late)


def _check_hub(hub_dir: Path, outbox: Path, acknowledged: list[Instance], late: Instance) -> None:
    from sqlalchemy import select

    from teleread.db.schema import exams, objects, sites
    from teleread.hub import build_hub
    from teleread.settings import Settings

    box = sqlite3.connect(f"file:{outbox / 'outbox.db'}?mode=ro", uri=True)
    gateway_sha = dict(box.execute("SELECT instance_key, sha256 FROM objects").fetchall())
    outbox_exams = box.execute("SELECT count(*) FROM exams").fetchone()[0]
    box.close()
    hub = build_hub(Settings(data_dir=hub_dir, cpu_workers=0), migrate=False)
    try:
        with hub.engine.connect() as conn:
            site_id = conn.execute(select(sites.c.id).where(sites.c.code == "clinic-f")).scalar_one()
            hub_exams = conn.execute(select(exams).where(exams.c.site_id == site_id)).mappings().all()
            rows = conn.execute(select(objects).where(objects.c.site_id == site_id)).mappings().all()
        by_sop = {r["sop_instance_uid"]: r for r in rows}
        assert len(rows) == len(acknowledged) == len(by_sop), "lost or duplicated instances at the hub"
        assert len(hub_exams) == outbox_exams  # one hub exam per outbox exam, none opened twice
        assert not [e["state"] for e in hub_exams if e["state"] in ("receiving", "rejected")]
        assert all(e["object_count"] > 0 for e in hub_exams)
        exam_study = {e["id"]: e["study_instance_uid"] for e in hub_exams}
        per_study = Counter(exam_study.values())
        for instance in acknowledged:
            row = by_sop[instance.sop]
            assert exam_study[row["exam_id"]] == instance.study
            assert row["sha256"] == gateway_sha[instance.sop]  # what the gateway recorded is what the hub holds
            with hub.store.open_verified(row["storage_key"], sha256=row["sha256"], size=row["size"]) as f:
                got = pydicom.dcmread(f)
            want = pydicom.dcmread(instance.path)
            assert got[instance.key].value == want[instance.key].value
        # the late instance went to a follow-up exam of its (already sent) study. Other studies may
        # also be split when the gateway's disk filled mid-study and the part received was sent
        # after the quiet period; each instance is still at the hub once.
        late_exam = by_sop[late.sop]["exam_id"]
        assert per_study[late.study] >= 2
        assert {by_sop[i.sop]["exam_id"] for i in acknowledged if i.study == late.study} - {late_exam}
        print(f"studies split into follow-ups: {sum(1 for n in per_study.values() if n > 1)} of {len(per_study)}")
    finally:
        hub.close()
