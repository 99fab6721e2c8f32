"""The receiver's engines and the outbox's zero-copy adoption: real associations on loopback
(pynetdicom and dcmtk SCUs) against both the event-driven reactor and pynetdicom's stock acceptor,
the engine chosen by the setting, the spooled file's hash, a prune slipping in between link and
record, and rows a power cut took back rebuilt from the stored DICOM files."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

import teleread.gateway.clinic.outbox_files as outbox_files
from helpers import copy_testdata, wait_for
from receivers import ENGINES, running_receiver
from teleread.gateway.clinic.outbox import Outbox
from teleread.gateway.clinic.scp import SUCCESS, ScpConfig, StoreScp, identify
from teleread.gateway.clinic.scp_reactor import SpoolFile, spooled_digest

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=ENGINES)
def scp(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreScp]:
    """The receiver on each engine (this module's tests run on both)."""
    with running_receiver(tmp_path / "outbox", request.param) as server:
        yield server


def _acceptor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("AcceptorThread") and t.is_alive()]


def test_many_stores_on_one_association_each_land_once_and_threads_end_on_release(scp, tmp_path: Path) -> None:
    ds = pydicom.dcmread(copy_testdata(tmp_path / "in", "CT_small.dcm")[0])
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="TELEREAD_GW")
    assert assoc.is_established
    sops = []
    for _ in range(25):
        ds.SOPInstanceUID = generate_uid()
        sops.append(str(ds.SOPInstanceUID))
        assert assoc.send_c_store(ds).Status == SUCCESS
    assert assoc.send_c_echo().Status == SUCCESS
    assoc.release()
    box: Outbox = scp.outbox
    (exam,) = box.exams(state="collecting")
    objects = box.objects_of(exam.id)
    assert sorted(o.instance_key for o in objects) == sorted(sops)
    for o in objects:  # each stored file is the instance sent, under its own hash
        data = o.path.read_bytes()
        assert hashlib.sha256(data).hexdigest() == o.sha256 == o.path.name
        assert str(pydicom.dcmread(o.path).SOPInstanceUID) == o.instance_key
    assert list(box.incoming_dir.iterdir()) == []  # every spooled file was adopted
    wait_for(lambda: not _acceptor_threads(), timeout=10)  # the reactors noticed the release


def test_an_abort_mid_association_ends_its_threads_and_keeps_what_was_acknowledged(scp, tmp_path: Path) -> None:
    ds = pydicom.dcmread(copy_testdata(tmp_path / "in", "CT_small.dcm")[0])
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port)
    ds.SOPInstanceUID = generate_uid()
    assert assoc.send_c_store(ds).Status == SUCCESS
    assoc.abort()
    wait_for(lambda: not _acceptor_threads(), timeout=10)
    box: Outbox = scp.outbox
    (exam,) = box.exams(state="collecting")
    assert [o.instance_key for o in box.objects_of(exam.id)] == [str(ds.SOPInstanceUID)]


def _send_with_dcmtk(port: int, files: list[Path], associations: int) -> None:
    """dcmtk's storescu, one process per association, each on its share of ``files``."""
    assert shutil.which("storescu"), "dcmtk is installed by scripts/test.sh and .ci/run"
    procs = [
        subprocess.Popen(
            ["storescu", "-aec", "TELEREAD_GW", "127.0.0.1", str(port), *map(str, files[i::associations])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={"TCP_NODELAY": "1", "PATH": "/usr/bin"},
        )
        for i in range(associations)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out[-500:]


def _study(folder: Path, src: Path, count: int) -> list[Path]:
    ds = pydicom.dcmread(src)
    folder.mkdir()
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"{i:03}.dcm", enforce_file_format=True)
    return sorted(folder.iterdir())


def test_four_dcmtk_associations_at_once_all_land(scp, tmp_path: Path) -> None:
    (src,) = copy_testdata(tmp_path / "src", "CT_small.dcm")
    _send_with_dcmtk(scp.port, _study(tmp_path / "study", src, 24), 4)
    box: Outbox = scp.outbox
    (exam,) = box.exams(state="collecting")
    assert len(box.objects_of(exam.id)) == 24


def test_the_spool_file_hashes_what_was_written_and_says_nothing_once_changed(tmp_path: Path) -> None:
    spool = SpoolFile(str(tmp_path), ".dcm")
    payload = [b"\0" * 128, b"DICM", bytes(range(256)) * 5000]
    for part in payload:
        spool.write(part)
    path = Path(spool.name)
    want = hashlib.sha256(b"".join(payload)).hexdigest()
    assert spooled_digest(path) == (want, sum(map(len, payload)))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == want
    with open(path, "ab") as other:  # something else wrote to it: the writer's hash no longer holds
        other.write(b"x")
    assert spooled_digest(path) is None
    spool.close()
    assert spooled_digest(path) is None


def test_an_abandoned_spool_file_is_removed_with_it(tmp_path: Path) -> None:
    spool = SpoolFile(str(tmp_path), ".dcm")
    spool.write(b"partial")
    name = Path(spool.name)
    del spool  # an association aborted mid-dataset drops its message and the file with it
    import gc

    gc.collect()
    assert not name.exists()


def _spool(box: Outbox, data: bytes) -> Path:
    path = box.incoming_dir / f"{generate_uid()}.dcm"
    path.write_bytes(data)
    return path


def test_a_file_pruned_between_link_and_record_is_linked_again(tmp_path: Path, monkeypatch) -> None:
    box = Outbox(tmp_path / "outbox")
    data = b"same bytes as an exam sent long ago"
    sha = hashlib.sha256(data).hexdigest()
    real_fsync_dir = outbox_files.fsync_dir
    calls = []

    def prune_slips_in(path: Path) -> None:
        real_fsync_dir(path)
        if not calls:  # prune() removes the file of the old exam right after our link
            (box.objects_dir / sha).unlink()
        calls.append(path)

    monkeypatch.setattr(outbox_files, "fsync_dir", prune_slips_in)
    obj = box.adopt(_spool(box, data), group_key="1.2.3", instance_key="1.2.3.4", digest=(sha, len(data)))
    assert obj.path.read_bytes() == data
    assert len(calls) == 2  # linked again, and that link synced too
    assert list(box.incoming_dir.iterdir()) == []
    box.close()


def test_rows_a_power_cut_took_back_are_rebuilt_from_the_stored_instances(tmp_path: Path) -> None:
    ct, ecg = copy_testdata(tmp_path / "in", "CT_small.dcm", "waveform_ecg.dcm")
    box = Outbox(tmp_path / "outbox")
    for f in (ct, ecg):
        box.adopt(_spool(box, f.read_bytes()), group_key=str(pydicom.dcmread(f).StudyInstanceUID),
                  instance_key=str(pydicom.dcmread(f).SOPInstanceUID), rebuildable=True)  # fmt: skip
    box.receive(__import__("io").BytesIO(b"a WFDB header"), group_key="wfdb:abc", instance_key="r.hea", role="hea")
    junk = box.objects_dir / ("0" * 64)
    junk.write_bytes(b"bytes that do not match their name")
    box.close()
    # what a power cut does to commits that were not synced: the rows are gone, the files are not
    db = sqlite3.connect(tmp_path / "outbox" / "outbox.db")
    db.execute("DELETE FROM objects WHERE role='dicom'")
    db.execute("DELETE FROM exams WHERE group_key NOT LIKE 'wfdb:%'")
    db.commit()
    db.close()
    box = Outbox(tmp_path / "outbox")
    assert box.adopt_orphans(identify) == 2
    assert not junk.exists()
    exams = {e.group_key: e for e in box.exams(state="collecting")}
    for f, kind in ((ct, "image"), (ecg, "ecg")):
        ds = pydicom.dcmread(f)
        exam = exams[str(ds.StudyInstanceUID)]
        assert exam.kind == kind
        (obj,) = box.objects_of(exam.id)
        assert obj.instance_key == str(ds.SOPInstanceUID)
        assert obj.path.read_bytes() == f.read_bytes()
    assert box.adopt_orphans(identify) == 0  # nothing left to rebuild; the WFDB file is not touched
    box.close()


def test_identify_reads_the_uids_and_refuses_what_is_not_dicom(tmp_path: Path) -> None:
    (ecg,) = copy_testdata(tmp_path, "waveform_ecg.dcm")
    ident = identify(ecg)
    ds = pydicom.dcmread(ecg)
    assert ident is not None
    assert ident.kind == "ecg"
    assert (ident.group_key, ident.instance_key) == (str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    other = tmp_path / "x.hea"
    other.write_text("100 1 500 5000\n")
    assert identify(other) is None


def test_the_receiver_answers_an_echo_after_idling(scp) -> None:
    """The reactors wait on events, not on a poll: after an idle second an echo still works."""
    ae = AE()
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port)
    time.sleep(1.0)
    assert assoc.send_c_echo().Status == SUCCESS
    assoc.release()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_receiver_pool_spreads_associations_over_processes_and_replaces_one_that_dies(
    tmp_path: Path, engine: str
) -> None:
    from teleread.gateway.clinic.scp_pool import ReceiverPool

    (src,) = copy_testdata(tmp_path / "src", "CT_small.dcm")
    files = _study(tmp_path / "study", src, 24)
    box = Outbox(tmp_path / "outbox")  # the gateway process owns the outbox; receivers write into it
    pool = ReceiverPool(box.root, ScpConfig(port=0, engine=engine), 2).start()
    try:
        _send_with_dcmtk(pool.port, files, 4)
        (exam,) = box.exams(state="collecting")
        stored = box.objects_of(exam.id)
        assert sorted(o.instance_key for o in stored) == sorted(
            str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files
        )
        assert all(hashlib.sha256(o.path.read_bytes()).hexdigest() == o.sha256 for o in stored)
        wait_for(lambda: all(r.active == 0 for r in pool._receivers), timeout=10)  # each end was reported
        victim = pool._receivers[0].proc
        victim.kill()
        victim.join()
        wait_for(lambda: all(r.proc.is_alive() for r in pool._receivers) and victim not in
                 [r.proc for r in pool._receivers], timeout=20)  # fmt: skip
        late = _study(tmp_path / "late", src, 4)
        for _ in range(2):  # both receivers, the new one included, take associations
            _send_with_dcmtk(pool.port, late, 1)
        assert len(box.objects_of(exam.id)) == 28
        receivers = [r.proc for r in pool._receivers]
    finally:
        pool.stop()
        box.close()
    assert not any(p.is_alive() for p in receivers)  # stopping the pool stops its processes


@pytest.mark.parametrize(
    "instance", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8.498.10244977459925305412983542216412"]
)
def test_the_spooled_file_meta_is_byte_for_byte_what_pydicom_writes(instance: str, tmp_path: Path) -> None:
    import io

    from pydicom.filewriter import write_file_meta_info
    from pynetdicom.dsutils import create_file_meta

    from teleread.gateway.clinic.scp_reactor import SpoolFile, SpoolMeta, _create_file_meta, _write_file_meta_info

    fields = {"sop_class_uid": CTImageStorage, "sop_instance_uid": instance, "transfer_syntax": "1.2.840.10008.1.2.1"}
    want = io.BytesIO()
    write_file_meta_info(want, create_file_meta(**fields))
    assert SpoolMeta(*map(str, fields.values())).encode() == want.getvalue()
    # the replaced pynetdicom functions: plain values into a spool file, pydicom's own into any other file
    meta = _create_file_meta(**fields)
    assert isinstance(meta, SpoolMeta)
    other = io.BytesIO()
    _write_file_meta_info(other, meta)
    assert other.getvalue() == want.getvalue()
    spool = SpoolFile(str(tmp_path), ".dcm")
    _write_file_meta_info(spool, meta)
    spool.close()
    assert Path(spool.name).read_bytes() == want.getvalue()


@pytest.mark.parametrize("scp", ["reactor"], indirect=True)  # the spool file is the reactor's
def test_a_disk_that_fills_while_a_dataset_arrives_gets_a700_and_the_association_goes_on(
    scp, tmp_path: Path, monkeypatch
) -> None:
    import errno

    from teleread.gateway.clinic import scp_reactor

    ds = pydicom.dcmread(copy_testdata(tmp_path / "in", "CT_small.dcm")[0])
    real_init = scp_reactor.SpoolFile.__init__
    full = {"on": True}

    class FullDisk:
        def __init__(self, raw: object) -> None:
            self.raw = raw

        def write(self, data: object) -> int:
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.raw.write(data)  # type: ignore[attr-defined, no-any-return]

        def __getattr__(self, name: str) -> object:
            return getattr(self.raw, name)

    def init(self, directory: str, suffix: str) -> None:  # type: ignore[no-untyped-def]
        real_init(self, directory, suffix)
        self.file = FullDisk(self.file)

    monkeypatch.setattr(scp_reactor.SpoolFile, "__init__", init)
    ae = AE()
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port)
    ds.SOPInstanceUID = generate_uid()
    assert assoc.send_c_store(ds).Status == 0xA700  # out of resources: the modality keeps it
    box: Outbox = scp.outbox
    assert box.exams(state="collecting") == [] and list(box.incoming_dir.iterdir()) == []
    full["on"] = False  # space again: the same association stores the next instance
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == SUCCESS
    assoc.release()
    (exam,) = box.exams(state="collecting")
    assert [o.instance_key for o in box.objects_of(exam.id)] == [str(ds.SOPInstanceUID)]


def test_a_full_outbox_disk_gets_a700_on_either_engine_and_the_association_goes_on(
    scp, tmp_path: Path, monkeypatch
) -> None:
    import errno

    ds = pydicom.dcmread(copy_testdata(tmp_path / "in", "CT_small.dcm")[0])
    box: Outbox = scp.outbox
    real_link = box.files.link
    full = {"on": True}

    def link(tmp: Path, sha256: str) -> Path:
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_link(tmp, sha256)

    monkeypatch.setattr(box.files, "link", link)
    ae = AE()
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port)
    ds.SOPInstanceUID = generate_uid()
    status = assoc.send_c_store(ds)
    assert status.Status == 0xA700 and str(status.ErrorComment).startswith("GATEWAY_DISK_FULL")
    assert box.exams(state="collecting") == [] and list(box.incoming_dir.iterdir()) == []
    full["on"] = False
    assert assoc.is_established and assoc.send_c_store(ds).Status == SUCCESS  # the modality's retry
    assoc.release()
    (exam,) = box.exams(state="collecting")
    assert [o.instance_key for o in box.objects_of(exam.id)] == [str(ds.SOPInstanceUID)]
    assert box.status().refused_recent == 0  # a full disk is not a refusal: the modality keeps it


def test_each_engine_serves_associations_with_its_own_acceptor(scp, tmp_path: Path) -> None:
    """The reactor swaps in its event-driven classes; the stock engine is pynetdicom's, untouched."""
    from pynetdicom.association import Association
    from pynetdicom.dul import DULServiceProvider

    from teleread.gateway.clinic.scp_reactor import EventDrivenAssociation, EventDrivenDUL, ReactorReceiver

    ds = pydicom.dcmread(copy_testdata(tmp_path / "in", "CT_small.dcm")[0])
    ae = AE()
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", scp.port)
    try:
        (acceptor,) = wait_for(lambda: scp.receiver.server.active_associations, timeout=10)
        ds.SOPInstanceUID = generate_uid()
        assert assoc.send_c_store(ds).Status == SUCCESS
    finally:
        assoc.release()
    reactor = isinstance(scp.receiver, ReactorReceiver)
    assert scp.config.engine == ("reactor" if reactor else "pynetdicom")
    if reactor:
        assert type(acceptor) is EventDrivenAssociation and type(acceptor.dul) is EventDrivenDUL
    else:
        assert type(acceptor) is Association and type(acceptor.dul) is DULServiceProvider
    (exam,) = scp.outbox.exams(state="collecting")
    (obj,) = scp.outbox.objects_of(exam.id)
    assert hashlib.sha256(obj.path.read_bytes()).hexdigest() == obj.sha256  # stored whole by either
    assert list(scp.outbox.incoming_dir.iterdir()) == []


def test_the_engine_is_chosen_by_the_gateway_setting(tmp_path: Path, monkeypatch) -> None:
    from pydantic import ValidationError

    from teleread.errors import InvalidInput
    from teleread.gateway.clinic.scp import PynetdicomReceiver, make_receiver
    from teleread.gateway.clinic.scp_reactor import ReactorReceiver
    from teleread.gateway.clinic.service import Gateway
    from teleread.settings import Settings

    monkeypatch.setenv("TELEREAD_GATEWAY__RECEIVER_ENGINE", "pynetdicom")
    monkeypatch.setenv("TELEREAD_GATEWAY__DICOM_PORT", "0")
    monkeypatch.setenv("TELEREAD_DATA_DIR", str(tmp_path))
    settings = Settings()
    assert settings.gateway.receiver_engine == "pynetdicom"
    gateway = Gateway(settings, ingest=object(), results=None)
    try:
        assert isinstance(gateway.scp, StoreScp) and type(gateway.scp.receiver) is PynetdicomReceiver
        gateway.scp.start()
        ae = AE()
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", gateway.scp.port)
        assert assoc.is_established and assoc.send_c_echo().Status == SUCCESS
        assoc.release()
    finally:
        gateway.scp.stop()
        gateway.outbox.close()
    monkeypatch.delenv("TELEREAD_GATEWAY__RECEIVER_ENGINE")
    assert Settings().gateway.receiver_engine == "reactor"  # the default
    assert type(make_receiver(ScpConfig(), lambda instance: SUCCESS)) is ReactorReceiver
    monkeypatch.setenv("TELEREAD_GATEWAY__RECEIVER_ENGINE", "twisted")
    with pytest.raises(ValidationError):
        Settings()
    with pytest.raises(InvalidInput) as err:
        make_receiver(ScpConfig(engine="twisted"), lambda instance: SUCCESS)
    assert err.value.reason == "BAD_SETTING" and "reactor, pynetdicom" in err.value.message
