"""The ``reactor`` receiver engine: pynetdicom's state machine and handlers, without the polling.

pynetdicom 3.0 runs two threads per association, and both poll: the DUL reactor sleeps
``_run_loop_delay`` whenever it has nothing to do (1 ms by default), and the association reactor
sleeps 1 ms before every look at its DIMSE queue. A C-STORE therefore waits for up to two sleeps
on its way in and one on its way out, and an open association keeps a core busy with wake-ups when
the delay is made short. Its socket is read 4 KiB per ``recv`` call, so a 1 MiB PDU costs 256
Python-level reads.

This module keeps pynetdicom's code for everything that matters (PDU decoding, the DUL state
machine, DIMSE, the service classes and our event handlers) and changes only how the threads wait:

- the DUL thread blocks in ``select`` on the association's socket and on a wake-up socket that
  is written whenever a primitive is queued for it to send (``send_pdu``) or it is told to stop;
- the association thread blocks on an ``Event`` that the DUL thread sets after every event it
  has processed (a decoded DIMSE message, a release or abort request);
- PDUs are read with ``recv_into`` into one buffer, up to 256 KiB a call;
- a received dataset is written unbuffered to a :class:`SpoolFile` that hashes it on the way and
  starts the disk write-back every 256 KiB, so the outbox neither reads it again to hash it nor
  waits for all of it in the final fsync.

Both waits have a bounded timeout (``IDLE_WAIT_S``), so the ARTIM and idle timers, and a stop
request, are still noticed when nothing arrives. The classes are swapped in on each accepted
association by :class:`EventDrivenRequestHandler` (``AE.make_server(request_handler=...)``), so
the requestor side and any other AE in the process keep pynetdicom's own behaviour.

Received datasets are spooled (``STORE_RECV_CHUNKED_DATASET``) into the server's ``spool_dir``
when it has one (:func:`spool_into`), so the outbox can adopt the file by linking it instead of
copying it, and a large object never lands in a RAM-backed ``/tmp``.

:class:`ReactorReceiver` is this engine behind the receiver interface of :mod:`teleread.gateway.clinic.scp`
(``TELEREAD_GATEWAY__RECEIVER_ENGINE=reactor``, the default); ``pynetdicom`` selects the stock
acceptor, which uses none of what follows.

**What a pynetdicom upgrade needs.** pynetdicom is pinned (``pynetdicom==3.0.4`` in
``pyproject.toml``). This engine relies on these private or undocumented parts of it, so before an
upgrade compare each with the new release and run ``tests/test_gateway_scp.py``,
``tests/test_gateway_scp_reactor.py`` and ``tests/test_gateway_compressed.py`` (both engines) and
the fault suite; if the reactor cannot follow, set the engine to ``pynetdicom`` meanwhile:

- ``DULServiceProvider.run_reactor`` (replaced by :meth:`EventDrivenDUL.run_reactor`, a copy of its
  loop) and what that loop uses: ``_run_loop_delay``, ``_kill_thread``, ``_idle_timer`` (``start``,
  ``restart``), ``artim_timer.expired``, ``event_queue``, ``state_machine.do_action`` and
  ``current_state``, ``_process_recv_primitive()``, ``_is_transport_event()``, ``assoc``,
  ``socket``; the overridden ``send_pdu``, ``kill_dul``, ``stop_dul``; and ``threading.Thread``'s
  private ``_target``, rebound with ``pynetdicom.utils.make_target`` because the class is swapped
  after the thread was created.
- ``Association._run_reactor`` (replaced by :meth:`EventDrivenAssociation._run_reactor`, a copy of
  the acceptor's loop) and what it uses: ``_kill``, ``_is_paused``, ``_reactor_checkpoint``,
  ``_dul_ready``, ``_serve_request(msg, context_id)``, ``dimse.get_msg(block=False)``,
  ``acse.is_release_requested``/``send_release``/``is_aborted``, ``dul.receive_pdu(wait=False)``,
  ``dul.idle_timer_expired()``, ``network_timeout_response``, ``_server`` and ``kill``; and
  ``evt.trigger`` for ``EVT_RELEASED`` / ``EVT_ABORTED``.
- ``RequestHandler._create_association`` (extended to swap the classes in), and
  ``AE.make_server`` passing ``request_handler`` through to ``AssociationServer``.
- ``AssociationSocket.recv`` (replaced by :meth:`FastAssociationSocket.recv`) and its ``socket``.
- The chunked C-STORE write in ``dimse_messages.DIMSEMessage.decode_msg``: the module globals
  ``NamedTemporaryFile``, ``create_file_meta`` and ``write_file_meta_info`` (replaced by
  :func:`spool_into`), the call ``NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")``,
  128 zero bytes and ``DICM`` then the file meta written to it, then the fragments with
  ``write(data[1:])`` and ``file.flush()``; and the service class unlinking the file after the
  handler (best effort, so a file the outbox already took is fine).
- ``pdu.A_ABORT_RQ`` (``source``, ``reason_diagnostic``, ``encode``), sent when the loop fails.
- ``AE._servers``, appended to as ``AE.start_server`` does so that ``shutdown`` can remove it.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, NamedTuple

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from teleread.files import Hasher
from teleread.gateway.clinic.scp import (
    OnClose,
    OnInstance,
    PynetdicomReceiver,
    ReceivedInstance,
    ScpConfig,
    handed_connections_server,
)

IDLE_WAIT_S = 0.05  # the longest either thread sleeps without a reason to wake (timers, stop requests)
RECV_CHUNK = 256 * 1024
MAX_PREALLOC = 2 * 1024 * 1024  # a peer's PDU length is not trusted for one big allocation

_original_temp_file = tempfile.NamedTemporaryFile
_libc: Any = None
SYNC_FILE_RANGE_WRITE = 2


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range to disk now (Linux ``sync_file_range``, no wait), so
    the fsync that makes the object durable finds most of it on disk already."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(None, use_errno=True)
            fn = lib.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
            _libc = fn
        except (OSError, AttributeError):  # not Linux: the fsync alone does it
            _libc = False
    if _libc:
        _libc(fd, offset, length, SYNC_FILE_RANGE_WRITE)


class SpoolFile:
    """The file a received dataset is written to: unbuffered, hashed as it is written, its pages
    sent to disk as they arrive. It offers what pynetdicom uses of a ``NamedTemporaryFile``
    (``name``, ``write``, ``file.flush``, ``close``)."""

    WRITEBACK_EVERY = 256 * 1024

    def __init__(self, directory: str, suffix: str) -> None:
        fd, self.name = tempfile.mkstemp(suffix=suffix, dir=directory)
        self.file = os.fdopen(fd, "wb", buffering=0)
        self.hasher = Hasher()
        self.error: OSError | None = None
        self._unsynced_from = 0
        _spooled[self.name] = self

    def write(self, data: Any) -> int:
        """Write ``data``; a failed write (a full disk) is kept in ``error`` and the rest of the
        dataset is dropped, so the association lives on and the handler answers 0xA700."""
        view = memoryview(data)
        if self.error is not None:
            return len(view)
        written = 0
        try:
            while written < len(view):  # a raw file may write less than asked
                written += self.file.write(view[written:]) or 0
        except OSError as exc:
            self.error = exc
            with contextlib.suppress(OSError):
                os.ftruncate(self.file.fileno(), 0)  # give the space back at once
            return len(view)
        self.hasher.update(view)
        if self.size - self._unsynced_from >= self.WRITEBACK_EVERY:
            _start_writeback(self.file.fileno(), self._unsynced_from, self.size - self._unsynced_from)
            self._unsynced_from = self.size
        return written

    @property
    def size(self) -> int:
        """Bytes written (and hashed) so far."""
        return self.hasher.size

    def close(self) -> None:
        self.file.close()

    def __del__(self) -> None:  # an association aborted mid-dataset: its partial file goes too
        if not self.file.closed:
            self.file.close()
            with contextlib.suppress(OSError):
                os.unlink(self.name)

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_spooled: weakref.WeakValueDictionary[str, SpoolFile] = weakref.WeakValueDictionary()


def spool_error(path: Path) -> OSError | None:
    """The write error of a dataset this process spooled, if writing it failed."""
    spool = _spooled.get(os.fspath(path))
    return spool.error if spool is not None else None


def spooled_digest(path: Path) -> tuple[str, int] | None:
    """The SHA-256 and size of a dataset as it was spooled, if this process spooled it and
    nothing else has written to it since (its size on disk is what was hashed)."""
    spool = _spooled.get(os.fspath(path))
    if spool is None or spool.file.closed:
        return None
    try:
        if os.fstat(spool.file.fileno()).st_size != spool.size:
            return None
    except OSError:
        return None
    return spool.hasher.hexdigest(), spool.size


def _spooling_temp_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's ``NamedTemporaryFile`` for a received dataset: a :class:`SpoolFile` in the spool
    directory of the server whose association is decoding it (the DUL thread), else pynetdicom's own."""
    if "dir" not in kwargs:
        dul = threading.current_thread()
        assoc = getattr(dul, "_assoc", None) if isinstance(dul, DULServiceProvider) else None
        spool = getattr(getattr(assoc, "_server", None), "spool_dir", None)
        if spool is not None:
            return SpoolFile(os.fspath(spool), kwargs.get("suffix", ".dcm"))
    return _original_temp_file(*args, **kwargs)


class SpoolMeta(NamedTuple):
    """The file meta group pynetdicom writes at the head of a spooled dataset, as plain values."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION

    def encode(self) -> bytes:
        """Group 0002 in explicit VR little endian, byte for byte what pydicom's
        ``write_file_meta_info(create_file_meta(...))`` writes (a test holds it to that)."""
        body = b"".join(
            (
                _element(0x0001, b"OB", b"\x00\x01"),
                _element(0x0002, b"UI", _ui(self.sop_class_uid)),
                _element(0x0003, b"UI", _ui(self.sop_instance_uid)),
                _element(0x0010, b"UI", _ui(self.transfer_syntax)),
                _element(0x0012, b"UI", _ui(self.implementation_uid)),
                _element(0x0013, b"SH", _padded(self.implementation_version.encode("ascii"), b" ")),
            )
        )
        return _element(0x0000, b"UL", struct.pack("<I", len(body))) + body


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _ui(uid: str) -> bytes:
    return _padded(str(uid).encode("ascii"), b"\0")


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<HI", 0, len(value)) + value
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


_original_create_file_meta = dimse_messages.create_file_meta
_original_write_file_meta_info = dimse_messages.write_file_meta_info


def _create_file_meta(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's file meta of a received dataset: plain values when it goes to a :class:`SpoolFile`
    (pydicom's dataset and its validation cost ~1 ms an instance), else pynetdicom's own."""
    if args or set(kwargs) != {"sop_class_uid", "sop_instance_uid", "transfer_syntax"}:
        return _original_create_file_meta(*args, **kwargs)
    return SpoolMeta(str(kwargs["sop_class_uid"]), str(kwargs["sop_instance_uid"]), str(kwargs["transfer_syntax"]))


def _write_file_meta_info(fp: Any, file_meta: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(file_meta, SpoolMeta):
        if isinstance(fp, SpoolFile):
            fp.write(file_meta.encode())
            return
        # a dataset another AE of this process receives (the stock engine): pydicom's meta, as before
        file_meta = _original_create_file_meta(
            sop_class_uid=UID(file_meta.sop_class_uid),
            sop_instance_uid=UID(file_meta.sop_instance_uid),
            transfer_syntax=UID(file_meta.transfer_syntax),
        )
    _original_write_file_meta_info(fp, file_meta, *args, **kwargs)


def spool_into(server: Any, directory: Path) -> None:
    """Received datasets of ``server``'s associations are written under ``directory``."""
    server.spool_dir = Path(directory)
    dimse_messages.NamedTemporaryFile = _spooling_temp_file  # type: ignore[attr-defined]
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[attr-defined]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[attr-defined]


class FastAssociationSocket(AssociationSocket):
    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` (fewer if the peer closes), as pynetdicom's ``recv`` but in large reads."""
        sock = self.socket
        assert sock is not None
        if nr_bytes > MAX_PREALLOC:  # an implausible PDU length: grow as the bytes really arrive
            out = bytearray()
            while len(out) < nr_bytes:
                block = sock.recv(min(RECV_CHUNK, nr_bytes - len(out)))
                if not block:
                    break
                out += block
            return out
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], min(RECV_CHUNK, nr_bytes - got))
            if not n:
                del view
                del buf[got:]
                return buf
            got += n
        return buf


class EventDrivenDUL(DULServiceProvider):
    """The DUL reactor, waiting in ``select`` instead of sleeping (see the module's text)."""

    _wake_r: socket.socket
    _wake_w: socket.socket

    def _init_wake(self) -> None:
        # Thread.__init__ bound the target to pynetdicom's run_reactor before the class was swapped
        self._target = make_target(self.run_reactor)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # the pipe is full (a wake-up is already pending) or the reactor has ended
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
            while self.is_alive():
                time.sleep(self._run_loop_delay)
            return True
        return False

    def _wait_for_work(self) -> None:
        sock = getattr(self.socket, "socket", None)
        try:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            readable = [self._wake_r] if sock is None or sock.fileno() < 0 else [self._wake_r, sock]
            ready, _, _ = select.select(readable, [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # the socket was closed under us: the next look reports it
            time.sleep(self._run_loop_delay)
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:
                pass

    def run_reactor(self) -> None:
        """pynetdicom's ``DULServiceProvider.run_reactor``, with the idle sleep replaced."""
        try:
            self._run_reactor_waiting()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self.assoc._reactor_wake.set()  # type: ignore[attr-defined]

    def _run_reactor_waiting(self) -> None:
        self._idle_timer.start()
        wake_assoc: threading.Event = self.assoc._reactor_wake  # type: ignore[attr-defined]
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if idle:
                self._wait_for_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():  # encode and send (queued by the state machine)
                    pass
                elif self._is_transport_event():  # receive and decode a PDU
                    self._idle_timer.restart()
            except Exception:  # noqa: BLE001 - as pynetdicom: abort the association, never crash the server
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                try:
                    self.socket.send(abort_pdu.encode())  # type: ignore[union-attr]
                except Exception:  # noqa: BLE001 - the connection may be gone already
                    pass
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except Exception:  # queue.Empty
                idle = True
                continue
            self.state_machine.do_action(event)
            wake_assoc.set()  # a DIMSE message, a release or an abort may be waiting for the association
            idle = False


class EventDrivenAssociation(Association):
    """An acceptor whose reactor waits for the DUL's signal instead of sleeping 1 ms a loop."""

    _reactor_wake: threading.Event

    def kill(self) -> None:
        self._reactor_wake.set()
        super().kill()

    def _run_reactor(self) -> None:
        """pynetdicom's ``Association._run_reactor`` (acceptor), with the 1 ms sleep replaced."""
        self._is_paused = False
        served = False
        while not self._kill:
            if not served:  # after a message, look again at once: another may be queued
                self._reactor_wake.wait(IDLE_WAIT_S)
            self._reactor_wake.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            served = bool(msg)
            if msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class EventDrivenRequestHandler(RequestHandler):
    """pynetdicom's request handler, making each accepted association event-driven."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.__class__ = EventDrivenAssociation
        assoc._reactor_wake = threading.Event()  # type: ignore[attr-defined]
        dul = assoc.dul
        dul.__class__ = EventDrivenDUL
        dul._init_wake()  # type: ignore[attr-defined]
        if type(dul.socket) is AssociationSocket:
            dul.socket.__class__ = FastAssociationSocket
        return assoc


class ReactorReceiver(PynetdicomReceiver):
    """The receiver interface over this engine: each association event-driven, each dataset
    spooled into ``spool_dir`` (hashed as it is written) when one is given."""

    engine = "reactor"

    def __init__(
        self,
        config: ScpConfig,
        on_instance: OnInstance,
        *,
        spool_dir: Path | None = None,
        on_close: OnClose | None = None,
    ) -> None:
        super().__init__(config, on_instance, on_close=on_close)
        self.spool_dir = spool_dir

    def _serve(self, listen: bool) -> Any:
        server = self.ae.make_server(
            (self.config.host, self.config.port),
            evt_handlers=self.handlers,
            server_class=ThreadedAssociationServer if listen else handed_connections_server(),
            request_handler=EventDrivenRequestHandler,
        )
        if self.spool_dir is not None:
            spool_into(server, self.spool_dir)
        if listen:
            threading.Thread(target=server.serve_forever, name="dicom-receiver", daemon=True).start()
            self.ae._servers.append(server)  # as AE.start_server does: shutdown() removes it
        return server

    def _received(self, event: Any) -> ReceivedInstance:
        received = super()._received(event)
        return dataclasses.replace(
            received, digest=spooled_digest(received.path), write_error=spool_error(received.path)
        )
