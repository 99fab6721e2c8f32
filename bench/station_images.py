"""OHIF reading the same studies from the hub's DICOMweb and from Orthanc 1.10's DICOMweb plugin,
in one headless Chromium, in one run.

Run from the repository root: ``.venv/bin/python -m bench.station_images [--json PATH] [--runs N] [--quick]``
(needs Debian's ``orthanc`` and ``orthanc-dicomweb``, the viewer installed by ``scripts/viewer.sh``
and Debian's chromium).

Set-up: a hub process (PostgreSQL in a private cluster, local object directory, its HTTP port on)
and Orthanc 1.10 with its DICOMweb plugin (``DicomWeb.Root`` ``/dicomweb/``, otherwise the
plugin's defaults) get the same files: a 200-slice 512x512 int16 CT (phantom slices, explicit VR
little endian, 100 MiB) and a JPEG 2000 lossless DX radiograph of about 15 MB (a 12-bit phantom
chest with noise, 3300 x 3300). Two reading stations run in this process, signed in at the
same hub: one passes ``/dicomweb`` through to the hub, the other to Orthanc, so OHIF (the station's
own build and configuration, served the same way) sees one origin in both cases and the two paths
differ only in the server behind ``/dicomweb``. The hub makes its HTJ2K copy of the radiograph after
the exam is committed (``reader/hub/renditions.py``); the runs start once it is recorded, and the
log says how long after the upload that was.

Each run opens a fresh browser context (no cached DICOM answers), loads OHIF once on an empty
study so its scripts are in the browser's cache as a reader's are, then opens the study. Measured
in the page (``performance.now()``, from the navigation):

- **first image**: the first ``IMAGE_RENDERED`` of a viewport holding an image;
- **whole series loaded**: every image of the viewport's stack in cornerstone's cache (OHIF's own
  stack prefetch loads the series; nothing else asks for it);
- **scrolling**: once loaded, every slice shown in turn (``setImageIdIndex``, waiting for each
  ``IMAGE_RENDERED``): slices per second; once with OHIF's WebGL rendering (SwiftShader here: this
  machine has no GPU) and once more with cornerstone's CPU rendering (``?viewportRendering=cpu``);
- **DX first full-resolution image**: the radiograph's first render with an image of its full rows
  and columns; also given from the viewer's first ``/dicomweb`` request (the study's query), which
  leaves out OHIF's own start-up.

Targets: the hub at least as fast as Orthanc for the CT's first image and whole series; scrolling
>= 20 slices/s; the DX's first full-resolution image <= 2 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import JPEG2000Lossless
from rich.console import Console
from rich.table import Table

from bench import _backends, _hubproc
from bench._data import write_phantom_ct, write_phantom_dx
from bench._report import machine, machine_line
from bench.dicomweb_compare import PLUGIN, Orthanc

console = Console()
PASSWORD = "bench password 1"
READER = "bench-radio"
SCROLL_TARGET = 20.0
CPU = "&viewportRendering=cpu"  # OHIF's switch to cornerstone's CPU rendering path (no WebGL)
DX_TARGET_S = 2.0

OBSERVER = """
(() => {
  window.__bench = { first: null, firstFull: null, loaded: null, rows: 0, columns: 0 };
  const b = window.__bench;
  const current = () => {
    const cs = window.cornerstone; if (!cs) return null;
    const vp = cs.getEnabledElements().map((e) => e.viewport).find((v) => v.getCurrentImageId && v.getCurrentImageId());
    return vp || null;
  };
  document.addEventListener('CORNERSTONE_IMAGE_RENDERED', () => {
    const vp = current(); if (!vp) return;
    const image = window.cornerstone.cache.getImage(vp.getCurrentImageId());
    if (!image) return;
    const now = performance.now();
    if (b.first === null) b.first = now;
    if (b.firstFull === null && image.rows === b.rows && image.columns === b.columns) b.firstFull = now;
  }, true);
  const poll = setInterval(() => {
    const vp = current(); if (!vp) return;
    const cs = window.cornerstone;
    if (vp.getImageIds().every((id) => cs.cache.getImage(id))) { b.loaded = performance.now(); clearInterval(poll); }
  }, 10);
})();
"""

SHOWN = """() => { const cs = window.cornerstone; if (!cs) return false;
  return cs.getEnabledElements().some((e) => e.viewport.getCurrentImageId && e.viewport.getCurrentImageId()); }"""

SCROLL = """async () => {
  const cs = window.cornerstone;
  const vp = cs.getEnabledElements().map((e) => e.viewport).find((v) => v.getCurrentImageId && v.getCurrentImageId());
  const ids = vp.getImageIds();
  const rendered = () => new Promise((resolve) => vp.element.addEventListener(
    'CORNERSTONE_IMAGE_RENDERED', resolve, { once: true }));
  const from = vp.getCurrentImageIdIndex();
  const started = performance.now();
  for (let step = 1; step <= ids.length; step++) {  // every slice once, ending where it started
    const shown = rendered(); await vp.setImageIdIndex((from + step) % ids.length); await shown;
  }
  return { slices: ids.length, ms: performance.now() - started };
}"""


REQUESTS = """() => {
  const kinds = {};
  for (const e of performance.getEntriesByType('resource')) {
    if (!e.name.includes('/dicomweb/')) continue;
    const path = new URL(e.name).pathname;
    const kind = path.includes('/frames/') ? 'frames' : path.endsWith('/metadata') ? 'metadata' : 'query';
    (kinds[kind] = kinds[kind] || []).push({ start: e.startTime, wait: e.responseStart - e.requestStart,
                                             end: e.responseEnd });
  }
  const out = {};
  for (const [kind, list] of Object.entries(kinds)) {
    const waits = list.map((r) => r.wait).sort((a, b) => a - b);
    out[kind] = { count: list.length, wait_median_ms: waits[Math.floor(waits.length / 2)],
                  first_ms: Math.min(...list.map((r) => r.start)), last_end_ms: Math.max(...list.map((r) => r.end)) };
  }
  return out;
}"""


def _first_dicomweb_ms(page: Any) -> float:
    return float(
        page.evaluate("""() => Math.min(...performance.getEntriesByType('resource')
        .filter((e) => e.name.includes('/dicomweb/')).map((e) => e.startTime))""")
    )


def _until(page: Any, predicate: str, *, timeout_s: float) -> None:
    """Poll ``predicate`` from here every 50 ms (the figures are taken in the page itself; Playwright's
    own wait_for_function stalls on this page)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(predicate):
        if time.monotonic() > deadline:
            page.screenshot(path=str(Path(tempfile.gettempdir()) / "station-images-timeout.png"))
            raise RuntimeError(f"not done after {timeout_s} s: {page.evaluate('() => JSON.stringify(window.__bench)')}")
        time.sleep(0.05)


def _signed_in_context(browser: Any, url: str) -> Any:
    context = browser.new_context(base_url=url, viewport={"width": 1600, "height": 1000}, bypass_csp=True)
    session = context.request.get("/api/session").json()
    answer = context.request.post(
        "/api/login", data=json.dumps({"user": READER, "password": PASSWORD}),
        headers={"X-CSRF-Token": session["login_csrf"], "Origin": url, "Content-Type": "application/json"},
    )  # fmt: skip
    if answer.status != 200:
        raise RuntimeError(f"sign-in at the station failed: {answer.status}")
    return context


def _open(browser: Any, url: str, study: str, *, warm: str, rows: int, columns: int, series: bool,
          timeout_s: float, query: str = "") -> dict[str, Any]:  # fmt: skip
    context = _signed_in_context(browser, url)
    try:
        first = context.new_page()  # OHIF's scripts into the browser's cache, as a reader's are: a small study
        first.goto(f"/viewer?StudyInstanceUIDs={warm}")
        _until(first, f"() => ({SHOWN})()", timeout_s=60)
        first.close()
        page = context.new_page()
        page.add_init_script(OBSERVER.replace("rows: 0, columns: 0", f"rows: {rows}, columns: {columns}"))
        page.goto(f"/viewer?StudyInstanceUIDs={study}{query}")
        done = "b.loaded !== null" if series else "b.firstFull !== null"
        _until(page, f"() => {{ const b = window.__bench; return b.first !== null && {done}; }}", timeout_s=timeout_s)
        found = dict(page.evaluate("() => window.__bench"))
        found["first_request"] = _first_dicomweb_ms(page)
        found["requests"] = page.evaluate(REQUESTS)  # per kind: count, median server wait, first start, last end
        if series:
            found["scroll"] = page.evaluate(SCROLL)
        page.close()
        return found
    finally:
        context.close()


def run(work: Path, *, runs: int, slices: int, dx_side: tuple[int, int], profile: Path | None = None) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    from teleread.db.engine import make_engine
    from teleread.reader.station.serve import StationServer
    from teleread.settings import StationSettings
    from teleread.signin import set_password
    from tests.fixtures_browser import GL_FLAGS, chromium_path

    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not os.access(binary, os.X_OK) or not PLUGIN.exists():
        raise SystemExit("needs Debian's orthanc and orthanc-dicomweb: apt-get install -y orthanc orthanc-dicomweb")
    started = time.monotonic()
    ct = write_phantom_ct(work / "ct", slices=slices, side=512, patient="BENCH-CT")
    dx = write_phantom_dx(work / "dx" / "dx.dcm", rows=dx_side[0], columns=dx_side[1], syntax=JPEG2000Lossless,
                          noise=4096, patient="BENCH-DX")  # fmt: skip
    console.log(f"generated the CT ({sum(p.stat().st_size for p in ct) / 2**20:.0f} MiB) and the DX "
                f"({dx.stat().st_size / 1e6:.1f} MB JPEG 2000) in {time.monotonic() - started:.0f} s")  # fmt: skip
    small = write_phantom_ct(work / "warm", slices=1, side=64, patient="BENCH-WARM")
    warm = str(pydicom.dcmread(small[0], stop_before_pixels=True).StudyInstanceUID)
    ct_uid = str(pydicom.dcmread(ct[0], stop_before_pixels=True).StudyInstanceUID)
    dx_uid = str(pydicom.dcmread(dx, stop_before_pixels=True).StudyInstanceUID)

    (work / "orthanc").mkdir()
    orthanc = Orthanc(work / "orthanc", binary, root="/dicomweb/")
    pg = _backends.PgCluster(Path(tempfile.mkdtemp(prefix="teleread-bench-pg-")))
    pg.start()
    stations: list[Any] = []
    try:
        url = pg.new_database()
        hub = _hubproc.start_hub({"data_dir": str(work / "data"), "database_url": url, "http": {"port": 0}},
                                 run_dir=work, readers=0, profile=profile)  # fmt: skip
        try:
            engine = make_engine(url)
            set_password(engine, name=READER, password=PASSWORD)
            engine.dispose()
            _hubproc.upload_folders(hub.address, hub.tokens["site"], [work / "ct", work / "dx", work / "warm"])
            uploaded = time.monotonic()
            copy_s = _viewer_copy_made(url, dx_uid, since=uploaded)
            console.log(f"the hub's HTJ2K copy of the DX was there {copy_s:.1f} s after the upload ended")
            for path in [*ct, dx, *small]:
                orthanc.store(path.read_bytes())
            console.log("stored the studies at the hub and at Orthanc")
            backends = {"teleread hub": f"http://127.0.0.1:{hub.info['http_port']}",
                        "Orthanc 1.10 + DICOMweb": f"http://127.0.0.1:{orthanc.http}"}  # fmt: skip
            urls = {}
            for name, http in backends.items():
                station = StationServer(StationSettings(port=0, hub=hub.address, hub_http=http)).start()
                stations.append(station)
                urls[name] = station.url
            results: dict[str, dict[str, list[Any]]] = {name: {"ct": [], "dx": [], "cpu": []} for name in urls}
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=GL_FLAGS)
                try:
                    for number in range(runs):
                        order = list(urls) if number % 2 == 0 else list(reversed(urls))  # alternate who goes first
                        for name in order:
                            at = urls[name]
                            results[name]["ct"].append(_open(browser, at, ct_uid, warm=warm, rows=512, columns=512,
                                                             series=True, timeout_s=300))  # fmt: skip
                            rows, columns = dx_side
                            results[name]["dx"].append(_open(browser, at, dx_uid, warm=warm, rows=rows,
                                                             columns=columns, series=False, timeout_s=120))  # fmt: skip
                            results[name]["cpu"].append(_open(browser, at, ct_uid, warm=warm, rows=512, columns=512,
                                                              series=True, timeout_s=300, query=CPU))  # fmt: skip
                            console.log(f"run {number + 1} {name}: CT first {results[name]['ct'][-1]['first']:.0f} ms,"
                                        f" loaded {results[name]['ct'][-1]['loaded']:.0f} ms; DX full"
                                        f" {results[name]['dx'][-1]['firstFull']:.0f} ms")  # fmt: skip
                finally:
                    browser.close()
        finally:
            hub.stop()
    finally:
        for station in stations:
            station.stop()
        pg.stop()
        orthanc.stop()
    return {"results": results, "ct_mib": sum(p.stat().st_size for p in ct) / 2**20, "dx_mb": dx.stat().st_size / 1e6,
            "slices": slices, "dx_side": dx_side}  # fmt: skip


def _viewer_copy_made(url: str, study: str, *, since: float, timeout_s: float = 120) -> float:
    """Seconds from ``since`` until the hub recorded its HTJ2K copy of the study's radiograph (made
    after the exam is committed, as a reader's queue shows it a little later too)."""
    from sqlalchemy import select

    from teleread.db.engine import make_engine
    from teleread.db.schema import dicom_metadata, objects

    engine = make_engine(url)
    try:
        query = (
            select(dicom_metadata.c.rendition_key)
            .join(objects, objects.c.id == dicom_metadata.c.object_id)
            .where(objects.c.study_instance_uid == study)
        )
        while time.monotonic() - since < timeout_s:
            with engine.connect() as conn:
                if conn.execute(query).scalar():
                    return time.monotonic() - since
            time.sleep(0.1)
        raise RuntimeError("the hub made no HTJ2K copy of the radiograph")
    finally:
        engine.dispose()


def _median(values: list[float]) -> float:
    return float(statistics.median(values))


def report(found: dict[str, Any], info: dict[str, Any]) -> list[dict[str, Any]]:
    res = found["results"]
    hub, orthanc = "teleread hub", "Orthanc 1.10 + DICOMweb"
    rows: list[dict[str, Any]] = []

    def add(figure: str, unit: str, pick: Any, kind: str, target: str, passed: Any) -> None:
        ours = [pick(r) for r in res[hub][kind]]
        theirs = [pick(r) for r in res[orthanc][kind]]
        rows.append({"figure": figure, "unit": unit, "hub": ours, "orthanc": theirs, "target": target,
                     "passed": passed(_median(ours), _median(theirs))})  # fmt: skip

    add("CT first image", "ms", lambda r: r["first"], "ct", "hub <= Orthanc", lambda o, t: o <= t)
    add("CT whole series loaded", "ms", lambda r: r["loaded"], "ct", "hub <= Orthanc", lambda o, t: o <= t)
    add("CT first image from the first DICOMweb request", "ms", lambda r: r["first"] - r["first_request"], "ct",
        "(detail)", lambda o, t: None)  # fmt: skip
    add("CT series loaded from the first DICOMweb request", "ms", lambda r: r["loaded"] - r["first_request"], "ct",
        "(detail)", lambda o, t: None)  # fmt: skip
    add("scrolling once loaded", "slices/s", lambda r: r["scroll"]["slices"] / r["scroll"]["ms"] * 1000, "ct",
        f">= {SCROLL_TARGET:.0f}", lambda o, t: o >= SCROLL_TARGET)  # fmt: skip
    add("scrolling once loaded, CPU rendering (?viewportRendering=cpu)", "slices/s",
        lambda r: r["scroll"]["slices"] / r["scroll"]["ms"] * 1000, "cpu", f">= {SCROLL_TARGET:.0f}",
        lambda o, t: o >= SCROLL_TARGET)  # fmt: skip
    add("DX first full-resolution image", "ms", lambda r: r["firstFull"], "dx", f"<= {DX_TARGET_S * 1000:.0f}",
        lambda o, t: o <= DX_TARGET_S * 1000)  # fmt: skip
    add("DX first full-resolution image from the first DICOMweb request", "ms",
        lambda r: r["firstFull"] - r["first_request"], "dx", f"<= {DX_TARGET_S * 1000:.0f}",
        lambda o, t: o <= DX_TARGET_S * 1000)  # fmt: skip
    table = Table(title=f"OHIF 3.13 in headless Chromium (SwiftShader WebGL): {found['slices']}-slice 512x512 CT "
                        f"({found['ct_mib']:.0f} MiB), {found['dx_side'][0]}x{found['dx_side'][1]} JPEG 2000 DX "
                        f"({found['dx_mb']:.1f} MB); medians of {len(res[hub]['ct'])} runs")  # fmt: skip
    for column in ("figure", "teleread hub (each run)", "Orthanc (each run)", "target", "result"):
        table.add_column(column)
    for r in rows:
        fmt = (lambda v: f"{v:.1f}") if r["unit"] == "slices/s" else (lambda v: f"{v:.0f}")
        verdict = "" if r["passed"] is None else ("[green]met[/]" if r["passed"] else "[bold red]missed[/]")
        table.add_row(r["figure"], f"{fmt(_median(r['hub']))} {r['unit']} ({', '.join(fmt(v) for v in r['hub'])})",
                      f"{fmt(_median(r['orthanc']))} {r['unit']} ({', '.join(fmt(v) for v in r['orthanc'])})",
                      r["target"], verdict)  # fmt: skip
    wide = Console(width=max(console.width, 200))
    wide.print(table)
    wide.print("machine: " + machine_line(info))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.station_images", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None, metavar="PATH")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small smoke run (40 slices, a 1500 x 1400 DX)")
    parser.add_argument("--profile", type=Path, default=None, metavar="PATH",
                        help="write the hub process's CPU profile (pstats) here")  # fmt: skip
    args = parser.parse_args(argv)
    info = machine()
    slices, dx_side = (40, (1500, 1400)) if args.quick else (200, (3300, 3300))
    with tempfile.TemporaryDirectory(prefix="teleread-bench-images-") as tmp:
        found = run(Path(tmp), runs=args.runs, slices=slices, dx_side=dx_side, profile=args.profile)
    info["load_after"] = os.getloadavg()[0]
    rows = report(found, info)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "info": info, "raw": found["results"]}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
