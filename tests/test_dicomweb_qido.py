"""QIDO-RS at the hub's HTTP port, read with dicomweb-client (PyPI) on both databases: studies,
series and instances with attribute matching, wildcards, date ranges and paging; another site's
and another specialty's studies are not reachable; refused queries say why."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from conftest import HubStack
from helpers import wait_for_state
from teleread.reader.hub.dicomweb import DicomwebServer, create_app
from teleread.v1 import common_pb2, ingest_pb2_grpc
from test_dicom_index_ingest import _instance
from test_patient_context import upload


@pytest.fixture
def dicomweb(hub_stack: HubStack) -> Iterator[DicomwebServer]:
    hub = hub_stack.hub
    app = create_app(hub.engine, hub.authenticator.authenticate, hub.store)
    server = DicomwebServer(app, host="127.0.0.1", port=0)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(server: DicomwebServer, token: str) -> DICOMwebClient:
    return DICOMwebClient(url=server.url, headers={"Authorization": f"Bearer {token}"})


def _study(stack: HubStack, folder: Path, site: str, *, date: str, name: str, accession: str, slices: int = 2) -> str:
    study, series = generate_uid(), generate_uid()
    values = {"StudyDate": date, "AccessionNumber": accession, "StudyDescription": "CT CHEST", "PatientName": name,
              "PatientID": f"P-{accession}", "SeriesNumber": 4, "SeriesDescription": "Lung"}  # fmt: skip
    files = [_instance(folder / accession, f"{n}.dcm", study=study, series=series, number=n, **values)
             for n in range(1, slices + 1)]  # fmt: skip
    ingest = ingest_pb2_grpc.IngestStub(stack.channel(site))
    exam = upload(ingest, [(f, "dicom") for f in files], kind=common_pb2.EXAM_KIND_IMAGING, study=study)
    wait_for_state(ingest, exam.exam_id, "queued")
    return study


def _stored(stack: HubStack, path: Path) -> tuple[str, str, str]:
    """Upload one DICOM file as site A's imaging exam, wait until it is queued; its study, series and
    instance UIDs."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ingest = ingest_pb2_grpc.IngestStub(stack.channel("site_a"))
    exam = upload(ingest, [(path, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=str(ds.StudyInstanceUID))
    wait_for_state(ingest, exam.exam_id, "queued")
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _value(dataset: dict[str, Any], tag: str) -> Any:
    values = dataset.get(tag, {}).get("Value") or [None]
    return values[0]


def test_studies_series_and_instances_are_found_matched_and_paged(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    older = _study(hub_stack, tmp_path, "site_a", date="20261201", name="Doe^Jane", accession="ACC-1")
    newer = _study(hub_stack, tmp_path, "site_a", date="20261203", name="Roe^Richard", accession="ACC-2", slices=3)
    other_site = _study(hub_stack, tmp_path, "site_b", date="20261202", name="Doe^John", accession="ACC-3")
    site = _client(dicomweb, hub_stack.tokens["site_a"])

    found = site.search_for_studies()
    assert [_value(s, "0020000D") for s in found] == [newer, older]  # newest first; not clinic B's
    first = found[0]
    assert (_value(first, "00080020"), _value(first, "00080050"), _value(first, "00081030")) == (
        "20261203", "ACC-2", "CT CHEST",
    )  # fmt: skip
    assert _value(first, "00100010") == {"Alphabetic": "Roe^Richard"} and _value(first, "00100020") == "P-ACC-2"
    assert first["00080061"]["Value"] == ["CT"]
    assert (_value(first, "00201206"), _value(first, "00201208")) == (1, 3)  # series and instances of the study
    assert _value(first, "00081190") == f"/dicomweb/studies/{newer}"

    def uids(**filters: Any) -> list[str]:
        return [_value(s, "0020000D") for s in site.search_for_studies(**filters)]

    assert uids(search_filters={"StudyDate": "20261202-"}) == [newer]
    assert uids(search_filters={"StudyDate": "-20261202"}) == [older]
    assert uids(search_filters={"PatientName": "Doe*"}) == [older]
    assert uids(search_filters={"00080050": "ACC-1"}) == [older]  # by tag as well as by keyword
    assert uids(search_filters={"ModalitiesInStudy": "MR"}) == []
    assert uids(search_filters={"StudyInstanceUID": f"{older},{other_site}"}) == [older]
    assert uids(limit=1) == [newer] and uids(limit=1, offset=1) == [older]

    [series] = site.search_for_series(newer)
    assert (_value(series, "00080060"), _value(series, "00200011"), _value(series, "0008103E")) == ("CT", 4, "Lung")
    assert _value(series, "00201209") == 3
    instances = site.search_for_instances(newer, _value(series, "0020000E"))
    assert [_value(i, "00200013") for i in instances] == [1, 2, 3]
    assert {(_value(i, "00280010"), _value(i, "00280011")) for i in instances} == {(128, 128)}

    reader = _client(dicomweb, hub_stack.tokens["radio"])  # county-hosp radiology: both clinics' CTs
    assert {_value(s, "0020000D") for s in reader.search_for_studies()} == {older, newer, other_site}
    assert _client(dicomweb, hub_stack.tokens["cardio"]).search_for_studies() == []  # not cardiology's


def test_another_sites_study_is_not_reachable_and_bad_queries_say_why(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    theirs = _study(hub_stack, tmp_path, "site_b", date="20261202", name="Doe^John", accession="ACC-9")
    site = _client(dicomweb, hub_stack.tokens["site_a"])
    with pytest.raises(requests.HTTPError) as err:
        site.search_for_series(theirs)
    assert err.value.response.status_code == 404  # as if it did not exist
    assert _client(dicomweb, hub_stack.tokens["cardio_city"]).search_for_studies() == []

    base = dicomweb.url
    assert httpx.get(f"{base}/studies").status_code == 401
    assert httpx.get(f"{base}/studies", headers={"Authorization": "Bearer nope"}).status_code == 401
    admin = {"Authorization": f"Bearer {hub_stack.tokens['admin']}"}
    assert httpx.get(f"{base}/studies", headers=admin).json()["reason"] == "ROLE_DENIED"
    auth = {"Authorization": f"Bearer {hub_stack.tokens['site_a']}"}
    for query, reason in (
        ("PatientWeight=70", "QIDO_UNKNOWN_ATTRIBUTE"),
        ("StudyDate=2026-12-02", "QIDO_BAD_DATE"),
        ("StudyInstanceUID=1.2.abc", "BAD_UID"),
        ("limit=ten", "QIDO_BAD_PAGING"),
    ):
        answer = httpx.get(f"{base}/studies?{query}", headers=auth)
        assert (answer.status_code, answer.json()["reason"]) == (400, reason), query
    fuzzy = httpx.get(f"{base}/studies?PatientName=doe&fuzzymatching=true", headers=auth)
    assert fuzzy.status_code == 200 and "fuzzymatching" in fuzzy.headers["warning"] and fuzzy.json() == []
    assert httpx.get(f"{base}/studies", headers={**auth, "Accept": "image/png"}).status_code == 406


def test_wado_rs_returns_the_stored_instances_and_their_metadata_to_whoever_may_see_them(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    study = _study(hub_stack, tmp_path, "site_a", date="20261203", name="Roe^Richard", accession="ACC-5", slices=2)
    site = _client(dicomweb, hub_stack.tokens["site_a"])
    [series] = site.search_for_series(study)
    series_uid = _value(series, "0020000E")
    metadata = site.retrieve_series_metadata(study, series_uid)
    assert sorted(_value(m, "00200013") for m in metadata) == [1, 2]
    first = next(m for m in metadata if _value(m, "00200013") == 1)
    assert _value(first, "00100010") == {"Alphabetic": "Roe^Richard"} and _value(first, "00080050") == "ACC-5"
    assert "InlineBinary" not in first["7FE00010"] and first["7FE00010"]["BulkDataURI"].endswith("/frames/1")
    instance_uid = _value(first, "00080018")
    # from the origin, so that it resolves wherever the browser reaches /dicomweb (the station passes it on)
    assert first["7FE00010"]["BulkDataURI"].startswith(f"/dicomweb/studies/{study}/series/{series_uid}/")

    stored = site.retrieve_instance(study, series_uid, instance_uid)  # the bytes the hub keeps, as a dataset
    original = next(
        pydicom.dcmread(p)
        for p in (tmp_path / "ACC-5").glob("*.dcm")
        if pydicom.dcmread(p).SOPInstanceUID == instance_uid
    )
    assert stored.SOPInstanceUID == instance_uid and stored.PixelData == original.PixelData
    assert len(site.retrieve_study(study)) == 2

    theirs = _client(dicomweb, hub_stack.tokens["site_b"])
    with pytest.raises(requests.HTTPError) as err:
        theirs.retrieve_instance(study, series_uid, instance_uid)
    assert err.value.response.status_code == 404 and err.value.response.json()["reason"] == "NO_INSTANCE"
    with pytest.raises(requests.HTTPError) as err:
        theirs.retrieve_series_metadata(study, series_uid)
    assert err.value.response.status_code == 404


def test_frames_come_uncompressed_or_as_stored_as_asked(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    from pydicom.encaps import generate_frames
    from pydicom.pixels import pixel_array

    ct_study = _study(hub_stack, tmp_path, "site_a", date="20261203", name="Roe^Richard", accession="ACC-6", slices=1)
    ds = pydicom.dcmread(str(get_testdata_file("MR_small_jp2klossless.dcm")))  # JPEG 2000 lossless
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    mr = tmp_path / "mr.dcm"
    ds.save_as(mr, enforce_file_format=True)
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam = upload(ingest, [(mr, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=str(ds.StudyInstanceUID))
    wait_for_state(ingest, exam.exam_id, "queued")
    site = _client(dicomweb, hub_stack.tokens["site_a"])

    [ct_series] = site.search_for_series(ct_study)
    [ct] = site.search_for_instances(ct_study, _value(ct_series, "0020000E"))
    ct_path = next((tmp_path / "ACC-6").glob("*.dcm"))
    [frame] = site.retrieve_instance_frames(
        ct_study, _value(ct_series, "0020000E"), _value(ct, "00080018"), frame_numbers=[1]
    )
    assert frame == pydicom.dcmread(ct_path).PixelData  # native: the stored bytes of the frame

    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    [plain] = site.retrieve_instance_frames(*uids, frame_numbers=[1])  # uncompressed, as asked by default
    expected = pixel_array(pydicom.dcmread(mr), index=0, raw=True)
    assert plain == expected.astype(expected.dtype.newbyteorder("<")).tobytes()
    [as_stored] = site.retrieve_instance_frames(
        *uids, frame_numbers=[1], media_types=(("application/octet-stream", "*"),)
    )
    assert as_stored == next(generate_frames(pydicom.dcmread(mr).PixelData, number_of_frames=1))
    assert as_stored != plain

    with pytest.raises(requests.HTTPError) as err:
        site.retrieve_instance_frames(*uids, frame_numbers=[2])
    assert err.value.response.status_code == 404 and err.value.response.json()["reason"] == "NO_FRAME"
    with pytest.raises(requests.HTTPError) as err:
        _client(dicomweb, hub_stack.tokens["site_b"]).retrieve_instance_frames(*uids, frame_numbers=[1])
    assert err.value.response.status_code == 404


def test_a_rendered_frame_is_the_window_asked_for_as_ps3_3_computes_it(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    import io

    import numpy as np
    from PIL import Image
    from pydicom.pixels import apply_modality_lut

    study = _study(hub_stack, tmp_path, "site_a", date="20261203", name="Roe^Richard", accession="ACC-7", slices=1)
    source = pydicom.dcmread(next((tmp_path / "ACC-7").glob("*.dcm")))
    site = _client(dicomweb, hub_stack.tokens["site_a"])
    [series] = site.search_for_series(study)
    [instance] = site.search_for_instances(study, _value(series, "0020000E"))
    url = f"{dicomweb.url}/studies/{study}/series/{_value(series, '0020000E')}/instances/{_value(instance, '00080018')}"
    auth = {"Authorization": f"Bearer {hub_stack.tokens['site_a']}", "Accept": "image/png"}
    hu = apply_modality_lut(source.pixel_array, source).astype(float)

    def expected(center: float, width: float) -> np.ndarray:  # PS3.3 C.11.2.1.2.1, linear, to 0..255
        return np.clip(np.rint((((hu - (center - 0.5)) / (width - 1)) + 0.5) * 255), 0, 255).astype(np.uint8)

    shown = {}
    for center, width in ((40, 400), (-600, 1500)):  # mediastinum, lung
        answer = httpx.get(f"{url}/frames/1/rendered", params={"window": f"{center},{width},linear"}, headers=auth)
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        shown[center] = np.asarray(Image.open(io.BytesIO(answer.content)))
        assert shown[center].shape == (source.Rows, source.Columns)
        assert np.array_equal(shown[center], expected(center, width))
    assert not np.array_equal(shown[40], shown[-600])  # the window changes what is drawn
    bad = httpx.get(f"{url}/rendered", params={"window": "40"}, headers=auth)
    assert (bad.status_code, bad.json()["reason"]) == (400, "WADO_BAD_WINDOW")


def test_metadata_is_kept_at_ingest_and_bulk_data_resolves_at_its_uri(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    """Ingest keeps each instance's DICOM JSON; it is what the file gives (an instance stored before
    it was kept is read from its file), and every BulkDataURI in it, nested ones too, answers the
    value it stands for."""
    from sqlalchemy import delete, select

    from teleread.db.schema import dicom_metadata, objects

    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    private = bytes(range(256)) * 12  # 3 KiB: bulk data
    ds.add_new(0x00090010, "LO", "TELEREAD TEST")  # the private creator of block 0x10
    ds.add_new(0x00091001, "OB", private)
    icon = pydicom.Dataset()
    icon.Rows, icon.Columns, icon.BitsAllocated, icon.BitsStored, icon.HighBit = 64, 64, 8, 8, 7
    icon.SamplesPerPixel, icon.PhotometricInterpretation, icon.PixelRepresentation = 1, "MONOCHROME2", 0
    icon.PixelData = bytes(range(64)) * 64  # 4 KiB: the icon's own pixel data, not the image's
    ds.IconImageSequence = pydicom.Sequence([icon])
    path = tmp_path / "with-bulk.dcm"
    ds.save_as(path, enforce_file_format=True)
    uids = _stored(hub_stack, path)
    site = _client(dicomweb, hub_stack.tokens["site_a"])

    engine = hub_stack.hub.engine
    with engine.connect() as conn:
        object_id = conn.execute(select(objects.c.id).where(objects.c.sop_instance_uid == uids[2])).scalar_one()
        assert conn.execute(select(dicom_metadata.c.json).where(dicom_metadata.c.object_id == object_id)).scalar()
    kept = site.retrieve_instance_metadata(*uids)
    with engine.begin() as conn:  # as for an instance stored before ingest kept its metadata
        conn.execute(delete(dicom_metadata).where(dicom_metadata.c.object_id == object_id))
    from_file = site.retrieve_instance_metadata(*uids)
    assert kept == from_file
    assert _value(kept, "00100010") == {"Alphabetic": str(ds.PatientName)}

    base = f"/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    assert kept["7FE00010"]["BulkDataURI"] == f"{base}/frames/1"
    assert kept["00091001"]["BulkDataURI"] == f"{base}/bulkdata/00091001"
    icon_pixels = kept["00880200"]["Value"][0]["7FE00010"]["BulkDataURI"]
    assert icon_pixels == f"{base}/bulkdata/00880200/0/7FE00010"
    origin = f"http://127.0.0.1:{dicomweb.port}"
    assert site.retrieve_bulkdata(origin + kept["00091001"]["BulkDataURI"]) == [private]
    assert site.retrieve_bulkdata(origin + icon_pixels) == [icon.PixelData]

    auth = {"Authorization": f"Bearer {hub_stack.tokens['site_a']}"}
    for bad, status, reason in ((f"{base}/bulkdata/00091002", 404, "NO_BULKDATA"),
                                (f"{base}/bulkdata/00880200/3/7FE00010", 404, "NO_BULKDATA"),
                                (f"{base}/bulkdata/zz", 400, "WADO_BAD_BULKDATA")):  # fmt: skip
        answer = httpx.get(origin + bad, headers=auth)
        assert (answer.status_code, answer.json()["reason"]) == (status, reason), bad
    theirs = httpx.get(origin + kept["00091001"]["BulkDataURI"],
                       headers={"Authorization": f"Bearer {hub_stack.tokens['site_b']}"})  # fmt: skip
    assert theirs.status_code == 404


def test_native_frames_are_read_by_range_and_verified_by_their_own_digest(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    """A native multi-frame instance (over 4 MiB: the check reads it from disk, not from memory):
    each frame is the slice of the stored pixel data, read alone (a changed byte of the header does
    not stop it) and never served once its bytes changed."""
    from sqlalchemy import select

    from teleread.db.schema import dicom_metadata, objects
    from teleread.storage.local import LocalObjectStore

    ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    frame_bytes = len(ds.PixelData)
    import numpy as np

    first = np.frombuffer(ds.PixelData, dtype=np.uint8)
    frames = [((first.astype(np.uint16) + k) % 256).astype(np.uint8).tobytes() for k in range(130)]
    ds.NumberOfFrames, ds.PixelData = len(frames), b"".join(frames)
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    uids = _stored(hub_stack, path)
    site = _client(dicomweb, hub_stack.tokens["site_a"])

    with hub_stack.hub.engine.connect() as conn:
        row = conn.execute(
            select(objects.c.storage_key, dicom_metadata.c.pixel_offset, dicom_metadata.c.pixel_length)
            .join(dicom_metadata, dicom_metadata.c.object_id == objects.c.id)
            .where(objects.c.sop_instance_uid == uids[2])
        ).one()
    assert row.pixel_length == 130 * frame_bytes > 4 * 1024**2
    assert path.read_bytes()[row.pixel_offset : row.pixel_offset + row.pixel_length] == ds.PixelData
    assert site.retrieve_instance_frames(*uids, frame_numbers=[2]) == [frames[1]]
    assert site.retrieve_instance_frames(*uids, frame_numbers=[3, 1]) == [frames[2], frames[0]]
    with pytest.raises(requests.HTTPError) as err:
        site.retrieve_instance_frames(*uids, frame_numbers=[131])
    assert err.value.response.status_code == 404 and err.value.response.json()["reason"] == "NO_FRAME"
    metadata = site.retrieve_instance_metadata(*uids)  # kept at ingest too
    assert _value(metadata, "00280008") == 130 and metadata["7FE00010"]["BulkDataURI"].endswith("/frames/1")

    store = hub_stack.hub.store
    if not isinstance(store, LocalObjectStore):
        return  # the S3 store's files are the server's own; the store contract test flips them there
    stored = store._path_for(row.storage_key)
    with open(stored, "r+b") as f:  # a byte of the header: the frames stand, the instance does not
        f.seek(200)
        header_byte = f.read(1)
        f.seek(200)
        f.write(bytes([header_byte[0] ^ 1]))
    assert site.retrieve_instance_frames(*uids, frame_numbers=[1]) == [frames[0]]
    with open(stored, "r+b") as f:  # a byte of the second frame: no frame of it is served
        f.seek(row.pixel_offset + frame_bytes + 5)
        pixel_byte = f.read(1)
        f.seek(row.pixel_offset + frame_bytes + 5)
        f.write(bytes([pixel_byte[0] ^ 1]))
    auth = {"Authorization": f"Bearer {hub_stack.tokens['site_a']}"}
    base = f"http://127.0.0.1:{dicomweb.port}/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    answer = httpx.get(f"{base}/frames/1", headers=auth)
    assert answer.status_code == 500 and answer.json()["reason"] == "CHECKSUM_MISMATCH"


def test_a_large_jpeg_2000_image_is_given_to_viewers_as_htj2k_of_the_same_pixels(
    hub_stack: HubStack, dicomweb: DicomwebServer, tmp_path: Path
) -> None:
    """After the exam is committed the hub makes an HTJ2K lossless copy of a large JPEG 2000 frame;
    a viewer that takes any syntax gets it (labelled so), with exactly the stored values; anyone
    asking for uncompressed frames gets those; a damaged copy is never served, and the clean-up pass
    makes a missing one."""
    import imagecodecs
    import numpy as np
    from pydicom.pixels import pixel_array
    from pydicom.uid import JPEG2000Lossless
    from sqlalchemy import select, update

    from bench._data import write_phantom_dx
    from teleread.db.schema import dicom_metadata, objects

    dx = write_phantom_dx(tmp_path / "dx.dcm", rows=1100, columns=1000, syntax=JPEG2000Lossless, noise=64)
    ds = pydicom.dcmread(dx)
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    ingest = ingest_pb2_grpc.IngestStub(hub_stack.channel("site_a"))
    exam = upload(ingest, [(dx, "dicom")], kind=common_pb2.EXAM_KIND_IMAGING, study=uids[0])
    wait_for_state(ingest, exam.exam_id, "queued")
    hub = hub_stack.hub
    assert hub.renditions.flush()
    with hub.engine.connect() as conn:
        object_id, site_id = conn.execute(
            select(objects.c.id, objects.c.site_id).where(objects.c.sop_instance_uid == uids[2])
        ).one()
        key = conn.execute(select(dicom_metadata.c.rendition_key).where(dicom_metadata.c.object_id == object_id))
        key = key.scalar_one()
    assert key.startswith(f"t{site_id}/renditions/")

    stored = pixel_array(ds, raw=True)
    auth = {"Authorization": f"Bearer {hub_stack.tokens['site_a']}"}
    base = f"http://127.0.0.1:{dicomweb.port}/dicomweb/studies/{uids[0]}/series/{uids[1]}/instances/{uids[2]}"
    site = _client(dicomweb, hub_stack.tokens["site_a"])

    def any_syntax() -> tuple[str, bytes]:
        answer = httpx.get(f"{base}/frames/1", headers={
            **auth, "Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})  # fmt: skip
        assert answer.status_code == 200
        boundary = answer.headers["content-type"].split("boundary=")[1].strip('"').encode()
        [part] = [p for p in answer.content.split(b"--" + boundary)[1:-1]]
        head, body = part.split(b"\r\n\r\n", 1)
        return head.decode(), body[: -len(b"\r\n")]

    head, copy = any_syntax()
    assert "transfer-syntax=1.2.840.10008.1.2.4.201" in head
    assert np.array_equal(imagecodecs.htj2k_decode(copy), stored)  # lossless: the stored values
    [plain] = site.retrieve_instance_frames(*uids, frame_numbers=[1])  # uncompressed, as asked
    assert plain == stored.astype("<u2").tobytes()

    if hasattr(hub.store, "_path_for"):  # the local store: damage the copy's bytes
        path = hub.store._path_for(key)
        path.write_bytes(b"x" + path.read_bytes()[1:])
        head, served = any_syntax()  # never the damaged copy: the stored JPEG 2000 frame
        assert "transfer-syntax=1.2.840.10008.1.2.4.90" in head and served != copy
    with hub.engine.begin() as conn:  # as if the hub had stopped before making it
        conn.execute(update(dicom_metadata).where(dicom_metadata.c.object_id == object_id)
                     .values(rendition_key=None, rendition_sha256=None, rendition_size=None))  # fmt: skip
    assert hub.janitor.run_once().renditions_made == 1
    head, again = any_syntax()
    assert "transfer-syntax=1.2.840.10008.1.2.4.201" in head and again == copy
