"""The station's one way to the hub: its gRPC API, called as the signed-in person.

One ``grpc.aio`` channel per station process; each call carries the person's session token as its
bearer token, so the hub applies the same tenancy, specialty and claim rules to a reader in the
browser as to the command line. A failed call becomes :class:`HubError` with the gRPC code, the
ErrorInfo reason and the hub's message (which never holds patient data); the station passes it
to the browser as a JSON error with a matching HTTP status.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from google.rpc import error_details_pb2, status_pb2

from teleread.client import CHANNEL_OPTIONS, worklist_changes
from teleread.v1 import auth_pb2, auth_pb2_grpc, common_pb2, worklist_pb2, worklist_pb2_grpc

UNARY_TIMEOUT = 15.0
PDF_TIMEOUT = 60.0  # a printed report rendered on its first fetch
MAX_PDF_BYTES = 32 * 1024 * 1024
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


class HubError(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(f"{code.name}: {message} ({reason})")
        self.code = code
        self.reason = reason
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 502)

    @classmethod
    def of(cls, err: grpc.RpcError) -> HubError:
        if not isinstance(err, grpc.aio.AioRpcError):
            return cls(grpc.StatusCode.UNKNOWN, "UNKNOWN", "the hub's answer could not be read")
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE:
            details = "the hub cannot be reached; try again in a moment"
        return cls(code, _reason(err) or code.name, details or code.name)


def _reason(err: grpc.aio.AioRpcError) -> str | None:
    """The google.rpc.ErrorInfo reason in the call's trailing metadata (the asyncio client's
    error carries the status details there, as the synchronous one does)."""
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return str(info.reason)
    return None


def as_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: field names as in the .proto, enums by name, timestamps as
    RFC 3339 strings, default values left out."""
    return MessageToDict(message, preserving_proto_field_name=True)


class HubClient:
    def __init__(
        self,
        address: str,
        *,
        ca_file: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        server_name: str = "",
    ) -> None:
        options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
        if ca_file is None:
            self._channel = grpc.aio.insecure_channel(address, options=options)
        else:
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=ca_file.read_bytes(),
                private_key=client_key.read_bytes() if client_key else None,
                certificate_chain=client_cert.read_bytes() if client_cert else None,
            )
            self._channel = grpc.aio.secure_channel(address, credentials, options=options)
        self._auth = auth_pb2_grpc.AuthStub(self._channel)
        self._worklist = worklist_pb2_grpc.WorklistStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    @staticmethod
    def _meta(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    async def _unary(self, method: Any, request: Message, token: str | None) -> Any:
        try:
            return await method(request, timeout=UNARY_TIMEOUT, metadata=self._meta(token) if token else ())
        except grpc.RpcError as err:
            raise HubError.of(err) from None

    # ---- sign-in -----------------------------------------------------------------------------
    async def sign_in(self, user: str, password: str) -> auth_pb2.Session:
        return await self._unary(
            self._auth.SignIn, auth_pb2.SignInRequest(user=user, password=password, client="station"), None
        )

    async def renew_session(self, token: str) -> auth_pb2.Session:
        return await self._unary(self._auth.RenewSession, auth_pb2.RenewSessionRequest(), token)

    async def sign_out(self, token: str) -> None:
        await self._unary(self._auth.SignOut, auth_pb2.SignOutRequest(), token)

    # ---- the queue -----------------------------------------------------------------------------
    async def watch(self, token: str) -> AsyncIterator[worklist_pb2.WorklistEvent]:
        """The reader's worklist: a snapshot, its end marker, then every change, until cancelled."""
        call = self._worklist.Watch(
            worklist_pb2.WatchWorklistRequest(snapshot_batches=True, change_batches=True), metadata=self._meta(token)
        )
        try:
            async for message in call:
                for event in worklist_changes(message):
                    yield event
        except grpc.RpcError as err:
            raise HubError.of(err) from None
        finally:
            call.cancel()

    async def claim_next(self, token: str) -> worklist_pb2.Claim | None:
        try:
            return await self._unary(self._worklist.ClaimNext, worklist_pb2.ClaimNextRequest(), token)
        except HubError as err:
            if err.code == grpc.StatusCode.NOT_FOUND and err.reason in ("QUEUE_EMPTY", "NO_EXAM"):
                return None
            raise

    async def claim(self, token: str, exam_id: str, *, for_amendment: bool = False) -> worklist_pb2.Claim:
        request = worklist_pb2.ClaimExamRequest(exam_id=exam_id, for_amendment=for_amendment)
        return await self._unary(self._worklist.ClaimExam, request, token)

    async def renew(self, token: str, exam_id: str, fence: int) -> worklist_pb2.Claim:
        request = worklist_pb2.RenewClaimRequest(exam_id=exam_id, fence=fence)
        return await self._unary(self._worklist.RenewClaim, request, token)

    async def release(self, token: str, exam_id: str, fence: int) -> None:
        await self._unary(
            self._worklist.ReleaseClaim, worklist_pb2.ReleaseClaimRequest(exam_id=exam_id, fence=fence), token
        )

    async def details(self, token: str, exam_id: str) -> worklist_pb2.ExamDetails:
        return await self._unary(
            self._worklist.GetExamDetails, worklist_pb2.GetExamDetailsRequest(exam_id=exam_id), token
        )

    async def ecg_waveform(self, token: str, exam_id: str) -> worklist_pb2.EcgWaveform:
        return await self._unary(
            self._worklist.GetEcgWaveform, worklist_pb2.GetEcgWaveformRequest(exam_id=exam_id), token
        )

    async def statements(self, token: str) -> worklist_pb2.StatementLibrary:
        return await self._unary(self._worklist.ListStatements, worklist_pb2.ListStatementsRequest(), token)

    async def save(
        self,
        token: str,
        exam_id: str,
        fence: int,
        *,
        text: str,
        impression: str,
        critical: bool,
        ecg: dict[str, Any] | None = None,
    ) -> Any:
        """``ecg``: an ECG report's statements and measurements (``statements.report_fields``)."""
        request = worklist_pb2.SaveReportRequest(
            exam_id=exam_id, fence=fence, text=text, impression=impression, critical=critical, **(ecg or {})
        )
        return await self._unary(self._worklist.SaveReport, request, token)

    async def sign(self, token: str, exam_id: str, fence: int) -> Any:
        return await self._unary(
            self._worklist.SignReport, worklist_pb2.SignReportRequest(exam_id=exam_id, fence=fence), token
        )

    async def amend(
        self,
        token: str,
        exam_id: str,
        *,
        fence: int,
        reason: str,
        text: str,
        impression: str,
        critical: bool,
        ecg: dict[str, Any] | None = None,
    ) -> Any:
        request = worklist_pb2.AmendReportRequest(
            exam_id=exam_id,
            fence=fence,
            reason=reason,
            text=text,
            impression=impression,
            critical=critical,
            **(ecg or {}),
        )
        return await self._unary(self._worklist.AmendReport, request, token)

    async def report_pdf(self, token: str, exam_id: str, version: int = 0) -> tuple[int, bytes]:
        """A signed version's printed report (0: the latest) as the hub rendered it: (version,
        bytes), checked against the size and SHA-256 the hub sent with it."""
        call = self._worklist.GetReportPdf(
            common_pb2.GetReportPdfRequest(exam_id=exam_id, version=version),
            timeout=PDF_TIMEOUT,
            metadata=self._meta(token),
        )
        parts: list[bytes] = []
        sha256, size, of_version, received = "", 0, 0, 0
        try:
            async for chunk in call:
                if not parts and chunk.sha256:
                    sha256, size, of_version = chunk.sha256, int(chunk.size), int(chunk.version)
                received += len(chunk.data)
                if received > MAX_PDF_BYTES:
                    call.cancel()
                    raise HubError(
                        grpc.StatusCode.OUT_OF_RANGE, "REPORT_PDF_TOO_LARGE", "the printed report is too large"
                    )
                parts.append(chunk.data)
        except grpc.RpcError as err:
            raise HubError.of(err) from None
        data = b"".join(parts)
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise HubError(
                grpc.StatusCode.DATA_LOSS, "REPORT_PDF_CORRUPT", "the printed report arrived damaged; try again"
            )
        return of_version, data
