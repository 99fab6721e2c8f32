"""The station passes ``/dicomweb`` through to the hub's DICOMweb (``TELEREAD_STATION__HUB_HTTP``)
as the signed-in reader, so the browser's image viewer reads studies from one origin with the
session it already has: the hub, not the station, decides what the reader may see. Only GET is
passed on; the answer's status, media type and bytes come back as the hub sent them."""

from __future__ import annotations

from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response

PASSED_HEADERS = ("content-type", "warning")


class DicomwebProxy:
    def __init__(self, base: str) -> None:
        self._base = base.rstrip("/")
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=5.0))

    async def forward(self, request: Request, hub_token: str) -> Response:
        path = request.path_params["path"]
        headers = {"Authorization": f"Bearer {hub_token}", "Accept": request.headers.get("accept", "*/*")}
        try:
            answer = await self._client.get(
                f"{self._base}/dicomweb/{path}", params=list(request.query_params.multi_items()), headers=headers
            )
        except httpx.HTTPError:
            return Response('{"reason": "HUB_UNAVAILABLE", "message": "the hub\'s DICOMweb did not answer"}',
                            status_code=502, media_type="application/json")  # fmt: skip
        kept = {k: v for k, v in answer.headers.items() if k.lower() in PASSED_HEADERS}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    async def close(self) -> None:
        await self._client.aclose()


async def forward(request: Request, station: Any, session: Any) -> Response:
    proxy: DicomwebProxy = station.dicomweb
    return await proxy.forward(request, session.hub_token)
