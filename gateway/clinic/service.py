"""``teleread gateway run`` and ``teleread gateway status``: the clinic gateway as one process.

``Gateway`` wires the durable outbox, the DICOM receiver and the forwarder: the receiver writes
instances into the outbox; a loop marks studies complete after the quiet period and drains ready
exams to the hub, most urgent first, backing off while the link or the hub is down.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc

from teleread.client import rpc_code
from teleread.errors import InvalidInput, ResourceExhausted
from teleread.gateway.clinic.forward import Forwarder, SpreadStub
from teleread.backoff import Backoff
from teleread.gateway.clinic.outbox import REASON_SUFFIX, REFUSALS_SHOWN_HOURS, SET_ASIDE_DIR, Outbox, OutboxStatus
from teleread.gateway.clinic.results import ResultsInbox, acknowledge, pending_critical
from teleread.gateway.uploader.schedule import COMPRESSION_MODES, TokenBucket, limit_rate, parse_windows
from teleread.gateway.clinic.scp import ScpConfig, StoreScp, identify
from teleread.gateway.clinic.scp_pool import ReceiverPool
from teleread.gateway.validate import resend_kind
from teleread.gateway.clinic.watch import REJECTED_DIR, WatchFolder
from teleread.settings import build, GatewaySettings, Settings
from teleread.vocab import PatientClass

log = logging.getLogger("teleread.gateway")

STALE_AFTER = dt.timedelta(hours=1)  # a study waiting longer than this needs a person


WATCH_EVERY = 1.0  # seconds between scans of the watch folder


def outbox_dir(settings: Settings) -> Path:
    return settings.gateway.outbox or (settings.data_dir / "gateway")


def watch_dir(settings: Settings) -> Path:
    return settings.gateway.watch_dir or (settings.data_dir / "watch")


def refused_files(folder: Path) -> int:
    """Files the watch folder set aside for a person (their reason files not counted)."""
    rejected = folder / REJECTED_DIR
    if not rejected.is_dir():
        return 0
    return sum(1 for p in rejected.rglob("*") if p.is_file() and not p.name.endswith(REASON_SUFFIX))


class Gateway:
    def __init__(self, settings: Settings, *, ingest: Any = None, results: Any = None) -> None:
        from teleread.client import open_channel
        from teleread.v1 import ingest_pb2_grpc, results_pb2_grpc

        self.config: GatewaySettings = settings.gateway
        if self.config.compression not in COMPRESSION_MODES:  # settings are checked before anything opens
            raise InvalidInput(f"compression must be one of {', '.join(COMPRESSION_MODES)}", reason="BAD_SETTING")
        if self.config.patient_class and self.config.patient_class not in set(PatientClass):
            raise InvalidInput(f"patient_class must be one of {', '.join(PatientClass)} or empty", reason="BAD_SETTING")
        limit = limit_rate(self.config.max_kbps, parse_windows(self.config.limit_windows))
        routine_windows = parse_windows(self.config.routine_windows)
        self.outbox = Outbox(
            outbox_dir(settings),
            backoff=Backoff(base_s=self.config.retry_base_seconds, cap_s=self.config.retry_cap_seconds),
            resend_kind=resend_kind,
        )
        self._channels: list[Any] = []
        if ingest is None:
            count = max(1, self.config.connections)
            tls = uplink_security(self.config)
            self._channels = [
                open_channel(
                    self.config.hub, token=self.config.token.get_secret_value(), own_connection=count > 1, **tls
                )
                for _ in range(count)
            ]
            stubs = [ingest_pb2_grpc.IngestStub(channel) for channel in self._channels]
            ingest = stubs[0] if count == 1 else SpreadStub(stubs)
            results = results_pb2_grpc.ResultsStub(self._channels[0])
        self.results_stub = results
        self.inbox = ResultsInbox(
            results_dir(settings),
            hook=self.config.critical_hook,
        )
        self._next_results = 0.0
        self.forwarder = Forwarder(
            self.outbox,
            ingest,
            parallel=max(1, self.config.streams, self.config.connections),
            limiter=TokenBucket(limit) if self.config.max_kbps > 0 else None,
            compression=self.config.compression,
            routine_windows=routine_windows,
            in_flight_bytes=max(0, self.config.in_flight_kib) * 1024,
            patient_class=self.config.patient_class,
        )
        self._adopt_orphans()
        scp_config = ScpConfig(
            ae_title=self.config.ae_title,
            host=self.config.dicom_host,
            port=self.config.dicom_port,
            priority=self.config.priority,
            engine=self.config.receiver_engine,
        )
        self.scp: StoreScp | ReceiverPool = (
            ReceiverPool(outbox_dir(settings), scp_config, self.config.receivers, log_level=settings.log_level)
            if self.config.receivers > 1
            else StoreScp(self.outbox, scp_config)
        )
        self.watch = WatchFolder(
            self.outbox,
            watch_dir(settings),
            settle_seconds=self.config.watch_settle_seconds,
            priority=self.config.priority,
            wait_seconds=self.config.wfdb_wait_minutes * 60,
        )
        self._next_watch = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _adopt_orphans(self) -> None:
        """Rows a power cut took back, recorded again from their DICOM files; what cannot be placed is
        set aside for a person. Never stops the gateway; on a full disk it is tried again later."""
        self._orphans_pending = True
        try:
            orphans = self.outbox.adopt_orphans(identify)
        except Exception as exc:  # noqa: BLE001 - recovery must never keep the gateway from starting
            log.error("outbox recovery failed; tried again", extra={"reason": type(exc).__name__})
            return
        if orphans:
            log.warning("outbox rows rebuilt from stored instances", extra={"count": orphans})
        self._orphans_pending = False

    def start(self) -> Gateway:
        self.scp.start()
        self._thread = threading.Thread(target=self._loop, name="gateway-forward", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        interrupted = False
        while not self._stop.is_set():
            try:
                if interrupted:  # an attempt died before recording its outcome (e.g. a full disk)
                    self.outbox.recover()
                    interrupted = False
                self.outbox.keep_reserve()
                if not self.outbox.recover_pending():  # start-up recovery waits for disk space
                    raise ResourceExhausted("the gateway's disk is full", reason="GATEWAY_DISK_FULL")
                if self._orphans_pending:
                    self._adopt_orphans()
                self._poll_results()
                self._scan_watch_folder()
                self.outbox.settle(quiet_s=self.config.quiet_seconds)
                result = self.forwarder.drain_once()
                if result is not None and result.outcome == "committed":
                    self.outbox.prune(keep_seconds=self.config.keep_sent_hours * 3600)
                if result is not None:
                    continue  # more may be due: no pause between exams
            except Exception as exc:  # never let the loop die; the outbox keeps everything
                interrupted = True
                log.error("forwarding loop error", extra={"reason": type(exc).__name__})
            self._stop.wait(self.config.poll_seconds)

    def _scan_watch_folder(self) -> None:
        if time.monotonic() < self._next_watch:
            return
        self._next_watch = time.monotonic() + WATCH_EVERY
        report = self.watch.scan_once()
        if report.taken or report.refused:
            log.info("watch folder scanned", extra={"taken": len(report.taken), "refused": len(report.refused)})

    def _poll_results(self) -> None:
        if self.results_stub is None or time.monotonic() < self._next_results:
            return
        self._next_results = time.monotonic() + self.config.results_poll_seconds
        try:
            self.inbox.poll(self.results_stub)
        except grpc.RpcError as err:  # the link is down: the cursor is kept, try again later
            log.warning("results not fetched", extra={"reason": rpc_code(err).name})

    def stop(self) -> None:
        self._stop.set()
        self.scp.stop()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for channel in self._channels:
            channel.close()
        self.outbox.close()

    def serve_forever(self) -> None:
        import signal

        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())  # a service manager's stop: finish cleanly
        self.start()
        try:
            self._stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()


def uplink_security(config: GatewaySettings) -> dict[str, Any]:
    """The TLS options of the channel to the hub. TLS is on when the hub's CA is set (mutual TLS with
    a client certificate and key); plaintext is allowed to a hub on this machine (a test set-up) or
    when ``insecure`` says so, and refused otherwise: the site token and patient data would cross the
    uplink in clear."""
    if config.tls_ca is None:
        if config.tls_cert or config.tls_key:
            raise InvalidInput(
                "a client certificate needs the hub's CA (TELEREAD_GATEWAY__TLS_CA)", reason="BAD_SETTING"
            )
        host = config.hub.rsplit(":", 1)[0].strip("[]")
        if not config.insecure and host not in ("127.0.0.1", "localhost", "::1"):
            raise InvalidInput(
                "the hub is not on this machine and no TLS is set: set TELEREAD_GATEWAY__TLS_CA (and __TLS_CERT,"
                " __TLS_KEY), or TELEREAD_GATEWAY__INSECURE=true on a private test network",
                reason="TLS_REQUIRED",
            )
        return {}
    if bool(config.tls_cert) != bool(config.tls_key):
        raise InvalidInput("mutual TLS needs both TELEREAD_GATEWAY__TLS_CERT and __TLS_KEY", reason="BAD_SETTING")
    for path in (config.tls_ca, config.tls_cert, config.tls_key):
        if path is not None and not Path(path).is_file():
            raise InvalidInput("a TLS file of the gateway's settings cannot be read", reason="BAD_SETTING")
    return {
        "ca_file": Path(config.tls_ca),
        "client_cert": Path(config.tls_cert) if config.tls_cert else None,
        "client_key": Path(config.tls_key) if config.tls_key else None,
        "server_name": config.tls_server_name or None,
    }


def needs_a_person(status: OutboxStatus, now: dt.datetime | None = None, *, refused: int = 0) -> list[str]:
    """Reasons for a non-zero exit of ``gateway status``."""
    reasons = []
    if status.set_aside:
        reasons.append(
            f"{status.set_aside} file(s) set aside by the outbox: see its {SET_ASIDE_DIR}/ folder and their reasons"
        )
    if refused:
        reasons.append(f"{refused} dropped file(s) refused: see the watch folder's {REJECTED_DIR}/ and their reasons")
    if status.by_state.get("rejected", 0):
        reasons.append(f"{status.by_state['rejected']} exam(s) refused by the hub: see the last error")
    if status.oldest_waiting_at is not None:
        age = (now or dt.datetime.now(dt.timezone.utc)) - dt.datetime.fromisoformat(status.oldest_waiting_at)
        if age > STALE_AFTER:
            reasons.append(f"the oldest waiting study has waited {int(age.total_seconds() // 60)} min")
    return reasons


def cmd_gateway_status(args: argparse.Namespace) -> int:
    settings = build(
        gateway__outbox=Path(args.outbox) if args.outbox else None,
        gateway__watch_dir=Path(args.watch_dir) if args.watch_dir else None,
    )
    box = Outbox(outbox_dir(settings))
    try:
        status = box.status()
    finally:
        box.close()
    refused = refused_files(watch_dir(settings))
    print("outbox: " + ", ".join(f"{state} {n}" for state, n in status.by_state.items()))
    if status.incomplete:
        print(f"committed incomplete: {status.incomplete} (the hub refused some of their instances)")
    print(f"bytes waiting: {status.bytes_waiting}")
    contact = f", hub last answered {status.last_contact_at}" if status.last_contact_at else ""
    print(f"link: {status.link_state}" + (f" since {status.link_since}" if status.link_since else "") + contact)
    print(f"oldest waiting study since: {status.oldest_waiting_at or '-'}")
    print(f"last error: {status.last_error or '-'}")
    print(f"watch folder: {watch_dir(settings)} ({refused} refused)")
    print(
        f"set aside: {status.set_aside}" + (f" (in {outbox_dir(settings) / SET_ASIDE_DIR})" if status.set_aside else "")
    )
    last = f" (last: {status.last_refusal})" if status.refused_recent else ""
    print(f"refused by the receiver: {status.refused_recent} in the last {REFUSALS_SHOWN_HOURS} h{last}")
    reasons = needs_a_person(status, refused=refused)
    critical = pending_critical(results_dir(settings))
    for item in critical:
        print(f"CRITICAL RESULT {item.cursor} (exam {item.exam_id}, published {item.published_at or '-'}) "
              f"not acknowledged: teleread gateway ack {item.cursor} --name ... --role ... --method phone "
              "--read-back ...")  # fmt: skip
    if critical:
        reasons.append(f"{len(critical)} critical result(s) waiting for a named person's acknowledgement")
    for reason in reasons:
        print(f"NEEDS ATTENTION: {reason}")
    return 1 if reasons else 0


def results_dir(settings: Settings) -> Path:
    return settings.gateway.results_dir or (settings.data_dir / "results")


def cmd_gateway_ack(args: argparse.Namespace) -> int:
    """``teleread gateway ack CURSOR``: a named person at the clinic acknowledges a critical result."""
    from teleread.client import open_channel
    from teleread.v1 import results_pb2_grpc

    settings = build(gateway__hub=args.hub, gateway__token=args.token)
    config = settings.gateway
    channel = open_channel(config.hub, token=config.token.get_secret_value(), **uplink_security(config))
    try:
        record = acknowledge(results_pb2_grpc.ResultsStub(channel), results_dir(settings), cursor=args.cursor,
                             name=args.name, role=args.role, method=args.method, read_back=args.read_back)  # fmt: skip
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as err:
        print(f"error: the hub refused the acknowledgement: {rpc_code(err)}: {err.details()}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    print(f"acknowledged critical result {args.cursor}; the hub's record is in {record}")
    return 0


def cmd_gateway_run(args: argparse.Namespace) -> int:
    from teleread.logs import configure_logging

    options = {}
    keys = ("outbox", "watch_dir", "ae_title", "dicom_port", "hub", "token", "quiet_seconds", "priority")
    for key in (*keys, "patient_class"):
        value = getattr(args, key, None)
        if value is not None:
            options[f"gateway__{key}"] = Path(value) if key in ("outbox", "watch_dir") else value
    settings = build(**options)
    configure_logging(settings.log_level)
    if not settings.gateway.token.get_secret_value():
        print("warning: no site token (TELEREAD_GATEWAY__TOKEN): the hub will refuse uploads", file=sys.stderr)
    try:
        gateway = Gateway(settings)
    except InvalidInput as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    gateway.serve_forever()
    return 0


def add_gateway_parser(sub: Any) -> None:
    p = sub.add_parser("gateway", help="the clinic gateway: DICOM receiver, durable outbox, store-and-forward")
    s = p.add_subparsers(dest="action", required=True)
    a = s.add_parser("run", help="receive DICOM from modalities and forward it to the hub")
    a.add_argument("--outbox", help="outbox folder (default <data dir>/gateway)")
    a.add_argument(
        "--watch-dir", dest="watch_dir", help="folder for dropped WFDB/DICOM files (default <data dir>/watch)"
    )
    a.add_argument("--ae-title", dest="ae_title")
    a.add_argument("--dicom-port", dest="dicom_port", type=int)
    a.add_argument("--hub", help="hub address host:port")
    a.add_argument("--token", help="the site's token (or TELEREAD_GATEWAY__TOKEN)")
    a.add_argument("--quiet-seconds", dest="quiet_seconds", type=float, help="study stability period")
    a.add_argument("--priority", choices=["stat", "urgent", "routine"])
    a.add_argument(
        "--patient-class", dest="patient_class", choices=[str(c) for c in PatientClass],
        help="where this clinic's patients are seen (sent with every exam)",
    )  # fmt: skip
    a.set_defaults(func=cmd_gateway_run)
    from teleread.gateway.clinic.dicom_send import add_sender_parsers

    add_sender_parsers(s)
    a = s.add_parser("status", help="outbox depth, bytes waiting, last error; exit 1 when a person is needed")
    a.add_argument("--outbox", help="outbox folder (default <data dir>/gateway)")
    a.add_argument("--watch-dir", dest="watch_dir", help="watch folder (default <data dir>/watch)")
    a.set_defaults(func=cmd_gateway_status)
    a = s.add_parser("ack", help="a named person acknowledges a critical result (name, role, method, read-back)")
    a.add_argument("cursor", type=int, help="the critical result's cursor (gateway status lists them)")
    a.add_argument("--name", required=True, help="who received it")
    a.add_argument("--role", required=True, help="their role, e.g. attending physician")
    a.add_argument("--method", required=True, choices=["phone", "in_person", "system"], help="how it reached them")
    a.add_argument("--read-back", dest="read_back", required=True, help="what they read back")
    a.add_argument("--hub", help="hub address host:port")
    a.add_argument("--token", help="the site's token (or TELEREAD_GATEWAY__TOKEN)")
    a.set_defaults(func=cmd_gateway_ack)
