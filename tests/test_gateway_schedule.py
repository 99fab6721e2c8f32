"""The gateway's use of the uplink: time windows, a shared bandwidth limit, and gzip on the wire
only for objects that shrink (checked end to end by counting the bytes that cross a proxy)."""

from __future__ import annotations

import datetime as dt
import io
import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from faultproxy import FaultProxy
from teleread.client import open_channel
from teleread.errors import InvalidInput
from teleread.gateway.clinic.forward import Forwarder
from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.uploader.schedule import (
    TokenBucket,
    in_windows,
    limit_rate,
    parse_windows,
    worth_compressing,
)
from teleread.v1 import ingest_pb2_grpc

pytestmark = pytest.mark.timeout(120)


def _at(hhmm: str) -> dt.datetime:
    h, m = map(int, hhmm.split(":"))
    return dt.datetime(2026, 11, 23, h, m)


def test_windows_parse_wrap_past_midnight_and_refuse_nonsense() -> None:
    day, night = parse_windows(["08:00-18:00", "22:00-06:30"])
    assert day.contains(_at("08:00").time()) and not day.contains(_at("18:00").time())
    assert night.contains(_at("23:59").time()) and night.contains(_at("00:10").time())
    assert not night.contains(_at("12:00").time()) and not night.contains(_at("06:30").time())
    assert in_windows([], _at("03:00"))  # no windows: always
    assert in_windows([day, night], _at("05:00")) and not in_windows([day, night], _at("19:00"))
    for bad in ("8-18", "08:00-25:00", "08:61-09:00", "24:30-01:00", "08:00"):
        with pytest.raises(InvalidInput) as err:
            parse_windows([bad])
        assert err.value.reason == "BAD_WINDOW"


def test_the_token_bucket_holds_all_streams_to_one_rate() -> None:
    clock = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    bucket = TokenBucket(lambda: 100_000.0, burst_s=0.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(10):
        bucket.take(50_000)  # 500 kB at 100 kB/s
    assert clock[0] == pytest.approx(5.0)
    assert bucket.message_size(1024 * 1024) == 16 * 1024  # a tenth of a second, at least 16 KiB
    free = TokenBucket(lambda: None, sleep=sleep)
    free.take(10**9)
    assert len(slept) == 10 and free.message_size(1024 * 1024) == 1024 * 1024
    now = dt.datetime.now()
    elsewhere = f"{(now + dt.timedelta(hours=2)).strftime('%H:%M')}-{(now + dt.timedelta(hours=3)).strftime('%H:%M')}"
    assert limit_rate(2000, [])() == 250_000.0 and limit_rate(0, [])() is None
    assert limit_rate(2000, parse_windows([elsewhere]))() is None  # outside its window the limit is off


def test_only_objects_that_shrink_are_worth_gzip(tmp_path: Path) -> None:
    noise, zeros, tiny = tmp_path / "noise", tmp_path / "zeros", tmp_path / "tiny"
    noise.write_bytes(os.urandom(300_000))
    zeros.write_bytes(b"\0" * 300_000)
    tiny.write_bytes(b"\0" * 100)
    ct = Path(get_testdata_file("CT_small.dcm"))
    jpeg = Path(get_testdata_file("examples_jpeg2k.dcm"))
    assert worth_compressing(zeros) and worth_compressing(ct)
    assert not worth_compressing(noise) and not worth_compressing(tiny) and not worth_compressing(jpeg)
    assert not worth_compressing(tmp_path / "missing")


def _smooth_ct(path: Path, side: int = 1024) -> Path:
    """An uncompressed CT slice with smooth, image-like pixels (compresses like real anatomy)."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    y, x = np.mgrid[0:side, 0:side]
    image = 1000 + 400 * np.sin(x / 40.0) * np.cos(y / 55.0) + np.random.default_rng(1).normal(0, 3, (side, side))
    ds.Rows = ds.Columns = side
    ds.PixelData = image.astype("<i2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _outbox_with(tmp: Path, path: Path, *, priority: str = "routine") -> Outbox:
    box = Outbox(tmp)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    with open(path, "rb") as f:
        box.receive(f, group_key=ds.StudyInstanceUID, instance_key=ds.SOPInstanceUID, priority=priority)
    box.complete(ds.StudyInstanceUID)
    return box


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_auto_compression_saves_bytes_on_the_wire_and_the_hub_gets_the_same_bytes(
    embedded_stack, tmp_path: Path, mode: str
) -> None:
    ct = _smooth_ct(tmp_path / "ct.dcm")
    box = _outbox_with(tmp_path / mode, ct)
    proxy = FaultProxy(embedded_stack.port)
    channel = open_channel(proxy.address, token=embedded_stack.tokens["site_a"])
    try:
        (result,) = Forwarder(box, ingest_pb2_grpc.IngestStub(channel), compression=mode).drain()
    finally:
        channel.close()
        proxy.close()
    assert result.outcome == "committed"
    size = ct.stat().st_size
    if mode == "auto":
        assert proxy.stats.bytes_up < 0.7 * size  # smooth 16-bit pixels shrink on the wire
    else:
        assert proxy.stats.bytes_up > size
    with embedded_stack.hub.engine.connect() as conn:
        from sqlalchemy import select

        from teleread.db.schema import objects

        (sha,) = conn.execute(select(objects.c.sha256).where(objects.c.exam_id == result.detail)).one()
    assert sha == box.objects_of(result.exam_id)[0].sha256


def test_a_bandwidth_limit_slows_the_upload_to_its_rate(embedded_stack, tmp_path: Path) -> None:
    ct = _smooth_ct(tmp_path / "ct.dcm", side=512)  # ~0.5 MB
    box = _outbox_with(tmp_path / "box", ct)
    kbps = 8000.0  # 1 MB/s
    bucket = TokenBucket(limit_rate(kbps, []), burst_s=0.0)
    stub = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    started = time.monotonic()
    (result,) = Forwarder(box, stub, limiter=bucket, compression="off").drain()
    elapsed = time.monotonic() - started
    assert result.outcome == "committed"
    floor = (ct.stat().st_size - 100_000) / (kbps * 1000 / 8)  # the first message goes before any wait
    assert elapsed >= floor, (elapsed, floor)


def test_outside_the_routine_window_only_stat_and_urgent_exams_go(embedded_stack, tmp_path: Path) -> None:
    box = Outbox(tmp_path / "box")
    for name, priority in (("CT_small.dcm", "routine"), ("MR_small.dcm", "stat")):
        path = Path(get_testdata_file(name))
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        box.receive(
            io.BytesIO(path.read_bytes()),
            group_key=ds.StudyInstanceUID,
            instance_key=ds.SOPInstanceUID,
            priority=priority,
        )
        box.complete(ds.StudyInstanceUID)
    now = dt.datetime.now()
    closed = [f"{(now + dt.timedelta(hours=2)).strftime('%H:%M')}-{(now + dt.timedelta(hours=3)).strftime('%H:%M')}"]
    stub = ingest_pb2_grpc.IngestStub(embedded_stack.channel("site_a"))
    sent = Forwarder(box, stub, routine_windows=parse_windows(closed)).drain()
    assert [box.exam(r.exam_id).priority for r in sent] == ["stat"]
    assert box.status().by_state["ready"] == 1  # the routine study waits for its window
    opened = [
        f"{(now - dt.timedelta(minutes=5)).strftime('%H:%M')}-{(now + dt.timedelta(minutes=5)).strftime('%H:%M')}"
    ]
    later = Forwarder(box, stub, routine_windows=parse_windows(opened)).drain()
    assert [box.exam(r.exam_id).priority for r in later] == ["routine"]


@pytest.mark.parametrize(("setting", "value"), [("compression", "zip"), ("routine_windows", ["22-06"])])
def test_the_gateway_refuses_a_bad_schedule_setting_by_name(tmp_path: Path, setting: str, value: object) -> None:
    from teleread.gateway.clinic.service import Gateway
    from teleread.settings import GatewaySettings, Settings

    config = GatewaySettings(dicom_host="127.0.0.1", dicom_port=0, **{setting: value})
    with pytest.raises(InvalidInput) as err:
        Gateway(Settings(data_dir=tmp_path, gateway=config), ingest=object(), results=None)
    assert err.value.reason in ("BAD_SETTING", "BAD_WINDOW")


def test_the_gateway_spreads_its_streams_over_several_connections(embedded_stack, tmp_path: Path) -> None:
    from helpers import wait_for
    from teleread.gateway.clinic.service import Gateway
    from teleread.settings import GatewaySettings, Settings

    proxy = FaultProxy(embedded_stack.port)
    config = GatewaySettings(
        hub=proxy.address,
        token=embedded_stack.tokens["site_a"],
        dicom_host="127.0.0.1",
        dicom_port=0,
        connections=3,
        quiet_seconds=0.2,
        poll_seconds=0.05,
        compression="off",
    )
    gw = Gateway(Settings(data_dir=tmp_path, gateway=config))
    study = generate_uid()
    for n in range(6):
        path = _smooth_ct(tmp_path / f"ct{n}.dcm", side=256)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.save_as(path, enforce_file_format=True)
        with open(path, "rb") as f:
            gw.outbox.receive(f, group_key=study, instance_key=str(ds.SOPInstanceUID))
    gw.start()
    try:
        wait_for(lambda: gw.outbox.status().by_state["committed"] == 1, timeout=60)
    finally:
        gw.stop()
        proxy.close()
    assert proxy.stats.connections >= 2  # one TCP connection per channel, not one shared subchannel
