"""The gateway talks to the hub over mutual TLS: with the hub's CA and its own client certificate it
forwards a study; without TLS it cannot reach a TLS hub, and it refuses to start in plaintext
towards a hub that is not on the same machine (the site token and patient data would cross the
uplink in clear)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file

from conftest import make_settings, start_stack
from helpers import wait_for
from teleread.app.cli import main
from teleread.errors import InvalidInput
from teleread.gateway.clinic.service import Gateway, uplink_security
from teleread.settings import GatewaySettings, Settings
from teleread.tls import make_local_pki

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tls_hub(tmp_path: Path):  # type: ignore[no-untyped-def]
    pki = tmp_path / "pki"
    make_local_pki(pki, hosts=["localhost", "127.0.0.1"], clients=["clinic-a"])
    settings = make_settings(tmp_path / "hub").updated(
        grpc__tls_cert=pki / "hub.pem", grpc__tls_key=pki / "hub.key", grpc__tls_ca=pki / "ca.pem"
    )
    stack = start_stack("embedded", settings)
    try:
        yield stack, pki
    finally:
        stack.server.stop(grace=None)
        stack.hub.close()


def _gateway(tmp_path: Path, stack: Any, **tls: Any) -> Gateway:
    config = GatewaySettings(
        hub=stack.address, token=stack.tokens["site_a"], dicom_host="127.0.0.1", dicom_port=0, poll_seconds=0.05,
        retry_base_seconds=0.1, retry_cap_seconds=0.5, **tls,
    )  # fmt: skip
    return Gateway(Settings(data_dir=tmp_path / "gw", gateway=config))


def _put_study(gw: Gateway) -> str:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    gw.outbox.receive(
        io.BytesIO(buf.getvalue()), group_key=str(ds.StudyInstanceUID), instance_key=str(ds.SOPInstanceUID)
    )
    gw.outbox.complete(str(ds.StudyInstanceUID))
    return str(ds.StudyInstanceUID)


def test_the_gateway_forwards_over_mutual_tls(tls_hub: Any, tmp_path: Path) -> None:
    stack, pki = tls_hub
    gw = _gateway(tmp_path, stack, tls_ca=pki / "ca.pem", tls_cert=pki / "clinic-a.pem", tls_key=pki / "clinic-a.key")
    _put_study(gw)
    gw.start()
    try:
        wait_for(lambda: gw.outbox.status().by_state["committed"] == 1, timeout=60)
        assert gw.outbox.status().link_state == "up"
    finally:
        gw.stop()


def test_without_tls_the_gateway_cannot_reach_a_tls_hub(tls_hub: Any, tmp_path: Path) -> None:
    stack, pki = tls_hub
    for tls in ({}, {"tls_ca": pki / "ca.pem"}):  # plaintext; TLS without the client certificate the hub requires
        gw = _gateway(tmp_path / str(len(tls)), stack, **tls)
        _put_study(gw)
        gw.start()
        try:
            wait_for(lambda gw=gw: gw.outbox.status().link_state == "down", timeout=60)
            assert gw.outbox.status().by_state["committed"] == 0
        finally:
            gw.stop()


def test_plaintext_to_a_hub_elsewhere_is_refused_at_start(tmp_path: Path, capsys: Any, monkeypatch: Any) -> None:
    with pytest.raises(InvalidInput) as refused:
        uplink_security(GatewaySettings(hub="hub.county.example:50051"))
    assert refused.value.reason == "TLS_REQUIRED" and "TELEREAD_GATEWAY__TLS_CA" in refused.value.message
    assert uplink_security(GatewaySettings(hub="127.0.0.1:50051")) == {}  # a hub on this machine
    assert uplink_security(GatewaySettings(hub="10.0.0.5:50051", insecure=True)) == {}  # said so explicitly
    with pytest.raises(InvalidInput) as half:
        uplink_security(GatewaySettings(hub="10.0.0.5:50051", tls_ca=tmp_path / "ca.pem", tls_cert=tmp_path / "c"))
    assert half.value.reason == "BAD_SETTING"
    monkeypatch.setenv("TELEREAD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TELEREAD_GATEWAY__HUB", "hub.county.example:50051")
    monkeypatch.setenv("TELEREAD_GATEWAY__TOKEN", "x")
    assert main(["gateway", "run"]) == 2
    assert "TLS_REQUIRED" in capsys.readouterr().err
