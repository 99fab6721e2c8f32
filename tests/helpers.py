"""Helpers shared by the integration tests: input files, waiting, rich error decoding."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


def copy_testdata(folder: Path, *names: str) -> list[Path]:
    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        dest = folder / name
        shutil.copy(str(get_testdata_file(name)), dest)
        out.append(dest)
    return out


def write_synthetic_wfdb(folder: Path, *, rhythm: str, name: str = "ecg-0001", seed: int = 1) -> tuple[Path, Path]:
    from teleread.models.synthetic import synthetic_ecg, write_wfdb_record

    signal, leads = synthetic_ecg(rhythm=rhythm, fs=500, seconds=10.0, seed=seed)
    return write_wfdb_record(folder, name, signal, 500, leads)


def wait_for(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def error_reason(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is None:
        return ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""
