"""The gateway's DICOM receiver: a C-STORE / C-ECHO SCP (pynetdicom) that writes every instance
into the durable outbox before it answers Success.

pynetdicom receives each dataset straight to a file in the outbox's ``incoming/`` folder
(``STORE_RECV_CHUNKED_DATASET``, spooled there by :mod:`scp_reactor`), so a large multi-frame object
never sits whole in memory; the handler reads only the identifying attributes, lets the outbox
adopt the file (SHA-256, fsync, rename: no copy) and answers:

- ``0x0000`` Success once the instance is durable (a retried instance with the same bytes too);
- ``0xA700`` Out of resources when the gateway's disk is full (the sender keeps the instance);
- ``0xA900`` when the SOP class or identifiers do not match, ``0xC000`` cannot understand for
  malformed data or bad UIDs, ``0xC001`` for the same instance UID with different bytes.

Each accepted association runs event-driven (:mod:`teleread.gateway.scp_reactor`): the threads
wait on the socket and on each other instead of polling.

Patient data never reaches the logs: pynetdicom's identifier logging is off and our log lines
name only status codes and reasons.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.gateway.outbox import Identity, Outbox
from teleread.gateway.validate import check_dicom_instance, check_uid
from teleread.vocab import is_ecg

log = logging.getLogger("teleread.gateway.scp")

# Every storage SOP class is accepted in the uncompressed syntaxes and in the compressed ones
# modalities send (most DR units and many CT/US units compress): stored as received; the hub
# decodes them where triage or display needs pixels (pylibjpeg-openjpeg, pyjpegls, GDCM, Pillow).
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",  # JPEG baseline (8 bit, lossy)
    "1.2.840.10008.1.2.4.51",  # JPEG extended (12 bit, lossy)
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)
UNCOMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired, still sent by old units)
)
# Larger PDUs mean far fewer Python-level PDU decodes per instance (16 KiB, pynetdicom's default,
# gave 137 CT slices/s here; 1 MiB 182/s).
MAX_PDU = 1024 * 1024
SUCCESS, OUT_OF_RESOURCES, MISMATCH, CANNOT_UNDERSTAND, DUPLICATE_CONFLICT = 0x0000, 0xA700, 0xA900, 0xC000, 0xC001


@dataclass
class ScpConfig:
    ae_title: str = "TELEREAD_GW"
    host: str = "127.0.0.1"
    port: int = 11112
    priority: str = "routine"  # for instances that do not say (a clinic can set its default)


def _read_identifiers(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(
        path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"]
    )


def _valid_uids(ds: Any) -> tuple[str, str, str] | None:
    """The study, instance and SOP class UIDs of a dataset, or ``None`` unless all three are valid
    (by the hub's UID rule)."""
    try:
        return tuple(  # type: ignore[return-value]
            check_uid(str(ds.get(keyword) or ""), field=keyword)
            for keyword in ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID")
        )
    except InvalidInput:
        return None


def instance_kind(sop_class: str) -> str:
    """ "ecg" for an ECG (:func:`teleread.vocab.is_ecg`), else "image": the outbox exam's kind."""
    return "ecg" if is_ecg(sop_class_uid=sop_class) else "image"


def identify(path: Path) -> Identity | None:
    """Where a stored DICOM instance belongs (its study and instance UIDs), or ``None`` when the
    file is not a DICOM instance with valid UIDs: for :meth:`Outbox.adopt_orphans`."""
    try:
        uids = _valid_uids(_read_identifiers(path))
    except Exception:  # noqa: BLE001 - not DICOM (a WFDB file of the watch folder, say)
        return None
    return None if uids is None else Identity(uids[0], uids[1], instance_kind(uids[2]))


class StoreScp:
    def __init__(self, outbox: Outbox, config: ScpConfig, *, on_close: Callable[[Any], None] | None = None) -> None:
        from pynetdicom import AE, _config, evt
        from pynetdicom.presentation import StoragePresentationContexts

        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_HANDLER_LEVEL = "none"
        self.outbox = outbox
        self.config = config
        self.ae = AE(ae_title=config.ae_title)
        for context in StoragePresentationContexts:
            assert context.abstract_syntax is not None
            self.ae.add_supported_context(context.abstract_syntax, [*UNCOMPRESSED_SYNTAXES, *COMPRESSED_SYNTAXES])
        self.ae.maximum_pdu_size = MAX_PDU
        self.ae.add_supported_context("1.2.840.10008.1.1")  # Verification (C-ECHO)
        self.handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_OPEN, self._on_open),
        ]
        if on_close is not None:
            self.handlers.append((evt.EVT_CONN_CLOSE, on_close))
        self.server: Any = None
        self._listening = False

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else self.config.port

    def start(self, *, listen: bool = True) -> StoreScp:
        """Listen on the configured address; with ``listen=False`` only serve connections handed to
        :meth:`accept` (a receiver process of :class:`~teleread.gateway.scp_pool.ReceiverPool`)."""
        from pynetdicom.transport import ThreadedAssociationServer

        from teleread.gateway.scp_reactor import EventDrivenRequestHandler, HandedConnectionsServer, spool_into

        server = self.ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=self.handlers,
            server_class=ThreadedAssociationServer if listen else HandedConnectionsServer,
            request_handler=EventDrivenRequestHandler,
        )
        spool_into(server, self.outbox.incoming_dir)
        if listen:
            threading.Thread(target=server.serve_forever, name="dicom-receiver", daemon=True).start()
        self.ae._servers.append(server)  # as AE.start_server does: shutdown() removes it
        self.server, self._listening = server, listen
        if listen:
            log.info("DICOM receiver listening", extra={"ae_title": self.config.ae_title, "port": self.port})
        return self

    def accept(self, sock: socket.socket, address: Any) -> None:
        """Serve an association on a connection accepted elsewhere."""
        self.server.process_request(sock, address)

    def stop(self) -> None:
        if self.server is not None:
            if self._listening:
                self.server.shutdown()
            else:  # serve_forever never ran: shutdown() would wait for it
                self.server.server_close()
                self.ae._servers.remove(self.server)
            self.server = None

    @staticmethod
    def _on_open(event: Any) -> None:
        try:  # small PDUs of many small instances must not wait for Nagle
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass

    def _on_store(self, event: Any) -> Any:
        status, reason, message = self._store(event)
        if status == SUCCESS:
            return SUCCESS
        log.log(
            logging.ERROR if status == OUT_OF_RESOURCES else logging.WARNING,
            "instance not stored" if status == OUT_OF_RESOURCES else "instance refused",
            extra={"reason": reason, "status": f"0x{status:04X}"},
        )
        if status != OUT_OF_RESOURCES:  # the modality keeps an instance told 0xA700 and retries
            self.outbox.refused("receiver", reason)
        return failure_status(status, reason, message)

    def _store(self, event: Any) -> tuple[int, str, str]:
        """(status, reason, message): the outbox holds the instance when the status is Success."""
        from teleread.gateway.scp_reactor import spool_error, spooled_digest

        path = Path(event.dataset_path)
        try:
            if spool_error(path) is not None:  # the disk filled while the dataset arrived
                return OUT_OF_RESOURCES, "GATEWAY_DISK_FULL", "the gateway's disk is full"
            try:  # the hub's own check, so what the modality is told stored the hub accepts
                info = check_dicom_instance(path)
            except InvalidInput as exc:
                return CANNOT_UNDERSTAND, exc.reason, exc.message
            except Exception:  # noqa: BLE001 - the parser's text may quote data; answer with a status
                return CANNOT_UNDERSTAND, "DICOM_UNREADABLE", "DICOM file could not be parsed"
            if info.sop_class_uid != str(event.request.AffectedSOPClassUID) or info.sop_instance_uid != str(
                event.request.AffectedSOPInstanceUID
            ):
                return MISMATCH, "IDENTIFIER_MISMATCH", "the dataset's UIDs differ from the C-STORE request's"
            study, sop, kind = info.study_instance_uid, info.sop_instance_uid, instance_kind(info.sop_class_uid)
            if path.parent == self.outbox.incoming_dir:  # spooled into the outbox: adopted, not copied
                self.outbox.adopt(
                    path, group_key=study, instance_key=sop, kind=kind, priority=self.config.priority,
                    digest=spooled_digest(path), rebuildable=True,
                )  # fmt: skip
            else:
                with open(path, "rb") as f:
                    self.outbox.receive(f, group_key=study, instance_key=sop, kind=kind, priority=self.config.priority)
        except ResourceExhausted as exc:
            return OUT_OF_RESOURCES, exc.reason, exc.message
        except Conflict as exc:
            return DUPLICATE_CONFLICT, exc.reason, exc.message
        except InvalidInput as exc:
            return CANNOT_UNDERSTAND, exc.reason, exc.message
        finally:
            if path.parent == self.outbox.incoming_dir:  # adopted, or refused: the spool file goes either way
                path.unlink(missing_ok=True)
        return SUCCESS, "", ""


def failure_status(status: int, reason: str, message: str) -> Any:
    """A C-STORE response status whose Error Comment (LO, at most 64 characters) names the problem
    by its reason code; our messages never quote the data."""
    from pydicom.dataset import Dataset

    response = Dataset()
    response.Status = status
    comment = f"{reason}: {message}" if message else reason
    response.ErrorComment = comment[:64]
    return response
