// The reading station's page: sign-in, the live worklist, the exam page with its report pane.
// Everything the hub sends is shown with textContent (never as HTML): names and indications come
// from clinics and may hold anything.
import { EcgViewer, fetchEcg } from "./ecg.js";
import { el } from "./dom.js";
import { StatementPane } from "./statements.js";

const $ = (id) => document.getElementById(id);
const state = {
  csrf: "",
  identity: null,
  loginCsrf: "",
  leaseRenewSeconds: 120,
  exams: new Map(),        // exam id -> exam (the hub's Exam message as JSON)
  alerts: new Set(),       // critical exams not claimed yet
  snapshotDone: false,
  selected: 0,
  source: null,
  open: null,              // {examId, fence, amend, renewTimer, dirty, saveTimer, signed}
  viewer: null,            // the open ECG's viewer (ecg.js)
  templates: [],
  templatesLoaded: Promise.resolve(),
  recent: [],
  lastActivity: 0,
};
const LEVELS = { LEVEL_CRITICAL: ["critical", 0], LEVEL_URGENT: ["urgent", 1], LEVEL_ROUTINE: ["routine", 2] };

// ---- the API -------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, reason, message) { super(message); this.status = status; this.reason = reason; }
}

async function api(path, { method = "GET", body, keepalive = false } = {}) {
  const headers = { "Accept": "application/json" };
  if (method !== "GET") { headers["Content-Type"] = "application/json"; headers["X-CSRF-Token"] = state.csrf; }
  const response = await fetch(path, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin", keepalive,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = data.error || {};
    if (response.status === 401) signedOut(err.reason === "IDLE_SIGNED_OUT" ? "idle" : "signed_out");
    throw new ApiError(response.status, err.reason || String(response.status), err.message || response.statusText);
  }
  return data;
}

// ---- views ---------------------------------------------------------------------------------
function show(view) {
  for (const id of ["view-login", "view-worklist", "view-exam"]) $(id).hidden = id !== view;
  $("signout").hidden = view === "view-login";
}

function toast(text) {
  const el = $("toast");
  el.textContent = text; el.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { el.hidden = true; }, 4000);
}


// ---- sign-in -------------------------------------------------------------------------------
async function start() {
  const session = await api("/api/session");
  if (!session.signed_in) { state.loginCsrf = session.login_csrf; showLogin(""); return; }
  signedIn(session);
}

function showLogin(note) {
  stopStream();
  state.identity = null; state.csrf = "";
  $("who").textContent = ""; $("live").className = "live";
  $("login-note").textContent = note;
  $("login-error").textContent = "";
  $("login-password").value = "";
  show("view-login");
  $("login-user").focus();
  if (location.pathname !== "/") history.replaceState(null, "", "/");
}

function signedOut(why) {
  if (!state.identity) return;
  if (state.open) { clearInterval(state.open.renewTimer); clearTimeout(state.open.saveTimer); state.open = null; }
  api("/api/session").then((s) => { state.loginCsrf = s.login_csrf || ""; }).catch(() => {});
  showLogin(why === "idle" ? "You were signed out after a time without activity. Sign in again."
    : why === "expired" ? "Your session ended. Sign in again." : "Signed out.");
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("login-error").textContent = "";
  try {
    const response = await fetch("/api/login", {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": state.loginCsrf },
      body: JSON.stringify({ user: $("login-user").value, password: $("login-password").value }),
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      $("login-error").textContent = (data.error && data.error.message) || "sign-in failed";
      $("login-password").value = "";
      if (data.error && data.error.reason === "CSRF") { const s = await api("/api/session"); state.loginCsrf = s.login_csrf; }
      return;
    }
    signedIn(await api("/api/session"));
  } catch (err) {
    $("login-error").textContent = "the station cannot be reached";
  }
});

async function signedIn(session) {
  state.csrf = session.csrf;
  state.identity = session.identity;
  state.leaseRenewSeconds = session.lease_renew_seconds || 120;
  const who = session.identity;
  $("who").textContent = `${who.user} · ${who.specialty} · ${who.hospital}`;
  if ("Notification" in window && Notification.permission === "default") Notification.requestPermission().catch(() => {});
  startStream();  // the worklist's stream first: the templates load meanwhile
  // The worklist (and its keys) are there at once; an exam page waits for the templates.
  state.templatesLoaded = Promise.all([
    api("/api/templates").then((answer) => { state.templates = answer.templates; }),
    api("/api/statements").then((answer) => stmts.setLibrary(answer)).catch(() => {}),  // an ECG page without the library: no search
  ]);
  route();
}

$("signout").addEventListener("click", async () => {
  await releaseOpen();
  await api("/api/logout", { method: "POST" }).catch(() => {});
  signedOut("signed_out");
});

// ---- images: OHIF's viewer on this origin (/viewer), reading the hub's DICOMweb through /dicomweb
function viewerUrl(exam, prior) {
  const studies = [exam.study_instance_uid, ...(prior ? [prior.study_instance_uid] : [])].map(encodeURIComponent);
  return `/viewer?StudyInstanceUIDs=${studies.join(",")}&exam=${encodeURIComponent(exam.exam_id)}`
    + (prior ? "&hangingProtocolId=@ohif/hpCompare" : "");
}
function showImages(exam, priors) {
  // the latest earlier imaging study of the patient at this site, for a side-by-side comparison
  const prior = priors.find((p) => p.study_instance_uid && p.kind !== "EXAM_KIND_ECG" && p.study_instance_uid !== exam.study_instance_uid);
  const frame = el("iframe", { class: "images", dataset: { testid: "images" }, title: "images",
    src: viewerUrl(exam, null), allow: "fullscreen" });
  const bar = el("p", { class: "images-bar" },
    el("a", { href: viewerUrl(exam, null), target: "_blank", rel: "noopener", dataset: { testid: "open-images" } }, "Open images in a window"));
  if (prior) {
    const compare = el("button", { type: "button", dataset: { testid: "compare-prior" },
      title: "current and prior side by side" }, `Compare with ${prior.received_at ? new Date(prior.received_at).toLocaleDateString() : "prior"}`);
    compare.addEventListener("click", () => {
      const on = compare.getAttribute("aria-pressed") !== "true";
      compare.setAttribute("aria-pressed", String(on));
      frame.src = viewerUrl(exam, on ? prior : null);
    });
    bar.append(" · ", compare);
  }
  $("viewer").replaceChildren(bar, frame);
}

// The person's keys and clicks restart the station's idle clock (at most one call a minute).
function activity() {
  if (!state.identity) return;
  const now = Date.now();
  if (now - state.lastActivity < 60_000) return;
  state.lastActivity = now;
  api("/api/activity", { method: "POST", body: {} }).catch(() => {});
}
for (const kind of ["keydown", "pointerdown"]) document.addEventListener(kind, activity, { capture: true });

// ---- the live worklist ---------------------------------------------------------------------
function startStream() {
  stopStream();
  const source = new EventSource("/api/worklist/events");
  state.source = source;
  source.addEventListener("reset", () => { state.exams.clear(); state.order = null; state.snapshotDone = false; $("live").className = "live on"; });
  source.addEventListener("worklist", (msg) => onEvent(JSON.parse(msg.data)));
  source.addEventListener("signed_out", (msg) => { stopStream(); signedOut(JSON.parse(msg.data).why); });
  source.addEventListener("hub_error", () => { $("live").className = "live off"; });
  source.onerror = () => { $("live").className = "live off"; };
}

function stopStream() {
  if (state.source) { state.source.close(); state.source = null; }
}

function onEvent(event) {
  const exam = event.exam;
  state.order = null;  // the sorted list is made again on the next draw
  switch (event.type) {
    case "SNAPSHOT":  // the whole queue at once; a critical exam already waiting is marked too, and rings
      for (const e of event.exams || []) {
        state.exams.set(e.exam_id, e);
        if ((e.triage || {}).level === "LEVEL_CRITICAL" && !e.claimed_by) state.alerts.add(e.exam_id);
      }
      state.snapshotDone = true;
      if (state.alerts.size) ring();
      break;
    case "QUEUED": state.exams.set(exam.exam_id, { ...exam, claimed_by: "" }); break;
    case "RELEASED":  // back in the queue: a critical one is waiting for a reader again
      state.exams.set(exam.exam_id, { ...exam, claimed_by: "" });
      if ((exam.triage || {}).level === "LEVEL_CRITICAL") state.alerts.add(exam.exam_id);
      break;
    case "CLAIMED":
      state.exams.set(exam.exam_id, exam);
      clearAlert(exam.exam_id);
      break;
    case "REPORTED": state.exams.delete(exam.exam_id); clearAlert(exam.exam_id); break;
    case "CRITICAL":
      state.exams.set(exam.exam_id, exam);
      if (!exam.claimed_by) raiseAlert(exam);
      break;
    default: break;
  }
  if (state.snapshotDone) scheduleRender();
}

// Many events in one frame (a flood of arrivals) draw the worklist once.
let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => { renderPending = false; if (!$("view-worklist").hidden) renderWorklist(); else renderBanner(); });
}

function raiseAlert(exam) {
  state.alerts.add(exam.exam_id);
  renderBanner();
  ring();
  if ("Notification" in window && Notification.permission === "granted") {
    try { new Notification("Critical exam", { body: `${exam.modality || "exam"} from ${exam.site}: ${triageSummary(exam)}`, tag: exam.exam_id }); } catch (e) { /* not shown */ }
  }
}

function clearAlert(examId) {
  if (state.alerts.delete(examId)) renderBanner();
}

function renderBanner() {
  const banner = $("banner");
  banner.replaceChildren();
  const ids = [...state.alerts].filter((id) => state.exams.has(id)).reverse();  // the newest first
  banner.hidden = ids.length === 0;
  for (const id of ids.slice(0, 3)) {
    const exam = state.exams.get(id);
    const link = el("button", { class: "alert", dataset: { exam: id, testid: "critical-alert" } },
      `CRITICAL · ${exam.modality || ""} · ${exam.site} · ${triageSummary(exam)}`);
    link.addEventListener("click", () => openExam(id));
    banner.append(link);
  }
  if (ids.length > 3) {
    const more = el("button", { class: "alert more", dataset: { testid: "critical-more" } },
      `${ids.length - 3} more critical exam(s) waiting: show them`);
    more.addEventListener("click", () => { $("f-level").value = "LEVEL_CRITICAL"; renderWorklist(); });
    banner.append(more);
  }
}

let audio = null;
function ring() {
  try {
    audio = audio || new AudioContext();
    for (const [at, freq] of [[0, 880], [0.25, 660], [0.5, 880]]) {
      const osc = audio.createOscillator(); const gain = audio.createGain();
      osc.frequency.value = freq; gain.gain.value = 0.15;
      osc.connect(gain).connect(audio.destination);
      osc.start(audio.currentTime + at); osc.stop(audio.currentTime + at + 0.2);
    }
    document.body.dataset.rang = String(Number(document.body.dataset.rang || 0) + 1);
  } catch (e) { /* no audio device */ }
}

// The worklist's and the alert's line: the most severe findings' titles (the exam page has them all).
function triageSummary(exam) {
  const findings = [...((exam.triage || {}).findings || [])]
    .sort((a, b) => (LEVELS[a.level] || ["", 3])[1] - (LEVELS[b.level] || ["", 3])[1]);
  if (!findings.length) return ((exam.triage || {}).summary || "").split(". ").slice(-1)[0];
  const shown = findings.slice(0, 2).map((f) => f.title);
  return shown.join(" · ") + (findings.length > 2 ? ` (+${findings.length - 2})` : "");
}

function rank(exam) { return (LEVELS[(exam.triage || {}).level] || ["", 3])[1]; }

function sorted() {
  if (state.order) return state.order;
  state.order = [...state.exams.values()].sort((a, b) =>
    rank(a) - rank(b) || (a.deadline || "~").localeCompare(b.deadline || "~")
    || (a.received_at || "").localeCompare(b.received_at || "") || a.exam_id.localeCompare(b.exam_id));
  return state.order;
}

function filtered() {
  const level = $("f-level").value, site = $("f-site").value, modality = $("f-modality").value;
  return sorted().filter((e) => (!level || (e.triage || {}).level === level)
    && (!site || e.site === site) && (!modality || e.modality === modality));
}

function fillFilter(select, values) {
  const current = select.value;
  const want = ["", ...[...values].sort()];
  const have = [...select.options].map((o) => o.value);
  if (want.join("|") === have.join("|")) return;
  select.replaceChildren(...want.map((v) => el("option", { value: v }, v || "all")));
  select.value = want.includes(current) ? current : "";
}

// DICOM's ways of writing a person, an age and a date, as a reader reads them.
function personName(pn) {  // "Wang^Xiaoming=王^小明" -> "王小明 (Wang Xiaoming)"
  if (!pn) return "";
  const [alphabetic, ideographic] = pn.split("=");
  const words = (part) => (part || "").split("^").filter(Boolean);
  const latin = words(alphabetic).join(" ");
  const cjk = words(ideographic).join("");
  return cjk ? (latin ? `${cjk} (${latin})` : cjk) : latin;
}
function ageText(as) {  // "063Y" -> "63 y", "008M" -> "8 mo", "012D" -> "12 d"
  const m = /^(\d{3})([DWMY])$/.exec(as || "");
  if (!m) return as || "";
  return `${Number(m[1])} ${{ D: "d", W: "wk", M: "mo", Y: "y" }[m[2]]}`;
}
function dateText(da) {  // "19560304" -> "1956-03-04"
  return /^\d{8}$/.test(da || "") ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6)}` : (da || "");
}

function patientText(exam) {
  const p = exam.patient || {};
  return [p.sex, ageText(p.age)].filter(Boolean).join(" ");
}

function timeLeft(deadline) {
  if (!deadline) return ["", ""];
  const ms = new Date(deadline).getTime() - Date.now();
  const s = Math.round(Math.abs(ms) / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  const text = (h ? `${h}h ${String(m).padStart(2, "0")}m` : `${m}:${String(sec).padStart(2, "0")}`);
  return ms < 0 ? [`overdue ${text}`, "overdue"] : [text, ms < 5 * 60_000 ? "soon" : ""];
}

// The worklist is drawn as a window of rows around what is on screen (fixed-height rows, spacers
// above and below), so a queue of thousands draws as fast as one of forty, and a burst of events
// costs one small draw per frame.
const ROW_PX = 30;
const OVERSCAN = 15;
let shown = [];  // the filtered, sorted exams of the last draw

function renderWorklist() {
  const all = [...state.exams.values()];
  fillFilter($("f-site"), new Set(all.map((e) => e.site).filter(Boolean)));
  fillFilter($("f-modality"), new Set(all.map((e) => e.modality).filter(Boolean)));
  shown = filtered();
  state.selected = Math.min(state.selected, Math.max(shown.length - 1, 0));
  const scroller = $("scroller");
  const first = Math.max(0, Math.floor(scroller.scrollTop / ROW_PX) - OVERSCAN);
  const last = Math.min(shown.length, Math.ceil((scroller.scrollTop + (scroller.clientHeight || 900)) / ROW_PX) + OVERSCAN);
  const body = $("rows");
  const pad = (rows) => {  // (CSSOM, not a style attribute: the page's CSP allows no inline style)
    const cell = el("td", { colspan: "9" });
    cell.style.height = `${rows * ROW_PX}px`;
    return el("tr", { class: "pad", "aria-hidden": "true" }, cell);
  };
  body.replaceChildren(pad(first), ...shown.slice(first, last).map((exam, n) => row(exam, first + n)), pad(shown.length - last));
  $("empty").hidden = shown.length > 0;
  $("count").textContent = `${shown.length} of ${state.exams.size} exams`;
  renderBanner();
}

function row(exam, i) {
  const level = (LEVELS[(exam.triage || {}).level] || ["—"])[0];
  const [left, cls] = timeLeft(exam.deadline);
  const summary = triageSummary(exam);
  return el("tr", {
    class: [level, state.alerts.has(exam.exam_id) ? "alerting" : "", i === state.selected ? "selected" : "",
      exam.claimed_by ? "claimed" : ""].join(" "),
    dataset: { exam: exam.exam_id, testid: "worklist-row", level, index: String(i) },
  },
  el("td", {}, el("span", { class: `badge ${level}` }, level)),
  el("td", { class: `left ${cls}`, dataset: { deadline: exam.deadline || "" } }, left),
  el("td", {}, exam.site || ""),
  el("td", {}, exam.modality || ""),
  el("td", { class: "indication", title: exam.indication || "" }, exam.indication || ""),
  el("td", {}, patientText(exam)),
  el("td", {}, exam.received_at ? new Date(exam.received_at).toLocaleTimeString() : ""),
  el("td", { class: "summary", title: summary }, summary),
  el("td", {}, exam.claimed_by || ""));
}

$("scroller").addEventListener("scroll", () => scheduleRender(), { passive: true });
$("rows").addEventListener("click", (event) => {
  const tr = event.target.closest("tr[data-exam]");
  if (tr) select(Number(tr.dataset.index));
});
$("rows").addEventListener("dblclick", (event) => {
  const tr = event.target.closest("tr[data-exam]");
  if (tr) openExam(tr.dataset.exam);
});

function select(i) {
  const body = $("rows");
  const old = body.querySelector("tr.selected");
  if (old) old.classList.remove("selected");
  state.selected = i;
  const scroller = $("scroller");
  const top = i * ROW_PX;
  if (top < scroller.scrollTop) scroller.scrollTop = top;
  else if (top + ROW_PX > scroller.scrollTop + scroller.clientHeight) scroller.scrollTop = top + ROW_PX - scroller.clientHeight;
  const now = body.querySelector(`tr[data-index="${i}"]`);
  if (now) now.classList.add("selected"); else scheduleRender();
}

// The countdown: only the time-left cells change each second.
setInterval(() => {
  for (const cell of document.querySelectorAll("td.left")) {
    const [text, cls] = timeLeft(cell.dataset.deadline);
    cell.textContent = text; cell.className = `left ${cls}`;
  }
}, 1000);

for (const id of ["f-level", "f-site", "f-modality"]) $(id).addEventListener("change", () => { state.selected = 0; $("scroller").scrollTop = 0; renderWorklist(); });

async function claimNext() {
  try {
    await openNext(await api("/api/claim-next", { method: "POST", body: {} }));
  } catch (err) { toast(err.message); }
}

// What the station answers to claim-next (alone or with a signature): the claim and the exam's page.
async function openNext(next) {
  if (next.error) { toast(next.error.message); return; }
  if (!next.claim) { toast("The queue is empty."); return; }
  await openExam(next.claim.exam.exam_id, next.claim, { details: next.details });
}
$("claim-next").addEventListener("click", claimNext);

// ---- the exam page ---------------------------------------------------------------------------
function route() {
  const match = location.pathname.match(/^\/exam\/([^/]+)$/);
  if (match) openExam(decodeURIComponent(match[1]), null, { push: false });
  else { show("view-worklist"); renderWorklist(); }
}
window.addEventListener("popstate", () => { releaseOpen().then(route); });

async function openExam(examId, claim = null, { push = true, details = null } = {}) {
  // An ECG from the worklist: its samples are on their way while the page asks for the rest.
  const samples = (state.exams.get(examId) || {}).kind === "EXAM_KIND_ECG" ? fetchEcg(examId) : null;
  if (samples) samples.catch(() => {});  // (shown by the viewer; an exam that does not open drops it)
  await releaseOpen();
  if (!details) {
    try {
      details = await api(`/api/exams/${encodeURIComponent(examId)}`);
    } catch (err) { toast(err.message); return; }
  }
  await state.templatesLoaded.catch(() => {});  // the report pane offers them
  const reported = details.exam.state === "reported";
  if (!claim && !reported) {
    try { claim = (await api(`/api/exams/${encodeURIComponent(examId)}/claim`, { method: "POST", body: {} })).claim; }
    catch (err) { toast(err.message); return; }
  }
  state.open = { examId, fence: claim ? Number(claim.fence) : 0, amend: false, dirty: false, signed: reported,
    renewTimer: null, saveTimer: null, kind: details.exam.kind, modality: details.exam.modality,
    findings: (details.exam.triage || {}).findings || [] };
  if (claim) clearAlert(examId);  // claimed: no longer waiting for a reader
  if (push) history.pushState(null, "", `/exam/${encodeURIComponent(examId)}`);
  renderExam(details, claim, samples);
  show("view-exam");
  if (claim) startRenewal();
  $("text").focus();
}

function startRenewal() {
  const open = state.open;
  open.renewTimer = setInterval(async () => {
    try {
      const { claim } = await api(`/api/exams/${encodeURIComponent(open.examId)}/renew`, { method: "POST", body: { fence: open.fence } });
      $("lease").textContent = `claimed until ${new Date(claim.lease_expires_at).toLocaleTimeString()}`;
    } catch (err) { $("report-error").textContent = `the claim was lost: ${err.message}`; clearInterval(open.renewTimer); }
  }, state.leaseRenewSeconds * 1000);
}

async function releaseOpen({ keepalive = false } = {}) {
  const open = state.open;
  if (state.viewer) { state.viewer.destroy(); state.viewer = null; }
  if (!open) return;
  state.open = null;
  clearInterval(open.renewTimer);
  clearTimeout(open.saveTimer);
  if (open.dirty && !open.signed && !open.amend && open.fence) await saveDraft(open, { keepalive }).catch(() => {});
  if (!open.signed && open.fence) {
    await api(`/api/exams/${encodeURIComponent(open.examId)}/release`, { method: "POST", body: { fence: open.fence }, keepalive }).catch(() => {});
  }
}
window.addEventListener("pagehide", () => { releaseOpen({ keepalive: true }); });

function dl(target, pairs) {
  target.replaceChildren(...pairs.filter(([, v]) => v).flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

function renderExam(details, claim, samples = null) {
  const exam = details.exam;
  const level = (LEVELS[(exam.triage || {}).level] || ["—"])[0];
  $("exam-level").textContent = level; $("exam-level").className = `badge ${level}`;
  $("exam-title").textContent = `${exam.modality || ""} · ${exam.site} · ${exam.indication || ""}`;
  $("lease").textContent = claim && claim.lease_expires_at ? `claimed until ${new Date(claim.lease_expires_at).toLocaleTimeString()}` : exam.state;
  const p = exam.patient || {};
  dl($("patient"), [["Name", personName(p.name)], ["Sex", p.sex], ["Age", ageText(p.age)], ["Birth date", dateText(p.birth_date)],
    ["Patient ID", p.id], ["Class", p.patient_class]]);
  dl($("request"), [["Requested by", personName(p.referring_physician)], ["Priority", (exam.priority || "").replace("PRIORITY_", "").toLowerCase()],
    ["Indication", exam.indication], ["Arrived", exam.received_at && new Date(exam.received_at).toLocaleString()],
    ["Deadline", exam.deadline && new Date(exam.deadline).toLocaleString()]]);
  const triage = exam.triage || {};
  $("triage-summary").textContent = triage.summary || "";
  const objects = details.objects || [];
  const ecg = exam.kind === "EXAM_KIND_ECG" && objects.length > 0;
  $("view-exam").querySelector(".exam").classList.toggle("ecg", ecg);
  $("view-exam").querySelector(".exam").classList.toggle("images", !ecg && Boolean(exam.study_instance_uid) && objects.length > 0);
  if (state.viewer) { state.viewer.destroy(); state.viewer = null; }
  if (ecg) state.viewer = new EcgViewer($("viewer"), { exam, priors: details.priors, samples: samples || fetchEcg(exam.exam_id) });
  else if (exam.study_instance_uid && objects.length > 0) showImages(exam, details.priors || []);
  else {
    $("viewer").replaceChildren(el("p", { class: "note" }, objects.length
      ? `${objects.length} object(s): ${[...new Set(objects.map((o) => o.role))].join(", ")}`
      : "no objects"));
  }
  $("findings").replaceChildren(...(triage.findings || []).flatMap((f, i) => [
    el("tr", { class: "finding", dataset: { testid: "finding", index: String(i), code: f.code || "" },
      title: ecg ? "show it on the trace" : "" }, el("th", { colspan: "3" }, `${f.title} (${(LEVELS[f.level] || ["—"])[0]})`)),
    ...(f.evidence || []).map((e) => el("tr", {}, el("td", {}, e.name + (e.lead ? ` [${e.lead}]` : "")),
      el("td", {}, `${Number(e.value ?? 0).toFixed(3).replace(/\.?0+$/, "")} ${e.unit || ""}`),
      el("td", { class: "note" }, e.threshold !== undefined ? `threshold ${e.threshold}` : ""))),
  ]));
  // one line per kind of object (a CT's 300 slices are one line, not 300)
  const kinds = new Map();
  for (const o of details.objects || []) {
    const key = `${o.role} · ${o.modality || ""}`;
    const k = kinds.get(key) || { count: 0, bytes: 0 };
    k.count += 1; k.bytes += Number(o.size || 0);
    kinds.set(key, k);
  }
  $("objects").replaceChildren(...[...kinds].map(([key, k]) => el("li", { dataset: { testid: "object-kind" } },
    `${k.count > 1 ? `${k.count} × ` : ""}${key} · ${k.bytes >= 1 << 20 ? `${(k.bytes / (1 << 20)).toFixed(1)} MiB` : `${Math.round(k.bytes / 1024)} KiB`}`)));
  $("priors").replaceChildren(...(details.priors || []).map((e) => {
    const li = el("li", {}, el("a", { href: `/exam/${encodeURIComponent(e.exam_id)}`, dataset: { testid: "prior" } },
      `${e.received_at ? new Date(e.received_at).toLocaleDateString() : ""} · ${e.modality || ""} · ${e.state}`));
    return li;
  }));
  if (!(details.priors || []).length) $("priors").append(el("li", { class: "note" }, "none at this site"));
  $("reports").replaceChildren(...(details.reports || []).map((r) => {
    const item = el("li", { dataset: { testid: "report-version" } },
      `v${r.version} ${r.status}${r.signed_by ? ` · ${r.signed_by}` : ""}${r.amends_reason ? ` · amended: ${r.amends_reason}` : ""}`);
    if (r.status !== "draft") {  // a signed version: its printed report, as the clinic files it
      item.append(" · ", el("a", {
        href: `/api/exams/${encodeURIComponent(details.exam.exam_id)}/report.pdf?version=${r.version}`,
        target: "_blank", rel: "noopener", dataset: { testid: "report-pdf" },
      }, "printed report (PDF)"));
    }
    return item;
  }));
  const draft = (details.reports || []).filter((r) => r.status === "draft").pop();
  const last = (details.reports || []).filter((r) => r.status !== "draft").pop();
  $("text").value = (draft || last || {}).text || "";
  $("impression").value = (draft || last || {}).impression || "";
  $("critical").checked = Boolean((draft || last || {}).critical);
  $("draft-state").textContent = draft ? "draft saved" : "";
  stmts.load({ ecg: exam.kind === "EXAM_KIND_ECG", report: draft || last, suggested: details.suggested_statements,
    measurements: triage.ecg, enabled: exam.state !== "reported" });
  if (ecg && stmts.missing()) refetchMeasurements(exam.exam_id);
  $("report-error").textContent = "";
  const reported = exam.state === "reported";
  for (const id of ["save", "sign", "sign-next"]) $(id).hidden = reported;
  $("amend").hidden = !reported;
  $("amend-reason-row").hidden = true;
  for (const id of ["text", "impression", "critical"]) $(id).disabled = reported;
  const kind = exam.kind === "EXAM_KIND_ECG" ? "ecg" : "imaging";
  const usable = state.templates.filter((t) => t.kind === kind && (!t.modality || t.modality.includes(exam.modality)));
  $("template").replaceChildren(el("option", { value: "" }, "—"),
    ...usable.map((t, i) => el("option", { value: t.id }, `${i < 9 ? `${i + 1}. ` : ""}${t.title}${t.critical ? " (critical)" : ""}`)));
  $("template").disabled = reported;
}

// Measurements come in a second triage pass: fetch the details again a few times to fill them in.
function refetchMeasurements(examId, tries = 5) {
  setTimeout(async () => {
    if (!state.open || state.open.examId !== examId) return;
    try {
      const again = await api(`/api/exams/${encodeURIComponent(examId)}`);
      if (!state.open || state.open.examId !== examId) return;
      stmts.refresh((again.exam.triage || {}).ecg);
      if (state.viewer && state.viewer.setMeasurements) state.viewer.setMeasurements((again.exam.triage || {}).ecg);
    } catch { /* shown when the reader acts */ }
    if (tries > 1 && stmts.missing()) refetchMeasurements(examId, tries - 1);
  }, 3000);
}

function applyTemplate(id) {
  const t = state.templates.find((x) => x.id === id);
  if (!t) return;
  $("template").value = id;
  $("text").value = t.text; $("impression").value = t.impression; $("critical").checked = Boolean(t.critical);
  stmts.block = ""; stmts.sync();  // the confirmed statements open the template's text
  changed();
  $("text").focus();
}
$("template").addEventListener("change", () => applyTemplate($("template").value));

// A finding of the triage, clicked: its place on the trace (scrolled to, zoomed, the lead flashed).
$("findings").addEventListener("click", (event) => {
  const row = event.target.closest("tr.finding");
  if (!row || !state.viewer || !state.open) return;
  const found = state.open.findings || [];
  if (found[Number(row.dataset.index)]) state.viewer.focus(found[Number(row.dataset.index)]);
});

function changed() {
  const open = state.open;
  if (!open || open.signed) return;
  open.dirty = true;
  $("draft-state").textContent = "unsaved changes";
  clearTimeout(open.saveTimer);
  if (!open.amend) open.saveTimer = setTimeout(() => saveDraft(open).catch((err) => { $("report-error").textContent = err.message; }), 2000);
}
for (const id of ["text", "impression"]) $(id).addEventListener("input", changed);
$("critical").addEventListener("change", changed);

function pane() {
  return { text: $("text").value, impression: $("impression").value, critical: $("critical").checked, ...stmts.body() };
}

const stmts = new StatementPane($("ecg-report"), { text: $("text"), onChange: () => changed() });

async function saveDraft(open = state.open, { keepalive = false } = {}) {
  if (!open || open.signed) return;
  clearTimeout(open.saveTimer);
  const body = { fence: open.fence, ...pane() };
  await api(`/api/exams/${encodeURIComponent(open.examId)}/report`, { method: "POST", body, keepalive });
  open.dirty = false;
  if (state.open === open) $("draft-state").textContent = `draft saved ${new Date().toLocaleTimeString()}`;
}
$("save").addEventListener("click", () => saveDraft().catch((err) => { $("report-error").textContent = err.message; }));

async function sign({ next = false } = {}) {
  const open = state.open;
  if (!open || open.signed) return;
  if (!$("text").value.trim()) { $("report-error").textContent = "the report is empty"; return; }
  clearTimeout(open.saveTimer);
  try {
    const { report, next: following } = open.amend
      ? await api(`/api/exams/${encodeURIComponent(open.examId)}/amend`, { method: "POST", body: { fence: open.fence, reason: $("amend-reason").value, ...pane() } })
      : await api(`/api/exams/${encodeURIComponent(open.examId)}/sign`, { method: "POST", body: { fence: open.fence, next, ...pane() } });
    open.signed = true;
    clearInterval(open.renewTimer);
    // Off the worklist now: the hub has it signed; its REPORTED event, when it comes, changes nothing.
    if (!open.amend) { state.exams.delete(open.examId); state.order = null; clearAlert(open.examId); }
    state.recent.unshift({ examId: open.examId, version: report.version, critical: report.critical, title: $("exam-title").textContent });
    renderRecent();
    toast(`signed (version ${report.version})`);
    state.open = null;
    if (next) {
      if (following) await openNext(following); else await claimNext();  // an amendment signs alone
      if (state.open) return;
    }
    history.pushState(null, "", "/");
    show("view-worklist"); renderWorklist();
  } catch (err) { $("report-error").textContent = err.message; }
}
$("sign").addEventListener("click", () => sign());
$("sign-next").addEventListener("click", () => sign({ next: true }));

$("amend").addEventListener("click", async () => {
  const open = state.open;
  try {
    const { claim } = await api(`/api/exams/${encodeURIComponent(open.examId)}/claim`, { method: "POST", body: { for_amendment: true } });
    Object.assign(open, { fence: Number(claim.fence), amend: true, signed: false });
    for (const id of ["text", "impression", "critical", "template"]) $(id).disabled = false;
    stmts.setEnabled(true);
    $("amend").hidden = true; $("sign").hidden = false; $("amend-reason-row").hidden = false;
    $("amend-reason").focus();
    startRenewal();
  } catch (err) { $("report-error").textContent = err.message; }
});

function renderRecent() {
  $("recent").replaceChildren(...state.recent.slice(0, 20).map((r) => el("li", {},
    el("a", { href: `/exam/${encodeURIComponent(r.examId)}`, dataset: { testid: "recent-exam" } }, `${r.title} · v${r.version}${r.critical ? " · critical" : ""}`))));
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[href^='/exam/']");
  if (!link) return;
  event.preventDefault();
  openExam(decodeURIComponent(link.getAttribute("href").slice(6)), null);
});

$("back").addEventListener("click", async () => {
  await releaseOpen();
  history.pushState(null, "", "/");
  show("view-worklist"); renderWorklist();
});

// ---- keys ------------------------------------------------------------------------------------
document.addEventListener("keydown", (event) => {
  if (!state.identity) return;
  const typing = ["INPUT", "TEXTAREA", "SELECT"].includes(document.activeElement.tagName);
  if (!$("view-worklist").hidden) {
    if (typing) return;
    const rows = shown;
    if (event.key === "n" || event.key === "N") { event.preventDefault(); claimNext(); }
    else if (event.key === "ArrowDown" || event.key === "j") { event.preventDefault(); select(Math.min(state.selected + 1, rows.length - 1)); }
    else if (event.key === "ArrowUp" || event.key === "k") { event.preventDefault(); select(Math.max(state.selected - 1, 0)); }
    else if (event.key === "Enter" && rows[state.selected]) { event.preventDefault(); openExam(rows[state.selected].exam_id); }
    return;
  }
  if (!$("view-exam").hidden) {
    if (event.key === "Escape") { event.preventDefault(); $("back").click(); }
    else if ((event.ctrlKey || event.metaKey) && event.key === "Enter") { event.preventDefault(); sign({ next: event.shiftKey }); }
    else if ((event.ctrlKey || event.metaKey) && (event.key === "s" || event.key === "S")) { event.preventDefault(); saveDraft().catch((err) => { $("report-error").textContent = err.message; }); }
    else if (event.altKey && (event.key === "c" || event.key === "C" || event.code === "KeyC")) { event.preventDefault(); $("critical").checked = !$("critical").checked; changed(); }
    else if (event.altKey && event.code === "KeyS" && !$("ecg-report").hidden) { event.preventDefault(); stmts.focusSearch(); }
    else if (event.altKey && event.code === "KeyY" && !$("ecg-report").hidden) { event.preventDefault(); stmts.confirmAll(); }
    else if (state.viewer && state.viewer.handleKey(event)) event.preventDefault();
    else if (event.altKey && /^Digit[1-9]$/.test(event.code)) {
      event.preventDefault();
      const option = $("template").options[Number(event.code.slice(5))];
      if (option) applyTemplate(option.value);
    }
  }
});

start().catch(() => showLogin("The station cannot reach the hub right now."));
