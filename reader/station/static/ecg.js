// The ECG viewer of the exam page: the hub's samples drawn on the standard grid at true physical
// scale (after a one-time calibration), calipers with march-out, zoom, the triage evidence on the
// trace and a prior ECG beside it. Canvas drawing in device pixels (sharp at any devicePixelRatio).
//
// Scale: a millimetre of paper is `devicePxPerMm()` device pixels. The reader calibrates it once per
// browser (matching an on-screen bar to a bank card, 85.6 mm wide, or typing it); it is kept in
// localStorage under CALIBRATION_KEY as device pixels per mm, so the browser's zoom (which changes
// devicePixelRatio) does not change the size on the screen. Without a calibration: 96 dpi CSS
// pixels (3.78 CSS px per mm) times devicePixelRatio.

import { el } from "./dom.js";

export const CALIBRATION_KEY = "teleread.ecg.devicePxPerMm";
const OPTIONS_KEY = "teleread.ecg.options";
export const CARD_MM = 85.6;
const CSS_PX_PER_MM = 96 / 25.4;
export const STANDARD = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"];
const COLUMNS = [["I", "II", "III"], ["aVR", "aVL", "aVF"], ["V1", "V2", "V3"], ["V4", "V5", "V6"]];
export const SPEEDS = [25, 50];
export const GAINS = [5, 10, 20];
const SHEET_SECONDS = 10;
const COLORS = {
  paper: "#fff7f7", minor: "#f2c4c4", major: "#e08a8a", trace: "#000000", prior: "#1d3f8f",
  label: "#3a1010", pause: "rgba(255, 176, 0, 0.35)", st: "#d9480f", lead: "#1c7ed6",
  caliper: "#0b7285", flash: "#f59f00", zoomBox: "rgba(28, 126, 214, 0.15)",
};
export const KEYS = [
  ["Alt+L", "layout 3×4 + II / 12×1"], ["Alt+P", "paper speed 25 / 50 mm/s"], ["Alt+G", "gain 5 / 10 / 20 mm/mV"],
  ["Alt+T", "time caliper"], ["Alt+A", "amplitude caliper"], ["Alt+Z", "zoom tool"], ["Alt+M", "march-out"],
  ["Alt+X", "clear calipers and zoom"], ["Alt+K", "compare with the prior"],
];

const link = document.createElement("link");  // the viewer's styles come with it
link.rel = "stylesheet"; link.href = "/static/ecg.css";
document.head.append(link);

export function devicePxPerMm() {
  const stored = Number(localStorage.getItem(CALIBRATION_KEY));
  if (Number.isFinite(stored) && stored >= 1 && stored <= 100) return stored;
  return CSS_PX_PER_MM * (window.devicePixelRatio || 1);
}

export function calibrate(value) {
  if (value === null) localStorage.removeItem(CALIBRATION_KEY);
  else localStorage.setItem(CALIBRATION_KEY, String(value));
}

// ---- the samples -----------------------------------------------------------------------------
export class EcgError extends Error {
  constructor(status, reason, message) { super(message); this.status = status; this.reason = reason; }
}

// The station's binary answer: uint32 header length, JSON header, padding, Int16 µV lead after lead.
export async function fetchEcg(examId) {
  const response = await fetch(`/api/exams/${encodeURIComponent(examId)}/ecg`, { credentials: "same-origin" });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    const err = data.error || {};
    throw new EcgError(response.status, err.reason || String(response.status), err.message || response.statusText);
  }
  const buffer = await response.arrayBuffer();
  const length = new DataView(buffer).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, length)));
  let offset = 4 + length;
  const leads = header.leads.map((name, i) => {
    const uv = new Int16Array(buffer, offset, header.samples[i]);
    offset += header.samples[i] * 2;
    return { name, uv };
  });
  return { fs: header.fs, duration: header.duration_s, source: header.source, clipped: header.clipped, leads };
}

// ---- geometry (mm of paper) --------------------------------------------------------------------
const round5 = (mm) => Math.round(mm / 5) * 5;
const key = (name) => String(name || "").toUpperCase();

function hasTwelve(ecg) {
  const names = new Set(ecg.leads.map((l) => l.name));
  return STANDARD.every((n) => names.has(n));
}

// Rows and cells of a sheet in mm: each cell one lead over [t0, t1) starting at x (mm), with its
// baseline at y (mm). A 1 mV calibration pulse opens each row.
export function plan(ecg, { layout, speed, gain }) {
  const seconds = Math.min(SHEET_SECONDS, ecg.duration);
  const pulse = 0.4 * speed;  // the calibration pulse's room (a multiple of 5 mm)
  const byName = new Map(ecg.leads.map((l, i) => [l.name, i]));
  const rows = [];
  const cells = [];
  const row = (height) => {
    const top = rows.length ? rows[rows.length - 1].top + rows[rows.length - 1].height : 0;
    const r = { top, height, base: top + round5(height * 0.6) };
    rows.push(r);
    return r;
  };
  if (layout === "3x4" && hasTwelve(ecg)) {
    const height = Math.max(20, 3 * gain);
    const column = seconds / 4;
    for (let r = 0; r < 3; r += 1) {
      const at = row(height);
      COLUMNS.forEach((names, c) => cells.push({ lead: names[r], index: byName.get(names[r]), row: rows.length - 1,
        t0: c * column, t1: (c + 1) * column, x: pulse + c * column * speed, y: at.base, top: at.top, height }));
    }
    const rhythm = byName.has("II") ? "II" : ecg.leads[0].name;
    const at = row(height);
    cells.push({ lead: rhythm, index: byName.get(rhythm), row: rows.length - 1, rhythm: true,
      t0: 0, t1: seconds, x: pulse, y: at.base, top: at.top, height });
  } else {  // 12x1, or whatever leads the record has, stacked
    const height = Math.max(15, 2 * gain);
    const order = hasTwelve(ecg) ? STANDARD : ecg.leads.map((l) => l.name);
    for (const name of order) {
      const at = row(height);
      cells.push({ lead: name, index: byName.get(name), row: rows.length - 1, rhythm: true,
        t0: 0, t1: seconds, x: pulse, y: at.base, top: at.top, height });
    }
  }
  for (const cell of cells) cell.width = (cell.t1 - cell.t0) * speed;
  const last = rows[rows.length - 1];
  return { rows, cells, width: pulse + seconds * speed, height: last.top + last.height, pulse, speed, gain, seconds };
}

// ---- drawing -----------------------------------------------------------------------------------
function sizeCanvas(canvas, widthPx, heightPx) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.round(widthPx); canvas.height = Math.round(heightPx);
  canvas.style.width = `${canvas.width / dpr}px`;  // CSSOM (the page's CSP allows no style attribute)
  canvas.style.height = `${canvas.height / dpr}px`;
}

function drawGrid(ctx, width, height, mmPx) {
  ctx.fillStyle = COLORS.paper; ctx.fillRect(0, 0, width, height);
  const dpr = window.devicePixelRatio || 1;
  const majorWidth = dpr >= 2 ? 2 : 1;
  for (const major of [false, true]) {  // the major lines over the minor ones
    ctx.fillStyle = major ? COLORS.major : COLORS.minor;
    const w = major ? majorWidth : 1;
    for (let k = 0; k * mmPx <= width; k += 1) {
      if ((k % 5 === 0) === major) ctx.fillRect(Math.round(k * mmPx) - (w > 1 ? 1 : 0), 0, w, height);
    }
    for (let k = 0; k * mmPx <= height; k += 1) {
      if ((k % 5 === 0) === major) ctx.fillRect(0, Math.round(k * mmPx) - (w > 1 ? 1 : 0), width, w);
    }
  }
}

function trace(ctx, samples, fs, { t0, t1, x0, y0, pxPerS, pxPerMv, color, lineWidth }) {
  const i0 = Math.max(0, Math.floor(t0 * fs));
  const i1 = Math.min(samples.length - 1, Math.ceil(t1 * fs));
  if (i1 <= i0) return;
  const perUv = pxPerMv / 1000;
  ctx.strokeStyle = color; ctx.lineWidth = lineWidth; ctx.lineJoin = "round";
  ctx.beginPath();
  const perPx = Math.floor(fs / pxPerS);  // samples per device pixel: drawn as each column's min and max
  if (perPx >= 4) {
    let started = false;
    for (let i = i0; i <= i1; i += perPx) {
      let lo = samples[i]; let hi = lo;
      const end = Math.min(i1, i + perPx - 1);
      for (let j = i + 1; j <= end; j += 1) { const v = samples[j]; if (v < lo) lo = v; else if (v > hi) hi = v; }
      const x = x0 + ((i + end) / 2 / fs - t0) * pxPerS;
      const first = samples[i] <= samples[end] ? lo : hi;
      const second = first === lo ? hi : lo;
      if (!started) { ctx.moveTo(x, y0 - first * perUv); started = true; } else ctx.lineTo(x, y0 - first * perUv);
      ctx.lineTo(x, y0 - second * perUv);
    }
  } else {
    ctx.moveTo(x0 + (i0 / fs - t0) * pxPerS, y0 - samples[i0] * perUv);
    for (let i = i0 + 1; i <= i1; i += 1) ctx.lineTo(x0 + (i / fs - t0) * pxPerS, y0 - samples[i] * perUv);
  }
  ctx.stroke();
}

function pulse(ctx, { x, y, speed, pxPerMv, mmPx, lineWidth }) {
  const dx = 0.1 * speed * mmPx;  // rises 0.1 s in, 0.2 s wide, 1 mV high
  ctx.strokeStyle = COLORS.trace; ctx.lineWidth = lineWidth;
  ctx.beginPath();
  ctx.moveTo(x, y); ctx.lineTo(x + dx, y); ctx.lineTo(x + dx, y - pxPerMv); ctx.lineTo(x + 3 * dx, y - pxPerMv);
  ctx.lineTo(x + 3 * dx, y); ctx.lineTo(x + 4 * dx, y);
  ctx.stroke();
}

// One sheet: sized and laid out at once (its geometry, in device pixels), painted by tiles: only
// the tiles in view (and a margin) are drawn, the others when they scroll into view. Chromium
// rasterises a canvas's drawing when the frame is painted, so a sheet drawn whole cost its full
// area (2,000 x 1,800 pixels at 50 mm/s and 20 mm/mV) on every switch of speed or gain.
const TILE = 512;  // device px

function layoutSheet(canvas, ecg, options, marks, { color = COLORS.trace, title = "" } = {}) {
  const mmPx = devicePxPerMm();
  const p = plan(ecg, options);
  sizeCanvas(canvas, p.width * mmPx, p.height * mmPx);
  const pxPerS = options.speed * mmPx;
  const pxPerMv = options.gain * mmPx;
  const cells = p.cells.map((c) => ({
    lead: c.lead, row: c.row, rhythm: Boolean(c.rhythm), t0: c.t0, t1: c.t1,
    x0: Math.round(c.x * mmPx), y0: Math.round(c.y * mmPx), left: Math.round(c.x * mmPx),
    right: Math.round((c.x + c.width) * mmPx), top: Math.round(c.top * mmPx), bottom: Math.round((c.top + c.height) * mmPx),
  }));
  const geometry = { mmPx, pxPerS, pxPerMv, cells, fs: ecg.fs };
  canvas.dataset.cells = JSON.stringify(cells);
  canvas.dataset.pxPerS = String(pxPerS); canvas.dataset.pxPerMv = String(pxPerMv); canvas.dataset.mmPx = String(mmPx);
  canvas.dataset.tiles = "0";
  const columns = Math.ceil(canvas.width / TILE); const rows = Math.ceil(canvas.height / TILE);
  return { canvas, ecg, options, marks, color, title, rows: p.rows, geometry, columns, tileRows: rows, painted: new Set() };
}

// Paint the sheet's tiles that intersect `rect` (device px) and are not painted yet; true if any.
function paintTiles(sheet, rect) {
  const { canvas } = sheet;
  const want = [];
  const cx0 = Math.max(0, Math.floor(rect.x0 / TILE)); const cx1 = Math.min(sheet.columns - 1, Math.floor((rect.x1 - 1) / TILE));
  const cy0 = Math.max(0, Math.floor(rect.y0 / TILE)); const cy1 = Math.min(sheet.tileRows - 1, Math.floor((rect.y1 - 1) / TILE));
  for (let ty = cy0; ty <= cy1; ty += 1) {
    for (let tx = cx0; tx <= cx1; tx += 1) if (!sheet.painted.has(ty * sheet.columns + tx)) want.push([tx, ty]);
  }
  if (!want.length) return false;
  const ctx = canvas.getContext("2d");
  ctx.save();
  ctx.beginPath();
  for (const [tx, ty] of want) {
    ctx.rect(tx * TILE, ty * TILE, TILE, TILE);
    sheet.painted.add(ty * sheet.columns + tx);
  }
  ctx.clip();
  paintSheet(ctx, sheet);
  ctx.restore();
  canvas.dataset.tiles = String(sheet.painted.size);
  canvas.dataset.complete = String(sheet.painted.size === sheet.columns * sheet.tileRows);
  return true;
}

// Grid, evidence, pulses, traces and labels (clipped by the caller to the tiles being painted).
function paintSheet(ctx, sheet) {
  const { canvas, ecg, options, marks, color, title, geometry: g } = sheet;
  const { mmPx, pxPerS, pxPerMv, cells } = g;
  drawGrid(ctx, canvas.width, canvas.height, mmPx);
  const dpr = window.devicePixelRatio || 1;
  const lineWidth = 1.25 * dpr;
  // a pause (evidence placed on the trace): shaded where it is, on the rhythm strips
  for (const m of marks.spans) {
    for (const c of cells.filter((cell) => cell.rhythm)) {
      const a = c.x0 + Math.max(0, m.at - c.t0) * pxPerS;
      const b = c.x0 + Math.min(c.t1 - c.t0, m.at + m.duration - c.t0) * pxPerS;
      if (b <= a) continue;
      ctx.fillStyle = COLORS.pause; ctx.fillRect(a, c.top, b - a, c.bottom - c.top);
      ctx.fillStyle = COLORS.label; ctx.font = `bold ${11 * dpr}px system-ui, sans-serif`;
      ctx.fillText(`${m.label} ${m.duration.toFixed(2)} s`, a + 3 * dpr, c.bottom - 4 * dpr);
    }
  }
  for (const r of sheet.rows) pulse(ctx, { x: 0, y: Math.round(r.base * mmPx), speed: options.speed, pxPerMv, mmPx, lineWidth });
  ctx.font = `${11 * dpr}px system-ui, sans-serif`;
  for (const c of cells) {
    const lead = ecg.leads.find((l) => l.name === c.lead);
    if (!lead) continue;
    trace(ctx, lead.uv, ecg.fs, { t0: c.t0, t1: c.t1, x0: c.x0, y0: c.y0, pxPerS, pxPerMv, color, lineWidth });
    const st = marks.st.get(key(c.lead));
    const flagged = marks.leads.has(key(c.lead));
    if (st !== undefined || flagged) {
      ctx.strokeStyle = st !== undefined ? COLORS.st : COLORS.lead; ctx.lineWidth = 2 * dpr;
      ctx.strokeRect(c.left + dpr, c.top + dpr, c.right - c.left - 2 * dpr, c.bottom - c.top - 2 * dpr);
    }
    ctx.fillStyle = st !== undefined ? COLORS.st : flagged ? COLORS.lead : COLORS.label;
    const text = st !== undefined ? `${c.lead}  ST ${st >= 0 ? "+" : ""}${st.toFixed(2)} mV` : c.lead;
    ctx.font = `${st !== undefined || flagged ? "bold " : ""}${11 * dpr}px system-ui, sans-serif`;
    ctx.fillText(text, c.left + 3 * dpr, c.top + 12 * dpr);
    if (c.t0 > 0 && !c.rhythm) {  // the column change, as on paper
      ctx.fillStyle = COLORS.trace; ctx.fillRect(c.left, c.y0 - 4 * mmPx, Math.max(1, dpr), 8 * mmPx);
    }
  }
  if (title) {
    ctx.fillStyle = COLORS.label; ctx.font = `bold ${12 * dpr}px system-ui, sans-serif`;
    ctx.fillText(title, canvas.width - ctx.measureText(title).width - 6 * dpr, 14 * dpr);
  }
}

// The part of `canvas` in view inside `scroller` and the window, in the canvas's device pixels
// (the tiles reach past it by up to a tile; a margin of half a view cost 30-50 ms more per switch).
function inView(canvas, scroller) {
  const dpr = window.devicePixelRatio || 1;
  const c = canvas.getBoundingClientRect(); const s = scroller.getBoundingClientRect();
  const left = Math.max(s.left, 0); const right = Math.min(s.right, window.innerWidth);
  const top = Math.max(s.top, 0); const bottom = Math.min(s.bottom, window.innerHeight);
  return { x0: (left - c.left) * dpr, x1: (right - c.left) * dpr, y0: (top - c.top) * dpr, y1: (bottom - c.top) * dpr };
}

// A zoomed window of one lead: the grid and the trace magnified `factor` times.
function drawZoom(canvas, ecg, options, zoom, marks, widthCss) {
  const dpr = window.devicePixelRatio || 1;
  const mmPx = devicePxPerMm();
  const lead = ecg.leads.find((l) => l.name === zoom.lead) || ecg.leads[0];
  const span = Math.max(0.2, zoom.t1 - zoom.t0);
  const fit = (widthCss * dpr) / (span * options.speed * mmPx);
  const factor = Math.max(1, Math.min(8, Math.floor(fit * 2) / 2));
  const zmm = mmPx * factor;
  const height = Math.max(30, 3 * options.gain) * zmm;
  const width = span * options.speed * zmm;
  sizeCanvas(canvas, width, height);
  const ctx = canvas.getContext("2d");
  drawGrid(ctx, canvas.width, canvas.height, zmm);
  const pxPerS = options.speed * zmm;
  const pxPerMv = options.gain * zmm;
  const y0 = Math.round(round5(height / zmm * 0.6) * zmm);
  for (const m of marks.spans) {
    const a = Math.max(0, m.at - zoom.t0) * pxPerS;
    const b = Math.min(span, m.at + m.duration - zoom.t0) * pxPerS;
    if (b > a) { ctx.fillStyle = COLORS.pause; ctx.fillRect(a, 0, b - a, canvas.height); }
  }
  trace(ctx, lead.uv, ecg.fs, { t0: zoom.t0, t1: zoom.t1, x0: 0, y0, pxPerS, pxPerMv, color: COLORS.trace, lineWidth: 1.5 * dpr });
  ctx.fillStyle = COLORS.label; ctx.font = `bold ${12 * dpr}px system-ui, sans-serif`;
  ctx.fillText(`${lead.name} ×${factor} · ${zoom.t0.toFixed(2)}–${zoom.t1.toFixed(2)} s`, 6 * dpr, 14 * dpr);
  const cells = [{ lead: lead.name, row: 0, rhythm: true, t0: zoom.t0, t1: zoom.t1, x0: 0, y0, left: 0,
    right: canvas.width, top: 0, bottom: canvas.height }];
  canvas.dataset.cells = JSON.stringify(cells); canvas.dataset.factor = String(factor);
  canvas.dataset.pxPerS = String(pxPerS); canvas.dataset.pxPerMv = String(pxPerMv);
  return { mmPx: zmm, pxPerS, pxPerMv, cells, fs: ecg.fs, factor };
}

// ---- what the triage put on the trace ---------------------------------------------------------
export function evidenceMarks(findings) {
  const spans = [];
  const st = new Map();
  const leads = new Set();
  for (const f of findings || []) {
    for (const e of f.evidence || []) {
      if (Number(e.duration_s) > 0) spans.push({ at: Number(e.at_s || 0), duration: Number(e.duration_s), label: e.name === "longest_pause_s" ? "pause" : e.name });
      if (e.name === "st_deviation_mv" && e.lead) st.set(key(e.lead), Number(e.value || 0));
      else if (e.lead && (f.level === "LEVEL_CRITICAL" || f.level === "LEVEL_URGENT")) leads.add(key(e.lead));
    }
  }
  return { spans, st, leads };
}

function measurementsText(m = {}) {
  const v = (x, unit, digits = 0) => (x === undefined || x === null ? "—" : `${Number(x).toFixed(digits)}${unit}`);
  return [
    ["Rate", v(m.heart_rate_bpm, " bpm")], ["RR", v(m.rr_ms, " ms")], ["PR", v(m.pr_ms, " ms")], ["QRS", v(m.qrs_ms, " ms")],
    ["QT", v(m.qt_ms, " ms")], ["QTc B", v(m.qtc_bazett_ms, " ms")], ["QTc F", v(m.qtc_fridericia_ms, " ms")],
    ["Axes P/QRS/T", [m.p_axis_deg, m.qrs_axis_deg, m.t_axis_deg].map((a) => v(a, "°")).join(" / ")],
  ];
}

// ---- the viewer ----------------------------------------------------------------------------------

function select(testid, title, values, current, label) {
  const s = el("select", { dataset: { testid }, title });
  for (const [value, text] of values) s.append(el("option", { value: String(value) }, text));
  s.value = String(current);
  return [el("label", {}, label, s), s];
}

function storedOptions() {
  try {
    const o = JSON.parse(localStorage.getItem(OPTIONS_KEY) || "{}");
    return { layout: o.layout === "12x1" ? "12x1" : "3x4", speed: SPEEDS.includes(o.speed) ? o.speed : 25, gain: GAINS.includes(o.gain) ? o.gain : 10 };
  } catch (e) { return { layout: "3x4", speed: 25, gain: 10 }; }
}

export class EcgViewer {
  // root: the viewer's element; exam: the hub's Exam (JSON); priors: earlier exams; samples: a
  // promise of fetchEcg(exam id) (the page may have started it before the exam's details came).
  constructor(root, { exam, priors = [], samples }) {
    this.root = root;
    this.exam = exam;
    this.options = storedOptions();
    this.tool = "time";
    this.marchOut = false;
    this.caliper = null;     // {surface, kind, a: {x, y}, b: {x, y}}
    this.zoom = null;        // {lead, t0, t1}
    this.prior = null;       // {exam, ecg}
    this.draws = 0;
    this.marks = evidenceMarks((exam.triage || {}).findings);
    this.priors = (priors || []).filter((p) => p.kind === "EXAM_KIND_ECG");
    this.build();
    this.ecg = null;
    this.ready = Promise.resolve(samples).then((ecg) => { this.ecg = ecg; this.draw(); }).catch((err) => {
      this.root.dataset.state = "error";
      this.status.textContent = `The ECG cannot be shown: ${err.message}`;
    });
  }

  // The hub's measurements in the header (again when a second triage pass brought more).
  setMeasurements(m) {
    this.header.replaceChildren(...measurementsText(m || {}).map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v))));
  }

  build() {
    const r = this.root;
    r.replaceChildren();
    r.classList.add("ecg-viewer");
    r.dataset.state = "loading";
    r.dataset.testid = "viewer";
    const header = el("dl", { class: "ecg-measurements", dataset: { testid: "ecg-measurements" } });
    this.header = header;
    this.setMeasurements((this.exam.triage || {}).ecg);
    const [layoutLabel, layout] = select("ecg-layout", "layout (Alt+L)", [["3x4", "3×4 + II"], ["12x1", "12×1"]], this.options.layout, "Layout ");
    const [speedLabel, speed] = select("ecg-speed", "paper speed (Alt+P)", SPEEDS.map((s) => [s, `${s} mm/s`]), this.options.speed, "Speed ");
    const [gainLabel, gain] = select("ecg-gain", "gain (Alt+G)", GAINS.map((g) => [g, `${g} mm/mV`]), this.options.gain, "Gain ");
    layout.addEventListener("change", () => this.set({ layout: layout.value }));
    speed.addEventListener("change", () => this.set({ speed: Number(speed.value) }));
    gain.addEventListener("change", () => this.set({ gain: Number(gain.value) }));
    this.controls = { layout, speed, gain };
    const tools = el("span", { class: "ecg-tools" });
    this.toolButtons = {};
    for (const [tool, text, k] of [["time", "Time caliper", "T"], ["amplitude", "Amplitude caliper", "A"], ["zoom", "Zoom", "Z"]]) {
      const b = el("button", { type: "button", dataset: { testid: `ecg-tool-${tool}` }, title: `${text} (Alt+${k})` }, text);
      b.addEventListener("click", () => this.setTool(tool));
      this.toolButtons[tool] = b;
      tools.append(b);
    }
    const march = el("button", { type: "button", dataset: { testid: "ecg-march" }, title: "march-out (Alt+M)" }, "March-out");
    march.addEventListener("click", () => this.toggleMarch());
    const clear = el("button", { type: "button", dataset: { testid: "ecg-clear" }, title: "clear (Alt+X)" }, "Clear");
    clear.addEventListener("click", () => this.clear());
    const cal = el("button", { type: "button", dataset: { testid: "ecg-calibrate" }, title: "match the screen to millimetres" }, "Calibrate…");
    cal.addEventListener("click", () => this.toggleCalibration());
    this.marchButton = march;
    const toolbar = el("div", { class: "ecg-toolbar" }, layoutLabel, speedLabel, gainLabel, tools, march, clear);
    if (this.priors.length) {
      const [priorLabel, prior] = select("ecg-prior-select", "an earlier ECG of this patient",
        this.priors.map((p) => [p.exam_id, `${p.received_at ? new Date(p.received_at).toLocaleDateString() : ""} ${p.state}`]), this.priors[0].exam_id, "Prior ");
      const compare = el("button", { type: "button", dataset: { testid: "ecg-compare" }, title: "compare with the prior (Alt+K)" }, "Compare");
      compare.addEventListener("click", () => this.toggleCompare());
      this.priorSelect = prior; this.compareButton = compare;
      toolbar.append(priorLabel, compare);
    }
    toolbar.append(cal);
    this.readout = el("span", { class: "ecg-readout", dataset: { testid: "caliper-readout" } });
    this.status = el("p", { class: "note", dataset: { testid: "ecg-status" } }, "loading the ECG…");
    this.calibration = el("div", { class: "ecg-calibration", dataset: { testid: "ecg-calibration" } });
    this.calibration.hidden = true;
    this.canvas = el("canvas", { dataset: { testid: "ecg-trace" } });
    this.overlay = el("canvas", { class: "ecg-overlay", dataset: { testid: "ecg-overlay" } });
    this.sheet = el("div", { class: "ecg-sheet" }, this.canvas, this.overlay);
    this.priorCanvas = el("canvas", { dataset: { testid: "ecg-prior" } });
    this.priorOverlay = el("canvas", { class: "ecg-overlay" });
    this.priorSheet = el("div", { class: "ecg-sheet" }, this.priorCanvas, this.priorOverlay);
    this.priorSheet.hidden = true;
    this.scroller = el("div", { class: "ecg-scroll" }, this.sheet, this.priorSheet);
    this.zoomCanvas = el("canvas", { dataset: { testid: "ecg-zoom" } });
    this.zoomOverlay = el("canvas", { class: "ecg-overlay" });
    this.zoomSheet = el("div", { class: "ecg-sheet ecg-zoom" }, this.zoomCanvas, this.zoomOverlay);
    this.zoomSheet.hidden = true;
    const keys = el("p", { class: "ecg-keys note", dataset: { testid: "ecg-keys" } },
      ...KEYS.flatMap(([k, what]) => [el("kbd", {}, k), ` ${what} · `]), "drag: measure · double-click: zoom into a beat");
    r.append(header, toolbar, this.calibration, el("div", { class: "ecg-readout-row" }, this.readout), this.status, this.scroller, this.zoomSheet, keys);
    this.surfaces = {
      main: { canvas: this.canvas, overlay: this.overlay, geometry: null },
      prior: { canvas: this.priorCanvas, overlay: this.priorOverlay, geometry: null },
      zoom: { canvas: this.zoomCanvas, overlay: this.zoomOverlay, geometry: null },
    };
    for (const [name, s] of Object.entries(this.surfaces)) this.bindPointer(name, s);
    this.paints = 0;
    this.scroller.addEventListener("scroll", () => this.onScroll(), { passive: true });
    window.addEventListener("scroll", () => this.onScroll(), { passive: true });
    new ResizeObserver(() => this.onScroll()).observe(this.scroller);  // shown, or the window resized
    this.setTool("time");
  }

  set(changes) {
    Object.assign(this.options, changes);
    localStorage.setItem(OPTIONS_KEY, JSON.stringify(this.options));
    for (const [k, c] of Object.entries(this.controls)) c.value = String(this.options[k]);
    this.caliper = null;
    this.draw();
  }

  setTool(tool) {
    this.tool = tool;
    for (const [t, b] of Object.entries(this.toolButtons)) b.setAttribute("aria-pressed", String(t === tool));
    this.root.dataset.tool = tool;
  }

  toggleMarch() {
    this.marchOut = !this.marchOut;
    this.marchButton.setAttribute("aria-pressed", String(this.marchOut));
    this.drawOverlays();
  }

  clear() {
    this.caliper = null; this.zoom = null; this.readout.textContent = "";
    this.zoomSheet.hidden = true;
    this.drawOverlays();
  }

  // Everything drawn again (the options changed, or the samples arrived).
  draw() {
    if (!this.ecg) return;
    const started = performance.now();
    const ecg = this.ecg;
    this.status.textContent = `${ecg.leads.length} lead(s) · ${ecg.fs} Hz · ${ecg.duration.toFixed(1)} s · ${ecg.source.toUpperCase()}`
      + (ecg.clipped ? ` · ${ecg.clipped} samples beyond ±32 mV clipped` : "");
    const twelve = hasTwelve(ecg);
    this.controls.layout.disabled = !twelve;
    const options = { ...this.options, layout: twelve ? this.options.layout : "stacked" };
    const main = this.surfaces.main;
    main.sheet = layoutSheet(this.canvas, ecg, options, this.marks);
    main.geometry = main.sheet.geometry;
    const prior = this.surfaces.prior;
    if (this.prior && this.prior.ecg) {
      this.priorSheet.hidden = false;
      const when = this.prior.exam.received_at ? new Date(this.prior.exam.received_at).toLocaleDateString() : "";
      prior.sheet = layoutSheet(this.priorCanvas, this.prior.ecg, { ...options, layout: hasTwelve(this.prior.ecg) ? this.options.layout : "stacked" },
        evidenceMarks(((this.prior.exam.triage || {}).findings)), { color: COLORS.prior, title: `prior ${when}` });
      prior.geometry = prior.sheet.geometry;
    } else { this.priorSheet.hidden = true; prior.sheet = null; }
    this.paintInView();
    if (this.zoom) this.drawZoomPanel();
    this.drawOverlays();
    this.draws += 1;
    const r = this.root.dataset;
    Object.assign(r, { state: "drawn", draws: String(this.draws), layout: options.layout, speed: String(options.speed),
      gain: String(options.gain), mmPx: String(this.surfaces.main.geometry.mmPx), drawMs: (performance.now() - started).toFixed(1) });
  }

  // Paint the tiles of the sheets that are in view (after a draw, a scroll or a resize).
  paintInView() {
    let painted = false;
    for (const name of ["main", "prior"]) {
      const sheet = this.surfaces[name].sheet;
      if (sheet) painted = paintTiles(sheet, inView(sheet.canvas, this.scroller)) || painted;
    }
    return painted;
  }

  onScroll() {
    if (this.scrollPending || !this.ecg) return;
    this.scrollPending = true;
    requestAnimationFrame(() => {
      this.scrollPending = false;
      if (this.paintInView()) { this.paints += 1; this.root.dataset.paints = String(this.paints); }
    });
  }

  drawZoomPanel() {
    this.zoomSheet.hidden = false;
    const width = Math.max(300, this.scroller.clientWidth - 4);
    this.surfaces.zoom.geometry = drawZoom(this.zoomCanvas, this.ecg, this.options, this.zoom, this.marks, width);
    this.root.dataset.zoom = `${this.zoom.lead} ${this.zoom.t0.toFixed(3)} ${this.zoom.t1.toFixed(3)}`;
  }

  zoomTo(lead, t0, t1) {
    if (!this.ecg) return;
    const a = Math.max(0, Math.min(t0, t1)); const b = Math.min(this.ecg.duration, Math.max(t0, t1));
    this.zoom = { lead, t0: a, t1: Math.max(b, a + 0.2) };
    if (this.caliper && this.caliper.surface === "zoom") this.caliper = null;
    this.drawZoomPanel();
    this.drawOverlays();
  }

  async toggleCompare() {
    if (!this.priorSelect) return;
    if (this.prior) { this.prior = null; this.compareButton.setAttribute("aria-pressed", "false"); this.draw(); return; }
    const exam = this.priors.find((p) => p.exam_id === this.priorSelect.value);
    this.compareButton.setAttribute("aria-pressed", "true");
    this.prior = { exam, ecg: null };
    try {
      this.prior.ecg = await fetchEcg(exam.exam_id);
      this.root.dataset.prior = exam.exam_id;
    } catch (err) {
      this.prior = null; this.status.textContent = `The prior ECG cannot be shown: ${err.message}`;
    }
    this.draw();
  }

  toggleCalibration() {
    const box = this.calibration;
    box.hidden = !box.hidden;
    if (box.hidden) return;
    const dpr = window.devicePixelRatio || 1;
    let value = devicePxPerMm();
    const bar = el("div", { class: "ecg-card-bar", dataset: { testid: "ecg-card-bar" } });
    const input = el("input", { type: "number", step: "0.01", min: "1", max: "100", dataset: { testid: "ecg-px-per-mm" } });
    const size = () => { bar.style.width = `${(CARD_MM * value) / dpr}px`; input.value = value.toFixed(3); };
    const nudge = (f) => () => { value *= f; size(); };
    const minus = el("button", { type: "button" }, "−"); minus.addEventListener("click", nudge(1 / 1.005));
    const plus = el("button", { type: "button" }, "+"); plus.addEventListener("click", nudge(1.005));
    input.addEventListener("change", () => { const v = Number(input.value); if (v >= 1 && v <= 100) { value = v; size(); } });
    const save = el("button", { type: "button", class: "primary", dataset: { testid: "ecg-calibration-save" } }, "Save");
    save.addEventListener("click", () => { calibrate(value); box.hidden = true; this.draw(); });
    const reset = el("button", { type: "button" }, "Default (96 dpi)");
    reset.addEventListener("click", () => { calibrate(null); value = devicePxPerMm(); size(); this.draw(); });
    box.replaceChildren(el("p", {}, "Hold a bank card (85.6 mm wide) against the screen and make the bar as wide as the card, or type the device pixels per mm."),
      bar, el("div", { class: "ecg-toolbar" }, minus, plus, el("label", {}, "device px per mm ", input), save, reset));
    size();
  }

  // ---- calipers, march-out, zoom by drag ----------------------------------------------------
  // (on the trace's canvas: the overlay above it takes no pointer events, and has a size only
  // while something is drawn on it: a canvas as large as the sheet costs a frame to composite)
  bindPointer(name, surface) {
    const overlay = surface.canvas;
    const at = (event) => {
      const scale = overlay.width / overlay.clientWidth;
      return { x: event.offsetX * scale, y: event.offsetY * scale };
    };
    overlay.addEventListener("pointerdown", (event) => {
      if (!surface.geometry || event.button !== 0) return;
      const p = at(event);
      overlay.setPointerCapture(event.pointerId);
      const kind = this.tool === "zoom" && name !== "zoom" ? "zoom" : this.tool === "amplitude" ? "amplitude" : "time";
      this.caliper = { surface: name, kind, a: p, b: p, cell: cellAt(surface.geometry, p) };
      this.drawOverlays();
    });
    overlay.addEventListener("pointermove", (event) => {
      if (!this.caliper || this.caliper.surface !== name || !overlay.hasPointerCapture(event.pointerId)) return;
      this.caliper.b = at(event);
      this.drawOverlays();
    });
    overlay.addEventListener("pointerup", (event) => {
      if (!this.caliper || this.caliper.surface !== name) return;
      this.caliper.b = at(event);
      overlay.releasePointerCapture(event.pointerId);
      if (this.caliper.kind === "zoom") {
        const c = this.caliper.cell;
        const g = surface.geometry;
        const caliper = this.caliper;
        this.caliper = null;
        if (c && Math.abs(caliper.b.x - caliper.a.x) > 4) {
          this.zoomTo(c.lead, c.t0 + (caliper.a.x - c.x0) / g.pxPerS, c.t0 + (caliper.b.x - c.x0) / g.pxPerS);
        } else this.drawOverlays();
        return;
      }
      this.drawOverlays();
    });
    overlay.addEventListener("dblclick", (event) => {
      if (!surface.geometry || name === "zoom") return;
      const p = at(event);
      const c = cellAt(surface.geometry, p);
      if (!c) return;
      const t = c.t0 + (p.x - c.x0) / surface.geometry.pxPerS;
      this.caliper = null;
      this.zoomTo(c.lead, t - 0.6, t + 0.6);
    });
  }

  measure() {
    const c = this.caliper;
    if (!c || c.kind === "zoom") return null;
    const g = this.surfaces[c.surface].geometry;
    if (c.kind === "time") {
      const ms = (Math.abs(c.b.x - c.a.x) / g.pxPerS) * 1000;
      return { ms, bpm: ms > 0 ? 60000 / ms : null, text: `${ms.toFixed(0)} ms · ${ms > 0 ? (60000 / ms).toFixed(0) : "—"} bpm` };
    }
    const mv = (c.a.y - c.b.y) / g.pxPerMv;
    return { mv, text: `${mv >= 0 ? "+" : ""}${mv.toFixed(2)} mV` };
  }

  drawOverlays() {
    for (const [name, s] of Object.entries(this.surfaces)) {
      const o = s.overlay;
      const used = Boolean((this.flash && this.flash.surface === name) || (this.caliper && this.caliper.surface === name));
      const [w, h] = used ? [s.canvas.width, s.canvas.height] : [0, 0];
      if (o.width !== w || o.height !== h) {
        o.width = w; o.height = h;
        o.style.width = used ? s.canvas.style.width : "0px"; o.style.height = used ? s.canvas.style.height : "0px";
      }
      if (!used) continue;
      const ctx = o.getContext("2d");
      ctx.clearRect(0, 0, o.width, o.height);
      if (this.flash && this.flash.surface === name) {
        ctx.strokeStyle = COLORS.flash; ctx.lineWidth = 4 * (window.devicePixelRatio || 1);
        for (const c of this.flash.cells) ctx.strokeRect(c.left + 2, c.top + 2, c.right - c.left - 4, c.bottom - c.top - 4);
      }
      if (this.caliper && this.caliper.surface === name && s.geometry) this.drawCaliper(ctx, s.geometry, o);
    }
    const m = this.measure();
    this.readout.textContent = m ? (this.caliper.kind === "time" ? `Interval ${m.text}` : `Amplitude ${m.text}`) : "";
    this.readout.dataset.ms = m && m.ms !== undefined ? m.ms.toFixed(1) : "";
    this.readout.dataset.mv = m && m.mv !== undefined ? m.mv.toFixed(3) : "";
  }

  drawCaliper(ctx, g, o) {
    const c = this.caliper;
    const dpr = window.devicePixelRatio || 1;
    const cell = c.cell;
    const top = cell ? cell.top : 0; const bottom = cell ? cell.bottom : o.height;
    if (c.kind === "zoom") {
      ctx.fillStyle = COLORS.zoomBox;
      ctx.fillRect(Math.min(c.a.x, c.b.x), top, Math.abs(c.b.x - c.a.x), bottom - top);
      return;
    }
    ctx.strokeStyle = COLORS.caliper; ctx.fillStyle = COLORS.caliper; ctx.lineWidth = 1.5 * dpr;
    ctx.beginPath();
    if (c.kind === "time") {
      for (const x of [c.a.x, c.b.x]) { ctx.moveTo(x, top); ctx.lineTo(x, bottom); }
      const y = Math.max(top + 8 * dpr, Math.min(bottom - 8 * dpr, c.a.y));
      ctx.moveTo(c.a.x, y); ctx.lineTo(c.b.x, y);
      ctx.stroke();
      const step = c.b.x - c.a.x;
      if (this.marchOut && Math.abs(step) >= 3) {  // the interval repeated along the row
        const left = cell ? Math.min(...g.cells.filter((x) => x.row === cell.row).map((x) => x.left)) : 0;
        const right = cell ? Math.max(...g.cells.filter((x) => x.row === cell.row).map((x) => x.right)) : o.width;
        ctx.beginPath();
        const ticks = [];
        for (let k = -200; k <= 200; k += 1) {
          const x = c.a.x + k * step;
          if (x < left || x > right || k === 0 || k === 1) continue;
          ticks.push(Math.round(x));
          ctx.moveTo(x, top + 4 * dpr); ctx.lineTo(x, top + 16 * dpr);
          ctx.moveTo(x, bottom - 16 * dpr); ctx.lineTo(x, bottom - 4 * dpr);
        }
        ctx.stroke();
        o.dataset.ticks = JSON.stringify(ticks);
      } else delete o.dataset.ticks;
    } else {
      const left = cell ? cell.left : 0; const right = cell ? cell.right : o.width;
      for (const y of [c.a.y, c.b.y]) { ctx.moveTo(left, y); ctx.lineTo(right, y); }
      ctx.moveTo(c.a.x, c.a.y); ctx.lineTo(c.a.x, c.b.y);
      ctx.stroke();
    }
    const m = this.measure();
    if (m) {
      ctx.font = `bold ${12 * dpr}px system-ui, sans-serif`;
      const x = Math.min(c.a.x, c.b.x) + 4 * dpr;
      const y = c.kind === "time" ? top + 28 * dpr : Math.min(c.a.y, c.b.y) - 4 * dpr;
      const w = ctx.measureText(m.text).width;
      ctx.fillStyle = "rgba(255,255,255,0.85)"; ctx.fillRect(x - 2 * dpr, y - 12 * dpr, w + 4 * dpr, 16 * dpr);
      ctx.fillStyle = COLORS.caliper; ctx.fillText(m.text, x, y);
    }
  }

  // ---- findings -> their place on the trace -------------------------------------------------------
  focus(finding) {
    const g = this.surfaces.main.geometry;
    if (!g || !this.ecg) return;
    const evidence = finding.evidence || [];
    const placed = evidence.find((e) => Number(e.duration_s) > 0);
    const named = evidence.filter((e) => e.lead).map((e) => key(e.lead));
    let cells;
    if (placed) {
      cells = g.cells.filter((c) => c.rhythm);
      const lead = (cells[cells.length - 1] || {}).lead || this.ecg.leads[0].name;
      const at = Number(placed.at_s || 0); const dur = Number(placed.duration_s);
      this.zoomTo(lead, at - 0.5, at + dur + 0.5);
      const c = cells[cells.length - 1];
      if (c) this.scrollTo(c.x0 + (at - c.t0) * g.pxPerS, c.top);
    } else if (named.length) {
      cells = g.cells.filter((c) => named.includes(key(c.lead)) && !c.rhythm);
      if (!cells.length) cells = g.cells.filter((c) => named.includes(key(c.lead)));
      if (cells[0]) { this.zoomTo(cells[0].lead, cells[0].t0, cells[0].t1); this.scrollTo(cells[0].left, cells[0].top); }
    } else cells = g.cells.filter((c) => c.rhythm).slice(-1);
    this.flash = { surface: "main", cells };
    this.root.dataset.flash = cells.map((c) => c.lead).join(" ");
    this.drawOverlays();
    clearTimeout(this.flashTimer);
    this.flashTimer = setTimeout(() => { this.flash = null; delete this.root.dataset.flash; this.drawOverlays(); }, 1500);
  }

  scrollTo(xDevice, yDevice) {
    const dpr = window.devicePixelRatio || 1;
    this.scroller.scrollLeft = Math.max(0, xDevice / dpr - 60);
    this.scroller.scrollTop = Math.max(0, yDevice / dpr - 20);
  }

  // The viewer's keys (Alt+letter: they work while the report is being typed). True when taken.
  handleKey(event) {
    if (!event.altKey || event.ctrlKey || event.metaKey) return false;
    const cycle = (list, now) => list[(list.indexOf(now) + 1) % list.length];
    switch (event.code) {
      case "KeyL": this.set({ layout: this.options.layout === "3x4" ? "12x1" : "3x4" }); return true;
      case "KeyP": this.set({ speed: cycle(SPEEDS, this.options.speed) }); return true;
      case "KeyG": this.set({ gain: cycle(GAINS, this.options.gain) }); return true;
      case "KeyT": this.setTool("time"); return true;
      case "KeyA": this.setTool("amplitude"); return true;
      case "KeyZ": this.setTool("zoom"); return true;
      case "KeyM": this.toggleMarch(); return true;
      case "KeyX": this.clear(); return true;
      case "KeyK": this.toggleCompare(); return true;
      default: return false;
    }
  }

  destroy() {
    clearTimeout(this.flashTimer);
    this.root.classList.remove("ecg-viewer");
    for (const k of ["state", "draws", "layout", "speed", "gain", "mmPx", "drawMs", "zoom", "flash", "prior", "tool"]) delete this.root.dataset[k];
  }
}

function cellAt(geometry, p) {
  return geometry.cells.find((c) => p.x >= c.left && p.x <= c.right && p.y >= c.top && p.y <= c.bottom) || null;
}
