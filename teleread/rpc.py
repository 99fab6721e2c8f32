"""The gRPC error boundary: authentication, request context, JSON access logs, error mapping.

One server interceptor wraps every handler. It resolves the bearer token to a principal (no
endpoint is open except health checking and reflection), puts request id, site, user and RPC into
the log context, and turns a :class:`TelereadError` into a status with rich details
(google.rpc.ErrorInfo: reason, domain, metadata). Anything unexpected becomes INTERNAL carrying
only the request id: exception text can hold patient data and never leaves the process.
"""

from __future__ import annotations

import contextvars
import logging
import time
import uuid
from typing import Any, Callable, Iterator

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from teleread.auth import Authenticator, Principal
from teleread.errors import PermissionDenied, TelereadError
from teleread.logs import log_context

log = logging.getLogger("teleread.rpc")
_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("teleread_principal")
OPEN_SERVICES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
DOMAIN = "teleread.v1"


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


class ServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._auth = authenticator

    def intercept_service(self, continuation: Callable[[Any], Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method
        if method.startswith(OPEN_SERVICES):
            return handler
        metadata = dict(details.invocation_metadata or ())
        wrap = _Wrapper(self._auth, method=method, metadata=metadata)
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
    def __init__(self, auth: Authenticator, *, method: str, metadata: dict[str, Any]) -> None:
        self._auth = auth
        self._method = method
        self._metadata = metadata
        self._rpc = method.rsplit("/", 1)[-1]

    def _enter(self) -> tuple[str, Principal]:
        request_id = str(self._metadata.get("x-request-id") or uuid.uuid4().hex)[:64]
        principal = self._auth.authenticate(self._metadata.get("authorization"))
        claimed_site = self._metadata.get("x-teleread-site")
        if claimed_site and principal.site_code and claimed_site != principal.site_code:
            raise PermissionDenied("the token belongs to another site than --site", reason="SITE_MISMATCH")
        return request_id, principal

    def _finish(
        self, context: grpc.ServicerContext, started: float, request_id: str, exc: BaseException | None
    ) -> None:
        code = "OK"
        if isinstance(exc, TelereadError):
            code = exc.code
            log.info(
                "rpc",
                extra={
                    "status": code,
                    "reason": exc.reason,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            context.abort_with_status(_status_for(exc, request_id))
        elif exc is not None:
            log.error(
                "rpc failed",
                exc_info=exc,
                extra={"status": "INTERNAL", "duration_ms": round((time.perf_counter() - started) * 1000, 2)},
            )
            context.abort_with_status(_internal(request_id))
        else:
            log.info("rpc", extra={"status": code, "duration_ms": round((time.perf_counter() - started) * 1000, 2)})

    def unary(
        self, behaviour: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            started = time.perf_counter()
            request_id = uuid.uuid4().hex
            with log_context(request_id=request_id, rpc=self._rpc):
                try:
                    request_id, principal = self._enter()
                    with log_context(request_id=request_id, site=principal.site_code, user=principal.name):
                        token = _principal.set(principal)
                        try:
                            response = behaviour(request, context)
                        finally:
                            _principal.reset(token)
                        self._finish(context, started, request_id, None)
                        return response
                except Exception as exc:  # noqa: BLE001 - the error boundary
                    if _is_abort(exc):
                        raise
                    self._finish(context, started, request_id, exc)

        return handle

    def stream(
        self, behaviour: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        def handle(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            started = time.perf_counter()
            request_id = uuid.uuid4().hex
            with log_context(request_id=request_id, rpc=self._rpc):
                try:
                    request_id, principal = self._enter()
                    with log_context(request_id=request_id, site=principal.site_code, user=principal.name):
                        token = _principal.set(principal)
                        try:
                            yield from behaviour(request, context)
                        finally:
                            _principal.reset(token)
                        self._finish(context, started, request_id, None)
                except GeneratorExit:
                    raise
                except Exception as exc:  # noqa: BLE001 - the error boundary
                    if _is_abort(exc):
                        raise
                    self._finish(context, started, request_id, exc)

        return handle


def _is_abort(exc: BaseException) -> bool:
    # context.abort raises a bare Exception subclass private to grpc; let it through untouched.
    return type(exc).__name__ == "_AbortError" or isinstance(exc, grpc.RpcError)
