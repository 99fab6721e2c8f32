"""The hub's DICOMweb face on its HTTP port (``TELEREAD_HTTP__PORT``), under ``/dicomweb``:
QIDO-RS for studies, a study's series and a series' instances (``reader/hub/qido.py``), with the
same identities as the gRPC API (``Authorization: Bearer`` with a machine token or a person's
session token) and the same tenancy.

Answers: ``application/dicom+json``; a refused query is 400 with the reason (``QIDO_...``), no or a
bad token 401, a role DICOMweb does not serve 403, a study the caller may not see 404 (the same as
one that does not exist). Each answer is logged with the caller, the route and how many datasets
it carried, never a query's values (they may name a patient).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from typing import Any, BinaryIO, Callable

import pydicom
import pydicom.multival
from pydicom.encaps import generate_frames
from pydicom.pixels import pixel_array

import uvicorn
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from teleread.auth import Principal
from teleread.db.engine import reading
from teleread.db.schema import dicom_studies
from teleread.dicom_index import BULK_BYTES, DICOMWEB_PREFIX, instance_url, metadata_json
from teleread.errors import IntegrityError, InvalidInput, NotFound, ObjectNotFound, PermissionDenied, TelereadError
from teleread.events import record_event
from teleread.pixels import HTJ2K_LOSSLESS
from teleread.reader.hub import qido
from teleread.webserver import BackgroundServer, bound_socket

log = logging.getLogger("teleread.dicomweb")
PREFIX = DICOMWEB_PREFIX
MEDIA = "application/dicom+json"
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404}
ACCEPTED = ("application/dicom+json", "application/json", "*/*", "application/*")


def _error(exc: TelereadError) -> Response:
    status = HTTP_STATUS.get(exc.code, 500)
    body = {"reason": exc.reason, "message": str(exc) if status < 500 else "internal error"}
    headers = {"WWW-Authenticate": 'Bearer realm="teleread"'} if status == 401 else {}
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def _accepts(request: Request) -> bool:
    header = request.headers.get("accept", "*/*")
    return any(part.split(";")[0].strip() in ACCEPTED for part in header.split(","))


def _metadata(raw: BinaryIO, url: str) -> str:
    """An instance's DICOM JSON built from its file (one stored before ingest kept it)."""
    ds = pydicom.dcmread(raw, stop_before_pixels=False, defer_size=BULK_BYTES)
    return json.dumps(metadata_json(ds, url), separators=(",", ":"))


_BULK_PATH = re.compile(r"^[0-9A-Fa-f]{8}(/\d{1,6}/[0-9A-Fa-f]{8}){0,8}$")


def _bulkdata(raw: BinaryIO, path: str) -> bytes:
    """The value of the data element at ``path`` (as ``dicom_index.bulk_paths`` writes it)."""
    if not _BULK_PATH.match(path):
        raise InvalidInput("WADO: not a bulk data path", reason="WADO_BAD_BULKDATA")
    ds: Any = pydicom.dcmread(raw)
    steps = path.split("/")
    try:
        for seq, item in zip(steps[:-1:2], steps[1:-1:2]):
            ds = ds[int(seq, 16)].value[int(item)]
        element = ds[int(steps[-1], 16)]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise NotFound("WADO: the instance has no such data element", reason="NO_BULKDATA") from None
    value = element.value
    if not isinstance(value, bytes):
        raise NotFound("WADO: that data element is not bulk data", reason="NO_BULKDATA")
    return value


def _multipart(parts: list[bytes], media: str) -> Response:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            b"--" + boundary.encode() + b"\r\nContent-Type: " + media.encode() + b"\r\n\r\n" + part + b"\r\n"
            for part in parts
        )
        + b"--"
        + boundary.encode()
        + b"--\r\n"
    )
    return Response(body, media_type=f'multipart/related; type="{media}"; boundary={boundary}')


def _frame_numbers(text: str, count: int) -> list[int]:
    try:
        numbers = [int(n) for n in text.split(",") if n.strip()]
    except ValueError:
        raise InvalidInput("WADO: frame numbers are whole numbers", reason="WADO_BAD_FRAME") from None
    if not numbers or any(n < 1 or n > count for n in numbers):
        raise NotFound(f"WADO: the instance has {count} frame(s)", reason="NO_FRAME")
    return numbers


def _wants_stored(request: Request) -> bool:
    """Whether the client takes the frames as stored (``transfer-syntax=*``) rather than uncompressed."""
    accept = request.headers.get("accept", "").lower().replace(" ", "")
    return "transfer-syntax=*" in accept


def _frames(raw: BinaryIO, numbers_text: str, *, stored: bool) -> tuple[list[bytes], str]:
    """The frames asked for, as stored (an encapsulated syntax's own bytes, and its media type) or
    uncompressed (little endian, as PS3.18 8.7.3.5 says: ``application/octet-stream``)."""
    ds = pydicom.dcmread(raw)
    syntax = ds.file_meta.TransferSyntaxUID
    count = int(ds.get("NumberOfFrames") or 1)
    numbers = _frame_numbers(numbers_text, count)
    if syntax.is_compressed and stored:
        frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [frames[n - 1] for n in numbers], f"application/octet-stream; transfer-syntax={syntax}"
    if not syntax.is_compressed:
        size = len(ds.PixelData) // count
        return [bytes(ds.PixelData[(n - 1) * size : n * size]) for n in numbers], "application/octet-stream"
    decoded = [pixel_array(ds, index=n - 1, raw=True) for n in numbers]  # the stored values, not rescaled
    return [a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for a in decoded], "application/octet-stream"


def _viewer_copy(store: Any, row: Any) -> bytes | None:
    """The instance's HTJ2K copy, verified; None (logged) when it is missing or damaged: the frame is
    then answered from the stored instance."""
    try:
        with store.open_verified(row.rendition_key, sha256=row.rendition_sha256, size=row.rendition_size) as raw:
            return bytes(raw.read())
    except (IntegrityError, ObjectNotFound) as exc:
        log.warning("viewer copy unusable: answered from the instance", extra={"reason": exc.reason})
        return None


def _native_frames(store: Any, row: Any, numbers_text: str) -> list[bytes]:
    """The frames asked for of an instance whose native pixel data ingest located: one ranged read
    of the pixel data, verified by the digest ingest recorded (the same bytes :func:`_frames` cuts)."""
    count = int(row.number_of_frames or 1)
    numbers = _frame_numbers(numbers_text, count)
    data = store.read_range(row.storage_key, offset=int(row.pixel_offset), length=int(row.pixel_length),
                            sha256=row.pixel_sha256)  # fmt: skip
    size = len(data) // count
    return [data[(n - 1) * size : n * size] for n in numbers]


def _window(text: str) -> tuple[float, float] | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.3; only LINEAR), or None when not given."""
    if not text:
        return None
    parts = text.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (ValueError, IndexError):
        raise InvalidInput("WADO: window is center,width[,linear]", reason="WADO_BAD_WINDOW") from None
    if width < 1 or (len(parts) > 2 and parts[2].strip().lower() not in ("linear", "")):
        raise InvalidInput("WADO: window is center,width[,linear] with a width of 1 or more", reason="WADO_BAD_WINDOW")
    return center, width


def render(ds: Any, index: int, window: tuple[float, float] | None) -> Any:
    """One frame as 8-bit display values (a numpy array): the modality LUT (rescale), then the
    window asked for, or the file's first one, or the frame's own range (PS3.3 C.11.2.1.2, linear);
    MONOCHROME1 inverted; colour frames as they are (RGB)."""
    import numpy as np
    from pydicom.pixels import apply_modality_lut

    values = pixel_array(ds, index=index)
    if int(ds.get("SamplesPerPixel") or 1) > 1:
        return values.astype(np.uint8) if values.dtype != np.uint8 else values
    values = apply_modality_lut(values, ds).astype(np.float64)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = ds.WindowCenter, ds.WindowWidth
        window = (float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center),
                  float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width))  # fmt: skip
    if window is None:
        low, high = float(values.min()), float(values.max())
        window = ((low + high + 1) / 2, max(1.0, high - low + 1))
    center, width = window
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0 if width > 1 else (values >= center) * 255.0
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 255 - out
    return out


def _rendered(raw: BinaryIO, frame: int, request: Request) -> Response:
    from PIL import Image

    ds = pydicom.dcmread(raw)
    count = int(ds.get("NumberOfFrames") or 1)
    [number] = _frame_numbers(str(frame), count)
    pixels = render(ds, number - 1, _window(request.query_params.get("window", "")))
    accept = request.headers.get("accept", "")
    png = "image/png" in accept or "image/jpeg" not in accept  # PNG unless JPEG is asked for: exact values
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG" if png else "JPEG", quality=90)
    return Response(buffer.getvalue(), media_type="image/png" if png else "image/jpeg")


def _audit_refusal(engine: Any, principal: Principal, request: Request, route: str, reason: str) -> None:
    """An authenticated caller was refused a study (or a part of it): one ``access_refused`` row in
    the audit trail, naming the caller, the route, the study UID and whether that study exists at
    the hub at all (a refused study that exists is another site's or another specialty's)."""
    study = request.path_params["study"]
    with engine.begin() as conn:
        exists = conn.execute(select(dicom_studies.c.study_instance_uid)
                              .where(dicom_studies.c.study_instance_uid == study)).first() is not None  # fmt: skip
        record_event(
            conn, type="access_refused", site_id=principal.site_id, hospital=principal.hospital or "",
            specialty=principal.specialty or "", actor_id=principal.id,
            detail={"via": "dicomweb", "route": route, "reason": reason, "study": study, "exists": exists},
        )  # fmt: skip


def create_app(engine: Any, authenticate: Callable[[str | None], Principal], store: Any = None) -> Starlette:
    """The DICOMweb routes over ``engine``'s index (and ``store``'s objects for WADO-RS), callers
    resolved by ``authenticate``."""

    def guarded(request: Request, work: Callable[[Principal], Response]) -> Response:
        """``work`` for the caller the request's token names; a typed refusal as its status."""
        principal: Principal | None = None
        route = getattr(request.scope.get("route"), "path", "")
        try:
            principal = authenticate(request.headers.get("authorization"))
            return work(principal)
        except TelereadError as exc:
            user = principal.name if principal else ""
            log.info("dicomweb refused", extra={"user": user, "reason": exc.reason, "route": route})
            if (
                principal is not None
                and isinstance(exc, NotFound | PermissionDenied)
                and "study" in request.path_params
            ):
                _audit_refusal(engine, principal, request, route, exc.reason)
            return _error(exc)
        except Exception as exc:  # noqa: BLE001 - answered 500; the type is logged, never a value
            log.error("dicomweb failed", extra={"reason": type(exc).__name__, "route": route})
            return Response(json.dumps({"reason": "INTERNAL", "message": "internal error"}), status_code=500,
                            media_type="application/json")  # fmt: skip

    def retrieve(request: Request, what: str, principal: Principal) -> Response:
        study = request.path_params["study"]
        series = request.path_params.get("series", "")
        instance = request.path_params.get("instance", "")
        with reading(engine) as conn:
            found = qido.stored_instances(conn, principal, study=study, series=series, instance=instance)
        if not found:
            raise NotFound("no such study, series or instance", reason="NO_INSTANCE")
        route = getattr(request.scope.get("route"), "path", "")
        log.info("dicomweb retrieve", extra={"user": principal.name, "route": route, "count": len(found)})
        if what == "metadata":
            return Response(_metadata_of(found, study).encode(), media_type=MEDIA)
        if what == "frames" and found[0].rendition_sha256 and _wants_stored(request):
            if request.path_params["frames"].strip() == "1":  # any syntax will do: the viewer's copy
                copy = _viewer_copy(store, found[0])
                if copy is not None:
                    return _multipart([copy], f"application/octet-stream; transfer-syntax={HTJ2K_LOSSLESS}")
        if what == "frames" and found[0].pixel_sha256:  # native pixel data: its bytes alone, by range
            frames = _native_frames(store, found[0], request.path_params["frames"])
            return _multipart(frames, "application/octet-stream")
        parts: list[bytes] = []
        for row in found:
            with store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as raw:
                if what == "rendered":
                    return _rendered(raw, int(request.path_params.get("frames") or 1), request)
                if what == "frames":
                    frames, media = _frames(raw, request.path_params["frames"], stored=_wants_stored(request))
                    return _multipart(frames, media)
                if what == "bulkdata":
                    return _multipart([_bulkdata(raw, request.path_params["path"])], "application/octet-stream")
                parts.append(raw.read())
        return _multipart(parts, "application/dicom")

    def _metadata_of(found: list[Any], study: str) -> str:
        """The instances' DICOM JSON as one array: as ingest kept it, or built from the file."""
        with reading(engine) as conn:
            kept = qido.kept_metadata(conn, [row.id for row in found])
        parts = []
        for row in found:
            text = kept.get(row.id)
            if text is None:
                url = instance_url(study, row.series_instance_uid, row.sop_instance_uid)
                with store.open_verified(row.storage_key, sha256=row.sha256, size=row.size) as raw:
                    text = _metadata(raw, url)
            parts.append(text)
        return "[" + ",".join(parts) + "]"

    def answer(request: Request, level: str, principal: Principal) -> Response:
        started = time.perf_counter()
        study = request.path_params.get("study", "")
        series = request.path_params.get("series", "")
        q = qido.parse(level, list(request.query_params.multi_items()), study=study, series=series)
        with reading(engine) as conn:
            if study and not qido.any_visible(conn, principal, study):
                raise NotFound("no such study", reason="NO_STUDY")
            found = qido.search(conn, principal, q, base_url=PREFIX)  # URIs from the origin
        headers = {"Warning": '299 teleread "fuzzymatching is not supported"'} if q.fuzzy else {}
        route = getattr(request.scope.get("route"), "path", "")
        took = round((time.perf_counter() - started) * 1000, 1)
        log.info("dicomweb query", extra={"user": principal.name, "route": route, "count": len(found),
                                          "duration_ms": took})  # fmt: skip
        return Response(json.dumps(found), media_type=MEDIA, headers=headers)

    def route(level: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            if not _accepts(request):
                return Response(status_code=406)
            return await run_in_threadpool(guarded, request, lambda p: answer(request, level, p))

        return endpoint

    def wado(what: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            return await run_in_threadpool(guarded, request, lambda p: retrieve(request, what, p))

        return endpoint

    study, series, instance = f"{PREFIX}/studies/{{study}}", "/series/{series}", "/instances/{instance}"

    return Starlette(
        routes=[
            Route(f"{PREFIX}/studies", route("studies")),
            Route(f"{PREFIX}/studies/{{study}}/series", route("series")),
            Route(f"{PREFIX}/studies/{{study}}/series/{{series}}/instances", route("instances")),
            Route(f"{study}/metadata", wado("metadata")),
            Route(f"{study}{series}/metadata", wado("metadata")),
            Route(f"{study}{series}{instance}/metadata", wado("metadata")),
            Route(f"{study}{series}{instance}/frames/{{frames}}", wado("frames")),
            Route(f"{study}{series}{instance}/rendered", wado("rendered")),
            Route(f"{study}{series}{instance}/bulkdata/{{path:path}}", wado("bulkdata")),
            Route(f"{study}{series}{instance}/frames/{{frames:int}}/rendered", wado("rendered")),
            Route(study, wado("instances")),
            Route(f"{study}{series}", wado("instances")),
            Route(f"{study}{series}{instance}", wado("instances")),
        ]
    )


class DicomwebServer:
    """The hub's HTTP port on a background thread, bound before :meth:`start` returns."""

    def __init__(self, app: Starlette, *, host: str, port: int) -> None:
        sock = bound_socket(host, port)
        self.host = host
        self.port = int(sock.getsockname()[1])
        config = uvicorn.Config(app, access_log=False, log_config=None, lifespan="off", ws="none",
                                timeout_graceful_shutdown=2)  # fmt: skip
        self._background = BackgroundServer(sock, lambda: uvicorn.Server(config), name="dicomweb")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{PREFIX}"

    def start(self) -> DicomwebServer:
        self._background.start()
        return self

    def stop(self) -> None:
        self._background.stop()
