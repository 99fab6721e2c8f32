"""The gateway's DICOM receiver: a C-STORE / C-ECHO SCP (pynetdicom) that writes every instance
into the durable outbox before it answers Success.

The receiver is two layers. The *engine* does the networking: pynetdicom's AE, association state
machine, DIMSE and service classes, behind one small interface, :class:`Receiver` (``port``,
``start``, ``accept``, ``stop``), which hands every received dataset, as a file, to its
``on_instance`` callback and answers the C-STORE with what the callback returns.
:func:`make_receiver` builds the engine that ``ScpConfig.engine`` names (the setting
``TELEREAD_GATEWAY__RECEIVER_ENGINE``):

- ``reactor`` (the default): :class:`teleread.gateway.clinic.scp_reactor.ReactorReceiver`, pynetdicom with
  an event-driven acceptor (no polling threads, large reads) that spools each dataset into the
  outbox's ``incoming/`` folder, hashed as it is written, so the outbox adopts it without a copy or
  a second read. It relies on private pynetdicom APIs, listed in that module's text: a pynetdicom
  upgrade must be checked against that list and the receiver tests.
- ``pynetdicom``: :class:`PynetdicomReceiver`, pynetdicom's stock acceptor (``AE.start_server``) and
  nothing but its public API. Datasets are received chunked (``STORE_RECV_CHUNKED_DATASET``) into
  pynetdicom's own temporary files, in the system's temporary folder (point ``TMPDIR`` at a disk
  folder where ``/tmp`` is RAM-backed), then copied into the outbox. Slower; the fallback when a
  pynetdicom upgrade breaks the reactor. Every receiver test runs on both engines.

The *store* is :class:`StoreScp`, the engine's ``on_instance``: it reads only the identifying
attributes, applies the hub's own check, lets the outbox adopt (or copy) the file and answers:

- ``0x0000`` Success once the instance is durable (a retried instance with the same bytes too);
- ``0xA700`` Out of resources when the gateway's disk is full (the sender keeps the instance);
- ``0xA900`` when the SOP class or identifiers do not match, ``0xC000`` cannot understand for
  malformed data or bad UIDs, ``0xC001`` for the same instance UID with different bytes.

Patient data never reaches the logs: pynetdicom's identifier logging is off and our log lines
name only status codes and reasons.
"""

from __future__ import annotations

import functools
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from teleread.errors import Conflict, InvalidInput, ResourceExhausted
from teleread.gateway.clinic.outbox import Identity, Outbox
from teleread.gateway.validate import check_dicom_instance, check_uid
from teleread.vocab import is_ecg

log = logging.getLogger("teleread.gateway.clinic.scp")

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
ENGINES = ("reactor", "pynetdicom")
VERIFICATION = "1.2.840.10008.1.1"


@dataclass
class ScpConfig:
    ae_title: str = "TELEREAD_GW"
    host: str = "127.0.0.1"
    port: int = 11112
    priority: str = "routine"  # for instances that do not say (a clinic can set its default)
    engine: str = "reactor"  # one of ENGINES: see the module's text


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


@dataclass(frozen=True)
class ReceivedInstance:
    """One dataset an engine received, as a file (preamble, file meta group, dataset) that the
    callback must take or copy before it returns (the engine removes it after)."""

    path: Path
    sop_class_uid: str  # as the C-STORE request names them
    sop_instance_uid: str
    digest: tuple[str, int] | None = None  # SHA-256 and size, when the engine hashed it as it wrote it
    write_error: OSError | None = None  # writing it failed (a full disk): the rest of the dataset was dropped


OnInstance = Callable[[ReceivedInstance], Any]
"""Store one received instance; return the C-STORE status (an int, or a status Dataset)."""
OnClose = Callable[[Any], None]
"""Called with pynetdicom's event when an association's connection closes."""


class Receiver(Protocol):
    """A DICOM C-STORE / C-ECHO acceptor feeding an :data:`OnInstance` callback."""

    @property
    def port(self) -> int:
        """The port it listens on (the configured one until it has started)."""
        ...

    def start(self, *, listen: bool = True) -> Receiver:
        """Listen on the configured address; with ``listen=False`` only serve connections handed
        to :meth:`accept` (a receiver process of the gateway's receiver pool)."""
        ...

    def accept(self, sock: socket.socket, address: Any) -> None:
        """Serve an association on a connection accepted elsewhere."""
        ...

    def stop(self) -> None:
        """Stop listening and close the server (associations under way end with their peers)."""
        ...


def make_receiver(
    config: ScpConfig, on_instance: OnInstance, *, spool_dir: Path | None = None, on_close: OnClose | None = None
) -> Receiver:
    """The engine ``config.engine`` names. ``spool_dir``: where the reactor writes received
    datasets (the outbox's ``incoming/``, so it can adopt them); the stock engine ignores it."""
    if config.engine == "reactor":
        from teleread.gateway.clinic.scp_reactor import ReactorReceiver

        return ReactorReceiver(config, on_instance, spool_dir=spool_dir, on_close=on_close)
    if config.engine == "pynetdicom":
        return PynetdicomReceiver(config, on_instance, on_close=on_close)
    raise InvalidInput(f"the receiver engine must be one of {', '.join(ENGINES)}", reason="BAD_SETTING")


class PynetdicomReceiver:
    """pynetdicom's stock acceptor, on its public API only: ``AE.start_server`` (or ``make_server``
    with :func:`handed_connections_server` for handed connections), datasets received chunked into
    pynetdicom's temporary files. :class:`~teleread.gateway.clinic.scp_reactor.ReactorReceiver` changes how
    its server is made and what it knows of a received file."""

    engine = "pynetdicom"

    def __init__(self, config: ScpConfig, on_instance: OnInstance, *, on_close: OnClose | None = None) -> None:
        from pynetdicom import AE, _config, evt
        from pynetdicom.presentation import StoragePresentationContexts

        _config.STORE_RECV_CHUNKED_DATASET = True  # a dataset is never whole in memory
        _config.LOG_HANDLER_LEVEL = "none"
        self.config = config
        self.on_instance = on_instance
        self.ae = AE(ae_title=config.ae_title)
        for context in StoragePresentationContexts:
            assert context.abstract_syntax is not None
            self.ae.add_supported_context(context.abstract_syntax, [*UNCOMPRESSED_SYNTAXES, *COMPRESSED_SYNTAXES])
        self.ae.maximum_pdu_size = MAX_PDU
        self.ae.add_supported_context(VERIFICATION)  # C-ECHO
        self.handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_CONN_OPEN, _no_delay),
        ]
        if on_close is not None:
            self.handlers.append((evt.EVT_CONN_CLOSE, on_close))
        self.server: Any = None
        self._listening = False

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else self.config.port

    def start(self, *, listen: bool = True) -> PynetdicomReceiver:
        self.server, self._listening = self._serve(listen), listen
        if listen:
            log.info(
                "DICOM receiver listening",
                extra={"ae_title": self.config.ae_title, "port": self.port, "engine": self.engine},
            )
        return self

    def _serve(self, listen: bool) -> Any:
        address = (self.config.host, self.config.port)
        if listen:
            return self.ae.start_server(address, block=False, evt_handlers=self.handlers)
        return self.ae.make_server(address, evt_handlers=self.handlers, server_class=handed_connections_server())

    def accept(self, sock: socket.socket, address: Any) -> None:
        self.server.process_request(sock, address)

    def stop(self) -> None:
        if self.server is not None:
            if self._listening:
                self.server.shutdown()
            else:  # serve_forever never ran: shutdown() would wait for it
                self.server.server_close()
            self.server = None

    def _received(self, event: Any) -> ReceivedInstance:
        return ReceivedInstance(
            Path(event.dataset_path),
            str(event.request.AffectedSOPClassUID),
            str(event.request.AffectedSOPInstanceUID),
        )

    def _on_store(self, event: Any) -> Any:
        return self.on_instance(self._received(event))


def _no_delay(event: Any) -> None:
    try:  # small PDUs of many small instances must not wait for Nagle
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (AttributeError, OSError):
        pass


@functools.cache
def handed_connections_server() -> type:
    """The server class for connections accepted elsewhere (pynetdicom is imported when needed)."""
    from pynetdicom.transport import ThreadedAssociationServer

    class HandedConnectionsServer(ThreadedAssociationServer):
        """pynetdicom's threaded server that neither binds nor listens: it serves the connections it
        is handed (``process_request``), as a receiver process of the gateway's receiver pool does."""

        def server_bind(self) -> None:
            """Nothing to bind: the gateway process listens."""

        def server_activate(self) -> None:
            pass

    return HandedConnectionsServer


class StoreScp:
    """The gateway's receiver: an engine (:func:`make_receiver`) whose instances go into ``outbox``."""

    def __init__(self, outbox: Outbox, config: ScpConfig, *, on_close: OnClose | None = None) -> None:
        self.outbox = outbox
        self.config = config
        self.receiver = make_receiver(config, self.store, spool_dir=outbox.incoming_dir, on_close=on_close)

    @property
    def port(self) -> int:
        return self.receiver.port

    def start(self, *, listen: bool = True) -> StoreScp:
        self.receiver.start(listen=listen)
        return self

    def accept(self, sock: socket.socket, address: Any) -> None:
        self.receiver.accept(sock, address)

    def stop(self) -> None:
        self.receiver.stop()

    def store(self, instance: ReceivedInstance) -> Any:
        """The C-STORE status of one received instance (see the module's text)."""
        status, reason, message = self._store(instance)
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

    def _store(self, instance: ReceivedInstance) -> tuple[int, str, str]:
        """(status, reason, message): the outbox holds the instance when the status is Success."""
        path = instance.path
        spooled = path.parent == self.outbox.incoming_dir  # written into the outbox: adopted, not copied
        try:
            if instance.write_error is not None:  # the disk filled while the dataset arrived
                return OUT_OF_RESOURCES, "GATEWAY_DISK_FULL", "the gateway's disk is full"
            try:  # the hub's own check, so what the modality is told stored the hub accepts
                info = check_dicom_instance(path)
            except InvalidInput as exc:
                return CANNOT_UNDERSTAND, exc.reason, exc.message
            except Exception:  # noqa: BLE001 - the parser's text may quote data; answer with a status
                return CANNOT_UNDERSTAND, "DICOM_UNREADABLE", "DICOM file could not be parsed"
            if info.sop_class_uid != instance.sop_class_uid or info.sop_instance_uid != instance.sop_instance_uid:
                return MISMATCH, "IDENTIFIER_MISMATCH", "the dataset's UIDs differ from the C-STORE request's"
            study, sop, kind = info.study_instance_uid, info.sop_instance_uid, instance_kind(info.sop_class_uid)
            if spooled:
                self.outbox.adopt(
                    path, group_key=study, instance_key=sop, kind=kind, priority=self.config.priority,
                    digest=instance.digest, rebuildable=True,
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
            if spooled:  # adopted, or refused: the spool file goes either way
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
