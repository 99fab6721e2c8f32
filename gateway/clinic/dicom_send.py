"""A small DICOM sender (C-ECHO / C-STORE SCU) for checking a clinic's set-up from the gateway PC:
``teleread gateway echo`` asks the gateway's receiver (or any SCP) whether it answers, and
``teleread gateway send FILE...`` pushes files to it as a modality would. The demo uses it too.

Each file is read from disk and sent on one association, with a presentation context per SOP
class and transfer syntax found in the files. Only status codes and counts are printed or logged.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from teleread.errors import InvalidInput, Unavailable


@dataclass(frozen=True)
class Sent:
    path: Path
    status: int  # the C-STORE status (0x0000 success), -1 when no answer came


def _associate(host: str, port: int, called_ae: str, calling_ae: str, contexts: list[tuple[str, str]]) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise Unavailable(f"no association with {called_ae} at {host}:{port}", reason="NO_ASSOCIATION")
    return assoc


def echo(host: str, port: int, *, called_ae: str = "TELEREAD_GW", calling_ae: str = "TELEREAD_SCU") -> int:
    """C-ECHO; returns the status (0 when the peer answers)."""
    assoc = _associate(host, port, called_ae, calling_ae, [("1.2.840.10008.1.1", "1.2.840.10008.1.2")])
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    return int(status.Status) if status and "Status" in status else -1


def send_files(
    paths: list[Path], host: str, port: int, *, called_ae: str = "TELEREAD_GW", calling_ae: str = "TELEREAD_SCU"
) -> list[Sent]:
    """C-STORE every file on one association; a file that is not DICOM raises InvalidInput first."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in paths:
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError) as exc:
            raise InvalidInput(f"{path.name} is not a readable DICOM file", reason="NOT_DICOM") from exc
        headers.append((path, str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID)))
    contexts = sorted({(sop, syntax) for _, sop, syntax in headers})
    assoc = _associate(host, port, called_ae, calling_ae, contexts)
    sent = []
    try:
        for path, _, _ in headers:
            status = assoc.send_c_store(path)  # pynetdicom reads the file itself
            sent.append(Sent(path, int(status.Status) if status and "Status" in status else -1))
    finally:
        if assoc.is_established:
            assoc.release()
    return sent


def cmd_echo(args: argparse.Namespace) -> int:
    try:
        status = echo(args.host, args.port, called_ae=args.ae_title, calling_ae=args.calling_ae)
    except Unavailable as err:
        print(f"error: {err}")
        return 1
    print(f"C-ECHO {args.ae_title}@{args.host}:{args.port}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    try:
        sent = send_files(args.files, args.host, args.port, called_ae=args.ae_title, calling_ae=args.calling_ae)
    except (InvalidInput, Unavailable) as err:
        print(f"error: {err}")
        return 1
    for item in sent:
        print(f"{item.path.name}: 0x{item.status:04X}" + ("" if item.status == 0 else "  (not stored)"))
    ok = sum(1 for s in sent if s.status == 0)
    print(f"{ok} of {len(sent)} stored")
    return 0 if ok == len(sent) else 1


def add_sender_parsers(sub: Any) -> None:
    for name, func, help_text in (
        ("echo", cmd_echo, "C-ECHO the gateway's receiver (or another DICOM node)"),
        ("send", cmd_send, "send DICOM files to the gateway's receiver as a modality would"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name == "send":
            p.add_argument("files", nargs="+", type=Path, metavar="FILE")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=11112)
        p.add_argument("--ae-title", dest="ae_title", default="TELEREAD_GW", help="the called AE title")
        p.add_argument("--calling-ae", dest="calling_ae", default="TELEREAD_SCU")
        p.set_defaults(func=func)
