"""The station's image viewer: OHIF's prebuilt viewer (npm ``@ohif/app``, pinned by
``reader/viewer/package-lock.json``), served on the station's own origin so that it reads the
hub's DICOMweb through the station's ``/dicomweb`` pass-through with the session the reader
already has.

- ``/viewer`` (and anything under it, the viewer's own routes) answers OHIF's ``index.html`` with
  one more script, ``/static/viewer-shell.js``: it keeps the station's idle clock running while the
  reader works in the viewer and draws the chest model's saliency zones over the image on demand.
  Signed out, ``/viewer`` sends the browser to the sign-in page.
- ``/app-config.js`` is the station's (``reader/viewer/app-config.js``): one DICOMweb source,
  ``/dicomweb`` on this origin, no study list, no other sources, no service worker.
- Every other file of OHIF's ``dist/`` is served from the root, where OHIF's build expects it
  (its public path is ``/``); the station's own routes come first.

The viewer has a Content-Security-Policy of its own: OHIF needs WebAssembly (its codecs), web
workers and inline styles; its two inline scripts are allowed by their hashes, nothing else
inline, and it still connects to nothing but this origin. OHIF's files carry a policy that also
allows evaluating strings, which applies only where one of them runs as a web worker (the codecs'
glue code needs it there); the page itself never may.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

READER = Path(str(resources.files("teleread.reader")))
DIST = READER / "viewer" / "node_modules" / "@ohif" / "app" / "dist"
CONFIG = READER / "viewer" / "app-config.js"
SHELL = '<script defer src="/static/viewer-shell.js"></script>'
NO_SERVICE_WORKER = b"// the station's viewer runs without a service worker\n"
HASHED = re.compile(r"\.[0-9a-f]{16}\.(js|wasm)$|^[0-9a-f]{16}\.(wasm|woff2)$")


def _csp(inline_hashes: list[str], *, worker: bool = False) -> str:
    """The page's policy; ``worker``: the policy a web worker started from one of OHIF's files runs
    under (its codec glue evaluates strings; a worker has no page to reach)."""
    scripts = " ".join(f"'sha256-{h}'" for h in inline_hashes)
    evaluate = "'unsafe-eval' " if worker else ""
    return (
        f"default-src 'self'; script-src 'self' {evaluate}'wasm-unsafe-eval' {scripts}; worker-src 'self' blob:; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; font-src 'self' data:; "
        "connect-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; frame-src 'self'; "
        "frame-ancestors 'self'; base-uri 'none'; form-action 'self'"  # framed by the exam page
    )


class Viewer:
    """OHIF's files and the page that starts it; ``dist`` is None or absent: not installed."""

    def __init__(self, dist: Path | None = None) -> None:
        self.dist = (dist or DIST).resolve()
        self.installed = (self.dist / "index.html").is_file()
        self.page = b""
        self.csp = self.worker_csp = ""
        if self.installed:
            html = (self.dist / "index.html").read_text("utf-8")
            inline = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
            hashes = [base64.b64encode(hashlib.sha256(s.encode()).digest()).decode() for s in inline]
            self.csp, self.worker_csp = _csp(hashes), _csp(hashes, worker=True)
            self.page = html.replace("</head>", f"{SHELL}</head>", 1).encode()

    def _missing(self) -> Response:
        return JSONResponse(
            {"error": {"reason": "VIEWER_NOT_INSTALLED",
                       "message": "the image viewer is not installed: run scripts/viewer.sh (scripts/demo.sh does)"}},
            status_code=503,
        )  # fmt: skip

    async def index(self, request: Request) -> Response:
        station = request.app.state.station
        if station.session_of(request) is None:
            return RedirectResponse("/", status_code=303)
        if not self.installed:
            return self._missing()
        return HTMLResponse(
            self.page,
            headers={"Cache-Control": "no-store", "Content-Security-Policy": self.csp, "X-Frame-Options": "SAMEORIGIN"},
        )

    async def config(self, request: Request) -> Response:
        return FileResponse(str(CONFIG), media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    async def no_service_worker(self, request: Request) -> Response:
        return Response(NO_SERVICE_WORKER, media_type="text/javascript")

    async def asset(self, request: Request) -> Response:
        """One file of OHIF's build by its path from the root; 404 for anything outside it."""
        if not self.installed:
            return self._missing()
        relative = request.path_params["path"]
        try:
            target = (self.dist / relative).resolve()
            target.relative_to(self.dist)
        except (ValueError, OSError):
            return Response(status_code=404)
        if not target.is_file() or target.name in ("index.html", "sw.js", "_headers", "_redirects", "serve.json"):
            return Response(status_code=404)
        cache = "public, max-age=31536000, immutable" if HASHED.search(target.name) else "no-cache"
        media = "application/wasm" if target.suffix == ".wasm" else None
        # a web worker runs under its own script's policy: OHIF's workers compile its codecs
        return FileResponse(
            str(target), media_type=media, headers={"Cache-Control": cache, "Content-Security-Policy": self.worker_csp}
        )
