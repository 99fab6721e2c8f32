"""Client-side gRPC plumbing shared by the upload, queue and results commands.

Owns: opening a channel to the hub (TLS or insecure, bearer token and extra metadata added to
every call by one interceptor, message-size and keepalive options), turning a failed call's rich
status (google.rpc ErrorInfo, BadRequest, RetryInfo, RequestInfo) into one readable line, the
retry of idempotent calls (with :class:`teleread.backoff.Backoff`, honouring the server's
RetryInfo), the connection options every client subcommand shares (``--hub``, ``--token``,
``--ca`` ...) and what a command does with them (open the channel or say why not, print a failed
call, close the channel), the watch commands' reconnecting loop, and the loud critical-result
alert. ``RetryPolicy``, ``Backoff`` and the atomic file writes (:mod:`teleread.files`) are
re-exported here for the client commands.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel

from teleread.backoff import Backoff, RetryPolicy
from teleread.settings import ClientSettings
from teleread.errors import TelereadError
from teleread.files import atomic_write_bytes as atomic_write_bytes
from teleread.files import atomic_write_text as atomic_write_text
from teleread.v1 import worklist_pb2

log = logging.getLogger("teleread.client")

DEFAULT_TIMEOUT = 30.0
"""Deadline in seconds for every unary call."""
DEFAULT_HUB = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Pings at the gRPC server's default minimum interval (5 min) so a default server never answers
# GOAWAY too_many_pings, yet a dead link under a long stream is still noticed.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 2),
)
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)
"""Codes after which repeating an idempotent call may succeed."""

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Metadata | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token, the site) to every call of every shape."""

    def __init__(self, metadata: Metadata) -> None:
        self._metadata = tuple(metadata)

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            method=details.method,
            timeout=details.timeout,
            metadata=tuple(details.metadata or ()) + self._metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
            compression=getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def worklist_changes(event: Any) -> Sequence[Any]:
    """The worklist events a Watch message carries: the changes of a ``TYPE_CHANGES`` message (asked
    for with ``change_batches``), or the message itself."""
    if event.type == worklist_pb2.WorklistEvent.TYPE_CHANGES:
        return list(event.changes)
    return (event,)


def open_channel(
    hub: str,
    *,
    token: str,
    ca_file: Path | None = None,
    server_name: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
    metadata: Metadata = (),
    own_connection: bool = False,
) -> grpc.Channel:
    """A channel to ``hub`` sending ``authorization: Bearer <token>`` (and ``metadata``) on every
    call; TLS when ``ca_file`` is given (mutual TLS when a client certificate and key are too).
    ``own_connection``: a TCP connection of its own, not shared with other channels to the same hub."""
    options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if ca_file is None:
        channel = grpc.insecure_channel(hub, options=options)
    else:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        credentials = grpc.ssl_channel_credentials(
            root_certificates=ca_file.read_bytes(),
            private_key=client_key.read_bytes() if client_key else None,
            certificate_chain=client_cert.read_bytes() if client_cert else None,
        )
        channel = grpc.secure_channel(hub, credentials, options=options)
    headers = (("authorization", f"Bearer {token}"), *metadata)
    return grpc.intercept_channel(channel, _MetadataInterceptor(headers))


def rich_status(err: grpc.RpcError) -> status_pb2.Status | None:
    """The google.rpc.Status a failed call carries, or None."""
    if not isinstance(err, grpc.Call):
        return None
    try:
        return rpc_status.from_call(err)
    except ValueError:  # details inconsistent with the status line: ignore them
        return None


def _unpack_details(status: status_pb2.Status) -> Iterator[Any]:
    for kind in (
        error_details_pb2.ErrorInfo,
        error_details_pb2.BadRequest,
        error_details_pb2.RetryInfo,
        error_details_pb2.RequestInfo,
    ):
        for detail in status.details:
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                yield message


def error_reason(err: grpc.RpcError) -> str | None:
    """The ErrorInfo reason of a failed call (e.g. ``OFFSET_MISMATCH``), or None."""
    status = rich_status(err)
    if status is None:
        return None
    for detail in _unpack_details(status):
        if isinstance(detail, error_details_pb2.ErrorInfo):
            return str(detail.reason)
    return None


def retry_delay_hint(err: grpc.RpcError) -> float | None:
    """The server's RetryInfo delay in seconds, or None."""
    status = rich_status(err)
    for detail in _unpack_details(status) if status is not None else ():
        if isinstance(detail, error_details_pb2.RetryInfo):
            return float(detail.retry_delay.ToTimedelta().total_seconds())
    return None


def rpc_code(err: grpc.RpcError) -> grpc.StatusCode:
    code = err.code() if isinstance(err, grpc.Call) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def describe_rpc_error(err: grpc.RpcError) -> str:
    """One readable line: code, message, ErrorInfo reason and metadata, BadRequest field
    violations, retry delay and request id when the server sent them."""
    code = rpc_code(err)
    details = err.details() if isinstance(err, grpc.Call) else None
    parts = [f"{code.name}: {details or 'no details'}"]
    status = rich_status(err)
    for detail in _unpack_details(status) if status is not None else ():
        if isinstance(detail, error_details_pb2.ErrorInfo):
            extra = "".join(f" {k}={v}" for k, v in sorted(detail.metadata.items()))
            parts.append(f"[reason={detail.reason}{extra}]")
        elif isinstance(detail, error_details_pb2.BadRequest):
            parts.extend(f"[{v.field}: {v.description}]" for v in detail.field_violations)
        elif isinstance(detail, error_details_pb2.RetryInfo):
            delay = detail.retry_delay.ToTimedelta().total_seconds()
            parts.append(f"[retry after {delay:g}s]")
        elif isinstance(detail, error_details_pb2.RequestInfo) and detail.request_id:
            parts.append(f"[request_id={detail.request_id}]")
    return " ".join(parts)


def call_with_retry(
    call: Callable[[], Any],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    what: str = "call",
) -> Any:
    """Run an idempotent unary call, repeating it after retryable failures."""
    backoff = Backoff(policy)
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            delay = backoff.next_delay(retry_delay_hint(err))
            if rpc_code(err) not in RETRYABLE_CODES or delay is None:
                raise
            log.info("retrying %s", what, extra={"status": rpc_code(err).name})
            sleep(delay)


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """The options every client subcommand shares."""
    group = parser.add_argument_group("connection")
    group.add_argument("--hub", default=None, help=f"hub address (default: $TELEREAD_HUB or {DEFAULT_HUB})")
    group.add_argument("--token", default=None, help="bearer token (default: $TELEREAD_TOKEN)")
    group.add_argument("--ca", type=Path, default=None, help="CA certificate (PEM): use TLS")
    group.add_argument("--cert", type=Path, default=None, help="client certificate (mutual TLS)")
    group.add_argument("--key", type=Path, default=None, help="client private key (mutual TLS)")
    group.add_argument("--server-name", default=None, help="TLS server name override")
    group.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="deadline of each call, seconds")


def session_file(client: ClientSettings | None = None) -> Path:
    """Where ``teleread login`` keeps the signed-in person's session (readable by its user only)."""
    if client is not None and client.session_file is not None:
        return client.session_file
    return Path.home() / ".config" / "teleread" / "session.json"  # elsewhere: TELEREAD_SESSION_FILE


def saved_session(client: ClientSettings | None = None) -> dict[str, str] | None:
    """The session ``teleread login`` saved ({"hub", "token", "user"}), or None."""
    path = session_file(client)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str):
        return None
    return {k: str(v) for k, v in data.items()}


def connect(args: argparse.Namespace, *, metadata: Metadata = ()) -> grpc.Channel:
    """Open the channel the connection options describe (token and hub may come from the
    client settings the CLI read once: TELEREAD_TOKEN, TELEREAD_HUB; else from the session
    ``teleread login`` saved)."""
    client: ClientSettings = getattr(args, "client_settings", None) or ClientSettings.model_construct()
    token = args.token or client.token.get_secret_value()
    saved = None if token else saved_session(client)
    if saved is not None:
        token = saved["token"]
    if not token:
        raise TelereadError(
            "no token: pass --token, set TELEREAD_TOKEN or sign in with `teleread login`", reason="NO_TOKEN"
        )
    hub = args.hub or client.hub or (saved or {}).get("hub") or DEFAULT_HUB
    return open_channel(
        hub,
        token=token,
        ca_file=args.ca,
        server_name=args.server_name,
        client_cert=args.cert,
        client_key=args.key,
        metadata=metadata,
    )


def print_error(message: str) -> None:
    """Write one error line to stderr (our own text or :func:`describe_rpc_error`)."""
    print(f"error: {message}", file=sys.stderr)


def connect_or_explain(args: argparse.Namespace, *, metadata: Metadata = ()) -> grpc.Channel | None:
    """:func:`connect`, or None after printing why the connection options open no channel (no
    token, an unreadable TLS file): a local problem, the command exits 2."""
    try:
        return connect(args, metadata=metadata)
    except TelereadError as err:
        print_error(str(err))
    except OSError as err:
        print_error(f"cannot read a TLS file ({type(err).__name__})")
    return None


def rpc_command(
    handler: Callable[[argparse.Namespace, grpc.Channel], int],
) -> Callable[[argparse.Namespace], int]:
    """Wrap a subcommand handler: open the channel, close it after, and turn an RPC or domain
    error into a printed line and exit code 1 (2 for a local usage problem)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        channel = connect_or_explain(args)
        if channel is None:
            return 2
        try:
            return handler(args, channel)
        except grpc.RpcError as err:
            print_error(describe_rpc_error(err))
            return 1
        except TelereadError as err:
            print_error(str(err))
            return 1
        finally:
            channel.close()

    return run


def watch_with_reconnect(
    open_stream: Callable[[], Any],
    follow: Callable[[Any, Callable[[], None]], bool],
    *,
    console: Console,
    what: str,
) -> int:
    """Run a watch command: ``follow(stream, progressed)`` prints one stream that ``open_stream()``
    opened and returns True once the requested output is complete (exit code 0). A stream that
    ends, or is cut with a retryable code, is cancelled and opened again after a capped backoff
    (the interruption printed dimly); ``follow`` calls ``progressed()`` when the next cut may start
    the backoff again. A non-retryable failure is raised, and so is giving up (``WATCH_FAILED``)."""
    backoff = Backoff(RetryPolicy(max_total_seconds=None))
    while True:
        stream = open_stream()
        try:
            if follow(stream, backoff.reset):
                return 0
            failure = "stream ended"
        except grpc.RpcError as err:
            if rpc_code(err) not in RETRYABLE_CODES:
                raise
            failure = describe_rpc_error(err)
        finally:
            stream.cancel()
        delay = backoff.next_delay()
        if delay is None:
            raise TelereadError(f"{what} kept failing; giving up", reason="WATCH_FAILED")
        console.print(f"[dim]watch interrupted ({escape(failure)}); reconnecting[/]")
        time.sleep(delay)


def ring_alert(console: Console, message: str) -> None:
    """A loud red banner and the terminal bell: a critical exam or result needs action now."""
    console.print(Panel(escape(message), title="CRITICAL", style="bold white on red"))
    console.file.write("\a")
    console.file.flush()
