"""The station's image viewer (OHIF's prebuilt viewer on the station's origin, reading the hub's
DICOMweb through the station) in a real headless Chromium with software WebGL: the slice shown
after scrolling has, at 1:1, the pixels of the hub's own rendered frame at the same window; a W/L
drag and a preset change them as computed; JPEG 2000, JPEG-LS (MONOCHROME1) and a multi-frame
image are decoded and shown as the hub renders them; another alliance's study is not reachable
and the refusal is audited; the saliency overlay and the side-by-side prior work from the exam page."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless
from sqlalchemy import select

from bench._data import write_phantom_ct, write_phantom_dx
from conftest import READER_PASSWORD, HubStack, signed_in_stack
from helpers import wait_for_state
from teleread.db.schema import events
from teleread.reader.hub.dicomweb import DicomwebServer, create_app
from teleread.reader.station.serve import StationServer
from teleread.reader.station.viewer import Viewer
from teleread.settings import StationSettings
from teleread.v1 import common_pb2, ingest_pb2_grpc
from test_patient_context import upload

CT_SLICES = 24


@dataclass
class Study:
    uid: str
    exam_id: str
    files: list[Path]

    def instance(self, n: int) -> pydicom.Dataset:
        return pydicom.dcmread(self.files[n], stop_before_pixels=True)


@dataclass
class Served:
    stack: HubStack
    station: StationServer
    ct: Study
    prior: Study
    j2k: Study
    jls: Study
    multiframe: Study
    elsewhere: Study


def _upload(stack: HubStack, site: str, files: list[Path]) -> Study:
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    ingest = ingest_pb2_grpc.IngestStub(stack.channel(site))
    exam = upload(ingest, [(f, "dicom") for f in files], kind=common_pb2.EXAM_KIND_IMAGING, study=uid)
    wait_for_state(ingest, exam.exam_id, "queued")
    return Study(uid, exam.exam_id, files)


def _multiframe(path: Path) -> Path:
    """A multi-frame greyscale secondary capture, RLE lossless: 10 phantom slices as frames."""
    from bench._data import phantom_slice

    [single] = write_phantom_ct(path.parent / "mf-source", slices=1, side=128, patient="PHANTOM-MF")
    ds = pydicom.dcmread(single)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame SC, word
    ds.Modality, ds.SeriesDescription = "OT", "Cine"
    ds.NumberOfFrames, ds.FrameIncrementPointer, ds.FrameTime = 10, 0x00181063, 100.0
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation", "SliceThickness"):
        delattr(ds, keyword)
    frames = np.stack([phantom_slice(n, 128) for n in range(1, 11)])
    ds.PixelData = frames.tobytes()
    ds.compress(RLELossless, frames)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("viewer")
    stack = signed_in_stack(folder / "hub", ("dr-lung",))
    web = DicomwebServer(create_app(stack.hub.engine, stack.hub.authenticator.authenticate, stack.hub.store),
                         host="127.0.0.1", port=0).start()  # fmt: skip
    station = StationServer(StationSettings(port=0, hub=stack.address, hub_http=f"http://127.0.0.1:{web.port}")).start()
    try:
        prior = _upload(stack, "site_a", write_phantom_ct(folder / "prior", slices=4, side=256, patient="P-7",
                                                          date="20251101"))  # fmt: skip
        yield Served(
            stack, station, prior=prior,
            ct=_upload(stack, "site_a", write_phantom_ct(folder / "ct", slices=CT_SLICES, side=256, patient="P-7")),
            j2k=_upload(stack, "site_a", [write_phantom_dx(folder / "j2k.dcm", rows=1024, columns=1000,
                                                           syntax=JPEG2000Lossless, patient="P-8")]),
            jls=_upload(stack, "site_a", [write_phantom_dx(folder / "jls.dcm", rows=700, columns=800,
                                                           syntax=JPEGLSLossless, monochrome1=True, patient="P-9")]),
            multiframe=_upload(stack, "site_a", [_multiframe(folder / "mf.dcm")]),
            elsewhere=_upload(stack, "site_x", write_phantom_ct(folder / "x", slices=2, side=64, patient="X-1")),
        )  # fmt: skip
    finally:
        station.stop()
        web.stop()
        stack.close()


@pytest.fixture
def page(gl_browser: Any, served: Served, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    context = gl_browser.new_context(base_url=served.station.url, viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.goto("/")
    tab.fill("#login-user", "dr-lung")
    tab.fill("#login-password", READER_PASSWORD)
    tab.get_by_test_id("login-submit").click()
    tab.get_by_test_id("who").filter(has_text="dr-lung").wait_for(timeout=10_000)
    try:
        yield tab
    finally:
        tab.screenshot(path=str(artifacts / f"viewer-{request.node.name}.png"))
        context.close()


# ---- the viewport, read through cornerstone (OHIF exposes it as window.cornerstone) -------------
SHOWN = """() => { const cs = window.cornerstone; if (!cs) return null;
  const vp = cs.getEnabledElements().map((e) => e.viewport).find((v) => v.getCurrentImageId && v.getCurrentImageId());
  if (!vp || !cs.cache.getImage(vp.getCurrentImageId())) return null;
  return { imageId: vp.getCurrentImageId(), index: vp.getCurrentImageIdIndex(), voi: vp.getProperties().voiRange,
           count: vp.getImageIds().length }; }"""

ONE_TO_ONE = """() => { const cs = window.cornerstone;
  const vp = cs.getEnabledElements().map((e) => e.viewport).find((v) => v.getCurrentImageId && v.getCurrentImageId());
  const id = vp.getCurrentImageId(); const plane = cs.metaData.get('imagePlaneModule', id);
  const a = vp.worldToCanvas(cs.utilities.imageToWorldCoords(id, [0, 0]));
  const b = vp.worldToCanvas(cs.utilities.imageToWorldCoords(id, [plane.columns, 0]));
  vp.setZoom(vp.getZoom() * plane.columns / Math.hypot(b[0] - a[0], b[1] - a[1]));
  vp.render(); return vp.getZoom(); }"""

# The grey level drawn on the viewport's canvas at the centre of each image pixel asked for.
SAMPLE = """(points) => { const cs = window.cornerstone;
  const vp = cs.getEnabledElements().map((e) => e.viewport).find((v) => v.getCurrentImageId && v.getCurrentImageId());
  const id = vp.getCurrentImageId(); const canvas = vp.getCanvas(); const ratio = canvas.width / canvas.clientWidth;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  return points.map(([c, r]) => { const [x, y] = vp.worldToCanvas(cs.utilities.imageToWorldCoords(id, [c, r]));
    const i = (Math.floor(y * ratio) * canvas.width + Math.floor(x * ratio)) * 4;
    return x < 0 || y < 0 || x >= canvas.clientWidth || y >= canvas.clientHeight ? -1 : data[i]; }); }"""


def _shown(page: Any, *, index: int | None = None, timeout: float = 60_000) -> dict[str, Any]:
    wanted = "s" if index is None else f"s && s.index === {index}"
    page.wait_for_function(f"() => {{ const s = ({SHOWN})(); return {wanted}; }}", timeout=timeout)
    return dict(page.evaluate(SHOWN))


def _wheel(page: Any, *, notches: int, start: int) -> dict[str, Any]:
    """Turn the wheel one notch at a time, each moving the stack one image on (waited for, so a
    loaded machine cannot merge or drop a burst of wheel events); what is shown at the end."""
    for step in range(1, notches + 1):
        page.mouse.wheel(0, 120)
        shown = _shown(page, index=start + step)
    return shown


def _open(page: Any, *studies: Study, extra: str = "") -> dict[str, Any]:
    page.goto(f"/viewer?StudyInstanceUIDs={','.join(s.uid for s in studies)}{extra}")
    return _shown(page)


def _hub_render(page: Any, shown: dict[str, Any], frame: int = 1) -> np.ndarray:
    """The hub's own rendered frame (through the station's /dicomweb) at the window shown."""
    lower, upper = shown["voi"]["lower"], shown["voi"]["upper"]
    width = upper - lower + 1  # cornerstone's range for the linear function: c - 0.5 -/+ (w - 1) / 2
    center = lower + 0.5 + (width - 1) / 2
    path = shown["imageId"].removeprefix("wadors:").rsplit("/frames/", 1)[0]
    answer = page.request.get(f"{path}/frames/{frame}/rendered?window={center},{width},linear",
                              headers={"Accept": "image/png"})  # fmt: skip
    assert answer.status == 200, answer.text()
    return np.asarray(Image.open(io.BytesIO(answer.body())).convert("L"), dtype=np.int16)


def _points(shape: tuple[int, ...], step: int) -> list[list[int]]:
    rows, cols = shape[:2]
    return [[c, r] for r in range(2, rows - 2, step) for c in range(2, cols - 2, step)]


def _compare(
    page: Any, expected: np.ndarray, *, step: int = 4, points: list[list[int]] | None = None
) -> tuple[float, float]:
    """(share of sampled pixels within 2 grey levels, median absolute difference) of the canvas
    against ``expected`` at ``points`` (default: a grid over the image, away from its border)."""
    points = points if points is not None else _points(expected.shape, step)
    drawn = np.asarray(page.evaluate(SAMPLE, points), dtype=np.int16)
    want = np.asarray([expected[r, c] for c, r in points], dtype=np.int16)
    visible = drawn >= 0
    assert visible.sum() >= min(len(points), 1000), "the image should be on screen"
    diff = np.abs(drawn[visible] - want[visible])
    return float((diff <= 2).mean()), float(np.median(diff))


def _matches(page: Any, expected: np.ndarray, **kwargs: Any) -> None:
    """The canvas shows ``expected``: nearly every sample within 2 levels (an edge may blend over
    half a pixel), polled until the render lands."""
    last: tuple[float, float] = (0.0, 255.0)
    for _ in range(40):
        last = _compare(page, expected, **kwargs)
        if last[0] >= 0.97 and last[1] <= 1:
            return
        page.wait_for_timeout(250)
    raise AssertionError(
        f"the canvas differs from the hub's rendering: {last[0]:.1%} within 2 levels, median {last[1]}"
    )


def _inner(page: Any, part: str) -> Any:
    """The exam page's viewer frame once it has loaded a URL containing ``part``."""
    loaded = (
        "() => { const f = document.querySelector('iframe[data-testid=images]');"
        f" return f && f.contentWindow.location.href.includes({json.dumps(part)}); }}"
    )
    page.wait_for_function(loaded, timeout=20_000)
    return next(f for f in page.frames if part in f.url)


def _viewport_centre(page: Any) -> tuple[float, float]:
    box = page.locator("[data-cy=viewport-pane] canvas").first.bounding_box()
    return box["x"] + box["width"] / 2, box["y"] + box["height"] / 2


# ---- tests --------------------------------------------------------------------------------------
def test_slice_n_after_scrolling_has_the_hubs_rendered_pixels_at_one_to_one(page: Any, served: Served) -> None:
    first = _open(page, served.ct)
    assert first["count"] == CT_SLICES and first["index"] == 0
    x, y = _viewport_centre(page)
    page.mouse.move(x, y)
    shown = _wheel(page, notches=9, start=0)  # the wheel scrolls the stack, one slice a notch
    tenth = served.ct.instance(9)
    assert tenth.SOPInstanceUID in shown["imageId"] and tenth.InstanceNumber == 10
    page.keyboard.press("ArrowDown")  # and the keys, one slice a press
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowUp")
    shown = _shown(page, index=8)
    assert (round(shown["voi"]["lower"]), round(shown["voi"]["upper"])) == (-160, 239)  # the file's 40/400
    page.evaluate(ONE_TO_ONE)
    _matches(page, _hub_render(page, shown))
    # where the neighbouring slice differs (its marker sits elsewhere), the canvas has this slice's pixels
    neighbour = _hub_render(page, {**shown, "imageId": shown["imageId"].replace(
        served.ct.instance(8).SOPInstanceUID, served.ct.instance(7).SOPInstanceUID)})  # fmt: skip
    this = _hub_render(page, shown)
    rows, cols = np.nonzero(np.abs(this - neighbour) > 60)
    assert len(rows) > 100
    where = [[int(c), int(r)] for r, c in zip(rows, cols, strict=True)]
    assert _compare(page, this, points=where)[0] > 0.9 and _compare(page, neighbour, points=where)[0] < 0.1


def test_window_level_by_drag_and_by_preset_changes_the_pixels_as_computed(page: Any, served: Served) -> None:
    before = _open(page, served.ct)
    page.evaluate(ONE_TO_ONE)
    x, y = _viewport_centre(page)
    page.mouse.move(x, y)
    page.mouse.down()  # the left button is window/level in OHIF's default tools
    page.mouse.move(x + 60, y + 30, steps=6)
    page.mouse.up()
    page.wait_for_function(f"() => ({SHOWN})().voi.upper !== {before['voi']['upper']}")
    after = _shown(page)
    width = lambda s: s["voi"]["upper"] - s["voi"]["lower"]  # noqa: E731
    centre = lambda s: (s["voi"]["upper"] + s["voi"]["lower"]) / 2  # noqa: E731
    d_width, d_centre = width(after) - width(before), centre(after) - centre(before)
    assert d_width > 0 and d_centre > 0  # right widens, down raises the level
    assert d_width / 60 == pytest.approx(d_centre / 30, rel=0.1)  # one multiplier for both axes
    _matches(page, _hub_render(page, after))

    page.locator("[data-cy=windowLevelMenu-btn]").first.click()
    page.get_by_text("Modality Window Presets").first.click()
    page.get_by_text("Lung", exact=True).first.click()
    lung = page.wait_for_function(f"() => {{ const s = ({SHOWN})(); return s.voi.lower < -1000 && s; }}").json_value()
    assert (round(lung["voi"]["lower"]), round(lung["voi"]["upper"])) == (-1350, 149)  # 1500 / -600
    _matches(page, _hub_render(page, lung))
    lung_centre = [[77, 123]]  # the phantom's right lung: black at 40/400, grey in the lung window
    assert page.evaluate(SAMPLE, lung_centre)[0] > 40 and _hub_render(page, after)[123, 77] == 0


@pytest.mark.parametrize("which", ["j2k", "jls"])
def test_jpeg_2000_and_jpeg_ls_monochrome1_radiographs_are_decoded_and_shown(
    page: Any, served: Served, which: str
) -> None:
    study: Study = getattr(served, which)
    ds = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == (JPEG2000Lossless if which == "j2k" else JPEGLSLossless)
    assert served.stack.hub.renditions.flush()
    frames: list[str] = []  # the media type of each frame answer
    page.on("response", lambda r: frames.append(r.headers.get("content-type", "")) if "/frames/" in r.url else None)
    shown = _open(page, study)
    page.evaluate(ONE_TO_ONE)
    expected = _hub_render(page, shown)
    assert expected.shape == (ds.Rows, ds.Columns)  # full resolution
    _matches(page, expected, step=8)
    # a megapixel JPEG 2000 frame reaches OHIF as the hub's HTJ2K copy, decoded to the same pixels
    assert frames and all(("1.2.840.10008.1.2.4.201" in f) == (which == "j2k") for f in frames), frames
    if which == "jls":  # MONOCHROME1: the lungs are stored high and drawn dark, as the hub draws them
        assert ds.PhotometricInterpretation == "MONOCHROME1"
        stored = pydicom.dcmread(study.files[0]).pixel_array
        lung, mediastinum = (ds.Rows // 2, int(ds.Columns * 0.3)), (ds.Rows // 2, ds.Columns // 2)
        assert stored[lung] > stored[mediastinum] and expected[lung] < expected[mediastinum]
        drawn = page.evaluate(SAMPLE, [[lung[1], lung[0]], [mediastinum[1], mediastinum[0]]])
        assert drawn[0] < drawn[1]


def test_a_multi_frame_image_scrolls_frame_by_frame(page: Any, served: Served) -> None:
    first = _open(page, served.multiframe)
    assert first["count"] == 10 and "/frames/1" in first["imageId"]
    x, y = _viewport_centre(page)
    page.mouse.move(x, y)
    shown = _wheel(page, notches=4, start=0)
    assert shown["imageId"].endswith("/frames/5")
    page.evaluate(ONE_TO_ONE)
    _matches(page, _hub_render(page, shown, frame=5), step=2)


def test_another_alliances_study_is_not_reachable_and_the_refusal_is_audited(page: Any, served: Served) -> None:
    elsewhere = served.elsewhere
    one = elsewhere.instance(0)
    base = f"/dicomweb/studies/{elsewhere.uid}"
    assert page.request.get("/dicomweb/studies", params={"StudyInstanceUID": elsewhere.uid}).json() == []
    metadata = page.request.get(f"{base}/metadata")
    frame = page.request.get(f"{base}/series/{one.SeriesInstanceUID}/instances/{one.SOPInstanceUID}/frames/1")
    assert (metadata.status, metadata.json()["reason"]) == (404, "NO_INSTANCE")
    assert frame.status == 404
    with served.stack.hub.engine.connect() as conn:
        rows = conn.execute(select(events).where(events.c.type == "access_refused")).all()
    mine = [json.loads(r.detail) for r in rows if json.loads(r.detail)["study"] == elsewhere.uid]
    assert len(mine) >= 2 and all(d["exists"] and d["via"] == "dicomweb" for d in mine)
    assert {d["route"].rsplit("/", 1)[-1] for d in mine} >= {"metadata", "{frames}"}
    radiologist = served.stack.hub.authenticator.authenticate(f"Bearer {served.stack.tokens['radio']}")
    assert {r.actor_id for r in rows if json.loads(r.detail)["study"] == elsewhere.uid} == {radiologist.id}
    # the viewer opened on it shows nothing of it
    page.goto(f"/viewer?StudyInstanceUIDs={elsewhere.uid}")
    page.get_by_text("not available").wait_for()  # OHIF's own words for a study it was refused
    assert page.evaluate(SHOWN) is None


def test_the_exam_page_frames_the_images_with_the_saliency_overlay_and_the_prior_beside(
    page: Any, served: Served
) -> None:
    page.goto(f"/exam/{served.j2k.exam_id}")
    frame = page.frame_locator("iframe[data-testid=images]")
    inner = _inner(page, "/viewer")
    _shown(inner)
    toggle = frame.locator("#saliency-toggle")
    toggle.click()
    frame.locator("#saliency-overlay").wait_for()
    zones = inner.evaluate("() => window.telereadViewer.zones")
    weighed = frame.locator("#saliency-overlay rect[fill^='rgba']")
    assert len(zones) == 3 and weighed.count() == 3
    assert frame.locator("#saliency-overlay rect").count() == 9
    # the zone outlines follow the image: the centre zone's box holds the image's centre
    ds = served.j2k.instance(0)
    centre = inner.evaluate("""([c, r]) => { const cs = window.cornerstone;
      const vp = cs.getEnabledElements()[0].viewport;
      return vp.worldToCanvas(cs.utilities.imageToWorldCoords(vp.getCurrentImageId(), [c, r])); }""",
                            [ds.Columns / 2, ds.Rows / 2])  # fmt: skip
    box = frame.locator("#saliency-overlay rect[data-zone='central mid']")
    x, y, w, h = (float(box.get_attribute(k)) for k in ("x", "y", "width", "height"))
    assert x < centre[0] < x + w and y < centre[1] < y + h
    toggle.click()
    assert frame.locator("#saliency-overlay").count() == 0

    page.goto(f"/exam/{served.ct.exam_id}")
    kinds = page.get_by_test_id("object-kind")
    kinds.first.wait_for()
    assert kinds.count() == 1 and kinds.first.text_content().startswith(f"{CT_SLICES} × dicom · CT · ")
    compare = page.get_by_test_id("compare-prior")
    compare.click()
    inner = _inner(page, "hpCompare")
    inner.wait_for_function(
        """() => window.cornerstone && window.cornerstone.getEnabledElements()
        .filter((e) => e.viewport.getCurrentImageId && e.viewport.getCurrentImageId()).length === 2""",
        timeout=60_000,
    )
    shown = inner.evaluate("""() => window.cornerstone.getEnabledElements()
        .map((e) => e.viewport.getCurrentImageId && e.viewport.getCurrentImageId()).filter(Boolean)""")
    assert {s.split("/studies/")[1].split("/")[0] for s in shown} == {served.ct.uid, served.prior.uid}


# ---- without a browser --------------------------------------------------------------------------
def test_the_viewer_page_needs_a_session_and_keeps_its_files_to_itself(served: Served, tmp_path: Path) -> None:
    url = served.station.url
    signed_out = httpx.get(f"{url}/viewer?StudyInstanceUIDs=1.2.3", follow_redirects=False, timeout=10)
    assert (signed_out.status_code, signed_out.headers["location"]) == (303, "/")
    client = httpx.Client(base_url=url, timeout=10)
    login_csrf = client.get("/api/session").json()["login_csrf"]
    assert client.post("/api/login", json={"user": "dr-lung", "password": READER_PASSWORD},
                       headers={"X-CSRF-Token": login_csrf, "Origin": url}).status_code == 200  # fmt: skip
    viewer = client.get("/viewer?StudyInstanceUIDs=1.2.3")
    assert viewer.status_code == 200 and "/static/viewer-shell.js" in viewer.text
    csp = viewer.headers["content-security-policy"]
    assert "'wasm-unsafe-eval'" in csp and "'unsafe-eval'" not in csp and "frame-ancestors 'self'" in csp
    assert viewer.headers["x-frame-options"] == "SAMEORIGIN"
    assert "frame-ancestors 'none'" in client.get("/").headers["content-security-policy"]  # the rest is not framed
    config = client.get("/app-config.js")
    assert config.status_code == 200 and "qidoRoot: '/dicomweb'" in config.text
    assert client.get("/init-service-worker.js").text.startswith("// the station's viewer runs without")
    bundle = next(p.name for p in Viewer().dist.glob("app.bundle.*.js"))
    asset = client.get(f"/{bundle}")
    assert asset.status_code == 200 and "immutable" in asset.headers["cache-control"]
    for hostile in ("/..%2f..%2fpyproject.toml", "/sw.js", "/index.html", "/no-such-file.js"):
        assert client.get(hostile).status_code == 404, hostile
    missing = Viewer(tmp_path / "nothing")
    assert not missing.installed
    body = json.loads(missing._missing().body)
    assert body["error"]["reason"] == "VIEWER_NOT_INSTALLED"
