"""The gRPC error boundary: authentication, request context, JSON access logs, error mapping,
and the per-identity cap on open streams.

One server interceptor wraps every handler of the hub's asyncio server, synchronous (run in the
server's bounded thread pool) or asynchronous (run on its event loop), with a unary or a streamed
request or response. It resolves the bearer token to a principal (no endpoint is open except
health checking, reflection and sign-in, which still passes the boundary for its logs and error
mapping), puts request id, site, user and RPC into the log context, counts
the identity's open streams against its cap (``RESOURCE_EXHAUSTED`` / ``STREAM_LIMIT`` beyond it;
unary calls are never counted), and turns a :class:`TelereadError` into a status with rich
details (google.rpc.ErrorInfo: reason, domain, metadata). Anything unexpected becomes INTERNAL
carrying only the request id: exception text can hold patient data and never leaves the process.

:class:`ClientStream` reads a client stream on the loop for a handler whose work is blocking: the
work runs in the loop's executor while the messages arrive, no thread waits for a message, and a
stream with no message for its idle time ends with the handler's error.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import queue
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from teleread.auth import Authenticator, Principal
from teleread.errors import PermissionDenied, ResourceExhausted, TelereadError
from teleread.logs import log_context

log = logging.getLogger("teleread.rpc")
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("teleread_principal")
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
ANONYMOUS_METHODS = frozenset({"/teleread.v1.Auth/SignIn"})  # answered without a bearer token
DOMAIN = "teleread.v1"
T = TypeVar("T")


def current_principal() -> Principal:
    return _principal.get()


def _status_for(err: TelereadError, request_id: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=err.reason, domain=DOMAIN, metadata={**err.metadata, "request_id": request_id}
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if err.retryable:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo())
        details.append(retry)
    status = status_pb2.Status(code=getattr(code_pb2, err.code), message=err.message, details=details)
    return rpc_status.to_status(status)


def _internal(request_id: str) -> grpc.Status:
    return _status_for(TelereadError(f"internal error (request {request_id})", reason="INTERNAL"), request_id)


class StreamSlots:
    """Open streams per identity, each identity capped at ``per_identity`` (0: no cap). One
    identity at its cap is refused new streams; every other identity is untouched."""

    def __init__(self, per_identity: int) -> None:
        self.per_identity = per_identity
        self._open: dict[int, int] = {}
        self._lock = threading.Lock()

    def acquire(self, p: Principal) -> None:
        with self._lock:
            held = self._open.get(p.id, 0)
            if self.per_identity and held >= self.per_identity:
                raise ResourceExhausted(
                    f"this identity already has {held} streams open, the most one identity may have "
                    f"(max_streams_per_identity = {self.per_identity}); close one or wait for one to end",
                    reason="STREAM_LIMIT",
                    metadata={"limit": str(self.per_identity), "setting": "TELEREAD_GRPC__MAX_STREAMS_PER_IDENTITY"},
                )
            self._open[p.id] = held + 1

    def release(self, p: Principal) -> None:
        with self._lock:
            held = self._open.get(p.id, 0) - 1
            if held > 0:
                self._open[p.id] = held
            else:
                self._open.pop(p.id, None)

    def held(self, principal_id: int) -> int:
        with self._lock:
            return self._open.get(principal_id, 0)


class ServerInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, authenticator: Authenticator, slots: StreamSlots | None = None) -> None:
        self._auth = authenticator
        self.slots = slots or StreamSlots(0)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(OPEN_SERVICES):
            return handler
        streaming = bool(handler.request_streaming or handler.response_streaming)
        metadata = dict(details.invocation_metadata or ())
        wrap = _Wrapper(self._auth, self.slots, method=method, metadata=metadata, streaming=streaming)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap.unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap.stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap.unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap.stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )


class _Wrapper:
    """The boundary around one call: ``unary`` wraps a handler that answers once (a unary or a
    client-streaming call), ``stream`` one that answers with a stream (server- or bidi-streaming);
    each takes a synchronous or an asynchronous handler and returns the same kind. What they share
    is :class:`_Call`; the four handlers differ only in how they run the behaviour."""

    def __init__(
        self, auth: Authenticator, slots: StreamSlots, *, method: str, metadata: dict[str, Any], streaming: bool = False
    ) -> None:
        self._auth = auth
        self._slots = slots
        self._method = method
        self._metadata = metadata
        self.rpc = method.rsplit("/", 1)[-1]
        self.streaming = streaming  # a streamed request or response: counted against the identity's cap

    def enter(self) -> tuple[str, Principal | None]:
        """The caller's request id and principal (blocking: may read the database; None for a call
        that needs no token); a stream takes one of its identity's slots."""
        request_id = str(self._metadata.get("x-request-id") or uuid.uuid4().hex)[:64]
        if self._method in ANONYMOUS_METHODS:
            return request_id, None
        principal = self._auth.authenticate(self._metadata.get("authorization"))
        claimed_site = self._metadata.get("x-teleread-site")
        if claimed_site and principal.site_code and claimed_site != principal.site_code:
            raise PermissionDenied("the token belongs to another site than --site", reason="SITE_MISMATCH")
        if self.streaming:
            self._slots.acquire(principal)
        return request_id, principal

    def leave(self, principal: Principal | None) -> None:
        if self.streaming and principal is not None:
            self._slots.release(principal)

    # ---- answering once ----------------------------------------------------------------------
    def unary(self, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        if inspect.iscoroutinefunction(behaviour):

            async def handle_async(request: Any, context: Any) -> Any:
                async with _Call(self, context) as call:
                    with call.as_principal(await asyncio.to_thread(self.enter)):
                        return await behaviour(request, context)

            return handle_async

        def handle(request: Any, context: Any) -> Any:
            with _Call(self, context) as call:
                with call.as_principal(self.enter()):
                    return behaviour(request, context)

        return handle

    # ---- answering with a stream -------------------------------------------------------------
    def stream(self, behaviour: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def handle_async(request: Any, context: Any) -> AsyncIterator[Any]:
                async with _Call(self, context) as call:
                    with call.as_principal(await asyncio.to_thread(self.enter)):
                        async for response in behaviour(request, context):
                            yield response

            return handle_async

        def handle(request: Any, context: Any) -> Iterator[Any]:
            with _Call(self, context) as call:
                with call.as_principal(self.enter()):
                    yield from behaviour(request, context)

        return handle


class _Call:
    """What every kind of call shares, around its handler: ``with`` for a synchronous handler,
    ``async with`` for an asynchronous one (only the abort differs).

    The block runs with a request id and the RPC's name in the log context; :meth:`as_principal`
    runs the behaviour as the caller. When the block fails, the failure is logged with the call's
    duration and the call is aborted with its status: a :class:`TelereadError` as itself, anything
    else as INTERNAL with the request id only. grpc's own aborts pass untouched; a cancelled
    asyncio call is logged as CANCELLED and goes on being cancelled."""

    def __init__(self, wrapper: _Wrapper, context: Any) -> None:
        self._wrapper = wrapper
        self._context = context
        self._started = time.perf_counter()
        self.request_id = uuid.uuid4().hex  # until the caller's own is known (x-request-id)
        self._logs = log_context(request_id=self.request_id, rpc=wrapper.rpc)

    def __enter__(self) -> _Call:
        self._logs.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            status = self._failure(exc)
            if status is None:
                return
            if hasattr(self._context, "abort_with_status"):  # the synchronous server's context
                self._context.abort_with_status(status)
            else:  # a synchronous handler's context on the asyncio server
                self._context.abort(status.code, status.details, status.trailing_metadata)
        finally:
            self._logs.__exit__(None, None, None)

    async def __aenter__(self) -> _Call:
        return self.__enter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            status = self._failure(exc)
            if status is not None:
                await self._context.abort_with_status(status)
        finally:
            self._logs.__exit__(None, None, None)

    @contextmanager
    def as_principal(self, entered: tuple[str, Principal | None]) -> Iterator[None]:
        """Run the block as the caller (``entered``: :meth:`_Wrapper.enter`'s answer): its request
        id, site and user in the log context, :func:`current_principal` set; OK logged when the
        block ends well, the identity's stream slot given back however it ends."""
        self.request_id, principal = entered
        who = {} if principal is None else {"site": principal.site_code, "user": principal.name}
        try:
            with log_context(request_id=self.request_id, **who):
                token = None if principal is None else _principal.set(principal)  # None: a call without a token
                try:
                    yield
                finally:
                    if token is not None:
                        _principal.reset(token)
                log.info("rpc", extra={"status": "OK", "duration_ms": self._ms()})
        finally:
            self._wrapper.leave(principal)

    def _ms(self) -> float:
        return round((time.perf_counter() - self._started) * 1000, 2)

    def _failure(self, exc: BaseException | None) -> grpc.Status | None:
        """Log how the call failed; the status its client gets (None: nothing to answer)."""
        if exc is None:
            return None
        if isinstance(exc, asyncio.CancelledError):  # the client went away (or the server stops)
            log.info("rpc", extra={"status": "CANCELLED", "duration_ms": self._ms()})
            return None
        if not isinstance(exc, Exception) or _is_abort(exc):  # a generator closed; grpc's own abort
            return None
        if isinstance(exc, TelereadError):
            log.info("rpc", extra={"status": exc.code, "reason": exc.reason, "duration_ms": self._ms()})
            return _status_for(exc, self.request_id)
        log.error("rpc failed", exc_info=exc, extra={"status": "INTERNAL", "duration_ms": self._ms()})
        return _internal(self.request_id)


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises an exception of grpc's own (the asyncio server's AbortError, the
    # synchronous server's private _AbortError); let it through untouched.
    return isinstance(exc, (grpc.aio.AbortError, grpc.RpcError)) or type(exc).__name__ == "_AbortError"


# ---- blocking work under an asyncio handler ---------------------------------------------------
@asynccontextmanager
async def in_thread(manager: AbstractContextManager[T]) -> AsyncIterator[T]:
    """Enter and leave a blocking context manager in the loop's executor."""
    value = await asyncio.to_thread(manager.__enter__)
    try:
        yield value
    except BaseException:
        if not await asyncio.to_thread(manager.__exit__, *sys.exc_info()):
            raise
    else:
        await asyncio.to_thread(manager.__exit__, None, None, None)


class ClientStream(Generic[T]):
    """A client stream read on the event loop for a handler whose work blocks.

    A task reads the messages into a small buffer (``buffer`` messages: gRPC's flow control holds
    the rest). The handler awaits :meth:`first` and :meth:`wait`; its blocking work runs in the
    executor and takes the buffered messages with :meth:`drain`, which returns once no message
    came for ``linger_seconds``, so the thread is given back while the client is quiet. When no
    message comes for ``idle_seconds``, :meth:`first` and :meth:`wait` raise ``idle_error()``.
    """

    def __init__(
        self,
        requests: AsyncIterator[T],
        *,
        idle_seconds: float,
        idle_error: Callable[[], TelereadError],
        linger_seconds: float = 0.05,
        buffer: int = 4,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = idle_seconds
        self._idle_error = idle_error
        self._linger = linger_seconds
        self._queue: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._space = asyncio.Semaphore(buffer)
        self._arrived = asyncio.Event()
        self._ended = threading.Event()
        self._closed = threading.Event()  # the call is over: what is still buffered is not taken
        self._first: asyncio.Future[T | None] = self._loop.create_future()
        self._last_message = time.monotonic()
        self._task = self._loop.create_task(self._read(requests))

    async def _read(self, requests: AsyncIterator[T]) -> None:
        it = requests.__aiter__()
        try:
            try:
                first: T | None = await it.__anext__()
            except StopAsyncIteration:
                first = None
            self._last_message = time.monotonic()
            self._first.set_result(first)
            if first is None:
                return
            while True:
                await self._space.acquire()
                try:
                    message = await it.__anext__()
                except StopAsyncIteration:
                    return
                self._queue.put(message)
                self._last_message = time.monotonic()
                self._arrived.set()
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the call ended under the reader
            self._closed.set()
            return
        finally:
            self._ended.set()
            self._arrived.set()
            if not self._first.done():
                self._first.set_result(None)

    def _idle_left(self) -> float:
        return self._idle - (time.monotonic() - self._last_message)

    async def first(self) -> T | None:
        """The first message (None: the client sent none)."""
        done, _ = await asyncio.wait({self._first}, timeout=self._idle)
        if not done:
            raise self._idle_error()
        return self._first.result()

    async def wait(self) -> bool:
        """Until a message is buffered (True) or the client has finished sending (False)."""
        while True:
            if not self._queue.empty():
                return True
            if self._ended.is_set():
                return False
            left = self._idle_left()
            if left <= 0:
                raise self._idle_error()
            self._arrived.clear()
            if not self._queue.empty() or self._ended.is_set():
                continue
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                pass

    def drain(self) -> Iterator[T]:
        """(In a worker thread) the buffered messages, then those arriving within the linger time."""
        while not self._closed.is_set():
            try:
                if self._ended.is_set():
                    message = self._queue.get_nowait()
                else:
                    message = self._queue.get(timeout=self._linger)
            except queue.Empty:
                return
            if self._closed.is_set():  # the client went away meanwhile: stop where it stopped
                return
            try:
                self._loop.call_soon_threadsafe(self._space.release)
            except RuntimeError:  # the server's loop has closed
                return
            yield message

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def close(self) -> None:
        """The call is over (answered, failed or cancelled): stop reading and taking messages."""
        self._closed.set()
        if not self._task.done():
            self._task.cancel()
