"""The station passes /dicomweb through to the hub's DICOMweb as the signed-in reader: one origin
for the browser's viewer, the hub's tenancy, nothing without a session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import READER_PASSWORD, signed_in_stack
from teleread.reader.hub.dicomweb import DicomwebServer, create_app
from teleread.reader.station.serve import StationServer
from teleread.settings import StationSettings
from test_dicomweb_qido import _study, _value

PASSWORD = READER_PASSWORD


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, StationServer]]:
    stack = signed_in_stack(tmp_path_factory.mktemp("dicomweb-hub"), ("dr-lung", "dr-heart"))
    web = DicomwebServer(create_app(stack.hub.engine, stack.hub.authenticator.authenticate, stack.hub.store),
                         host="127.0.0.1", port=0).start()  # fmt: skip
    station = StationServer(StationSettings(port=0, hub=stack.address, hub_http=f"http://127.0.0.1:{web.port}")).start()
    try:
        yield stack, station
    finally:
        station.stop()
        web.stop()
        stack.close()


def _signed_in(station: StationServer, user: str) -> httpx.Client:
    client = httpx.Client(base_url=station.url, timeout=20)
    login_csrf = client.get("/api/session").json()["login_csrf"]
    answer = client.post(
        "/api/login", json={"user": user, "password": PASSWORD},
        headers={"X-CSRF-Token": login_csrf, "Origin": station.url},
    )  # fmt: skip
    assert answer.status_code == 200, answer.text
    return client


def test_a_signed_in_reader_queries_the_hubs_dicomweb_through_the_station(
    served: tuple[Any, StationServer], tmp_path: Path
) -> None:
    stack, station = served
    study = _study(stack, tmp_path, "site_a", date="20261203", name="Roe^Richard", accession="ACC-8", slices=2)
    radiologist = _signed_in(station, "dr-lung")
    answer = radiologist.get("/dicomweb/studies", params={"AccessionNumber": "ACC-8"})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom+json"
    [found] = answer.json()
    assert _value(found, "0020000D") == study and _value(found, "00201208") == 2
    assert _value(found, "00081190") == f"/dicomweb/studies/{study}"  # resolves on the station's origin
    series = radiologist.get(f"/dicomweb/studies/{study}/series").json()
    assert [_value(s, "00201209") for s in series] == [2]
    bad = radiologist.get("/dicomweb/studies", params={"PatientWeight": "70"})
    assert (bad.status_code, bad.json()["reason"]) == (400, "QIDO_UNKNOWN_ATTRIBUTE")  # the hub's answer

    cardiologist = _signed_in(station, "dr-heart")
    assert cardiologist.get("/dicomweb/studies").json() == []  # the hub's tenancy: not cardiology's
    anonymous = httpx.get(f"{station.url}/dicomweb/studies", timeout=20)
    assert (anonymous.status_code, anonymous.json()["error"]["reason"]) == (401, "SIGNED_OUT")  # the station's
