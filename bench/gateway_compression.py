"""Compression on the wire at the clinic gateway: how many bytes each kind of exam puts on the
uplink with ``compression = off``, ``gzip`` and ``auto``, and what gzip costs the gateway's CPU.

Every object is uploaded for real — outbox, forwarder, gRPC, a hub process (embedded defaults) — and
the bytes are counted by a TCP proxy between the gateway and the hub (tests/faultproxy.py), so the
figures include gRPC and HTTP/2 framing. The data is real where it exists: pydicom's bundled CT, MR,
RGB, JPEG and JPEG 2000 files and its 12-lead DICOM ECG, and the WFDB records in the datasets folder
(MIT-BIH, PTB, PTB-XL, CinC 2017). A time on a 10 Mbit/s link is bytes × 8 / 10 Mbit/s.

    python -m bench.gateway_compression [--data ../shared/datasets] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file

from bench import _hubproc
from bench._report import machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from faultproxy import FaultProxy  # noqa: E402  (the test suite's byte-counting proxy)

LINK_BPS = 10e6
DICOM_SAMPLES = {
    "CT (uncompressed, real)": "CT_small.dcm",
    "MR (uncompressed, real)": "MR_small.dcm",
    "RGB ultrasound-like (uncompressed)": "examples_rgb_color.dcm",
    "12-lead ECG (DICOM waveform)": "waveform_ecg.dcm",
    "JPEG 2000 image": "examples_jpeg2k.dcm",
    "JPEG baseline image": "SC_rgb_jpeg_dcmd.dcm",
}


@dataclass
class Sample:
    label: str
    kind: str  # "dicom" | "wfdb"
    files: list[Path]

    @property
    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def samples(data: Path) -> list[Sample]:
    found = [Sample(label, "dicom", [Path(get_testdata_file(name))]) for label, name in DICOM_SAMPLES.items()]
    for folder in sorted((data / "wfdb").iterdir()):
        heads = [h for h in sorted(folder.rglob("*.hea")) if h.with_suffix(".dat").exists()][:20]
        files = [f for h in heads for f in (h, h.with_suffix(".dat"))]
        if files:
            found.append(Sample(f"WFDB {folder.name} ({len(heads)} records)", "wfdb", files))
    return found


def _load(outbox_dir: Path, sample: Sample) -> Any:
    from teleread.gateway.clinic.outbox import Outbox

    box = Outbox(outbox_dir)
    if sample.kind == "dicom":
        for path in sample.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            with path.open("rb") as f:
                box.receive(f, group_key=str(ds.StudyInstanceUID), instance_key=str(ds.SOPInstanceUID))
            box.complete(str(ds.StudyInstanceUID))
    else:
        for n, path in enumerate(sample.files):  # one exam per record
            if path.suffix == ".hea":
                key = f"wfdb:{n:064d}"
                for part, role in ((path, "wfdb_header"), (path.with_suffix(".dat"), "wfdb_signal")):
                    with part.open("rb") as f:
                        box.receive(f, group_key=key, instance_key=part.name, role=role, kind="ecg")
                box.complete(key)
    return box


def measure(hub: _hubproc.ServerProcess, sample: Sample, mode: str, work: Path) -> dict[str, Any]:
    from teleread.client import open_channel
    from teleread.gateway.clinic.forward import Forwarder
    from teleread.v1 import ingest_pb2_grpc

    box = _load(work / f"{mode}-{abs(hash(sample.label))}", sample)
    proxy = FaultProxy(int(hub.info["port"]))
    channel = open_channel(proxy.address, token=hub.tokens["site"])
    try:
        started = time.perf_counter()
        results = Forwarder(box, ingest_pb2_grpc.IngestStub(channel), compression=mode).drain()
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
        proxy.close()
        box.close()
    outcomes = sorted({r.outcome for r in results})
    return {"wire_bytes": proxy.stats.bytes_up, "seconds": elapsed, "outcomes": outcomes}


def gzip_cpu() -> float:
    """MB/s one core deflates 1 MiB chunks of uncompressed CT-like data at zlib's default level."""
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    chunk = (ct * (1024 * 1024 // len(ct) + 1))[: 1024 * 1024]
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        zlib.compress(chunk, 6)
    return rounds / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    from teleread.models.training.evaluate import default_datasets

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="datasets folder (default ../shared/datasets)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tr-compress-") as tmp:
        work = Path(tmp)
        runs = 0
        for sample in samples(args.data or default_datasets()):
            row: dict[str, Any] = {"sample": sample.label, "bytes": sample.size}
            for mode in ("off", "gzip", "auto"):
                # a fresh hub each time: a hub that already holds the objects would not take their bytes again
                runs += 1
                hub = _hubproc.start_hub(
                    {"data_dir": str(work / f"hub{runs}"), "cpu_workers": 0}, run_dir=work / f"run{runs}", readers=1
                )
                try:
                    row[mode] = measure(hub, sample, mode, work)
                finally:
                    hub.stop()
            rows.append(row)
    cpu = gzip_cpu()
    header = f"{'sample':44s} {'bytes':>10s} {'wire off':>10s} {'wire gzip':>10s} {'wire auto':>10s}"
    print(header + f" {'auto/off':>8s}  10 Mbit/s off→auto")
    total_off = total_auto = 0
    for row in rows:
        if any(row[m]["outcomes"] != ["committed"] for m in ("off", "gzip", "auto")):
            print(f"{row['sample'][:44]:44s} {row['bytes']:10d}  not all committed: {row['off']['outcomes']}")
            continue
        off, gz, auto = (row[m]["wire_bytes"] for m in ("off", "gzip", "auto"))
        total_off += off
        total_auto += auto
        t_off, t_auto = off * 8 / LINK_BPS, auto * 8 / LINK_BPS
        print(
            f"{row['sample'][:44]:44s} {row['bytes']:10d} {off:10d} {gz:10d} {auto:10d} {auto / off:8.2f}"
            f"  {t_off:6.2f} s → {t_auto:5.2f} s"
        )
    print(f"all samples: auto puts {total_auto / total_off:.2f} of the uncompressed bytes on the wire")
    print(f"gzip (zlib level 6) on one core: {cpu:.0f} MB/s of CT-like data (a 10 Mbit/s link carries 1.25 MB/s)")
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gb']} GB RAM, Python {info['python']}, "
        f"grpcio {info['grpc']}; load average (1 min) {info['load_before']:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; code at {info['commit'] or '?'}"
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": rows, "gzip_mb_s": cpu}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
