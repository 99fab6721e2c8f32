// The station's additions to OHIF's viewer page (/viewer):
// - the reader's keys, clicks and wheel restart the station's idle clock (one call a minute at most);
//   signed out at the station, the page goes back to the sign-in page;
// - "Saliency" (button or the key Z) draws the chest model's weighed zones over the image shown,
//   from the exam's findings (?exam=<id>): the 3x3 grid of the model's centred square, the zones it
//   weighed most outlined with their share. The overlay follows zoom and pan (it is redrawn on every
//   render from cornerstone's own image-to-canvas transform).
"use strict";
(() => {
  const params = new URLSearchParams(location.search);
  const exam = params.get("exam");
  const shell = { csrf: "", last: 0, zones: [], shown: false, layer: null, button: null };
  window.telereadViewer = shell;

  async function session() {
    const answer = await fetch("/api/session", { credentials: "same-origin" });
    const data = await answer.json();
    if (!data.signed_in) { location.href = "/"; return; }
    shell.csrf = data.csrf;
  }
  function activity() {
    const now = Date.now();
    if (!shell.csrf || now - shell.last < 60_000) return;
    shell.last = now;
    fetch("/api/activity", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": shell.csrf }, body: "{}" })
      .then((r) => { if (r.status === 401) location.href = "/"; }).catch(() => {});
  }
  for (const kind of ["keydown", "pointerdown", "wheel"]) document.addEventListener(kind, activity, { capture: true, passive: true });

  // ---- the saliency overlay ----------------------------------------------------------------------
  const ZONES = [["right upper zone", "central upper", "left upper zone"],
                 ["right mid zone", "central mid", "left mid zone"],
                 ["right lower zone", "central lower", "left lower zone"]];
  const EDGES = [0, 9, 19, 28];  // the model's 28x28 input cut in three, as the zone weights were

  async function loadZones() {
    if (!exam) return;
    const answer = await fetch(`/api/exams/${encodeURIComponent(exam)}`, { credentials: "same-origin" });
    if (!answer.ok) return;
    const details = await answer.json();
    const weights = new Map();
    for (const finding of ((details.exam || {}).triage || {}).findings || []) {
      for (const ev of finding.evidence || []) {
        if (ev.name && ev.name.startsWith("weight ")) weights.set(ev.name.slice(7), Number(ev.value));
      }
    }
    shell.zones = [...weights].map(([name, weight]) => ({ name, weight }));
    if (shell.zones.length && !shell.button) addButton();
  }

  function addButton() {
    const button = document.createElement("button");
    button.id = "saliency-toggle";
    button.type = "button";
    button.textContent = "Saliency (Z)";
    button.title = "Show the chest model's weighed zones over the image";
    button.setAttribute("aria-pressed", "false");
    button.style.cssText = "position:fixed;right:12px;bottom:12px;z-index:1000;padding:6px 10px;"
      + "background:#12263f;color:#fff;border:1px solid #5ab0ff;border-radius:4px;font:13px sans-serif;cursor:pointer";
    button.addEventListener("click", toggle);
    document.body.appendChild(button);
    shell.button = button;
    document.addEventListener("keydown", (e) => {
      if ((e.key === "z" || e.key === "Z") && !e.ctrlKey && !e.metaKey && !e.altKey
          && !(e.target instanceof HTMLInputElement) && !(e.target instanceof HTMLTextAreaElement)) toggle();
    });
  }

  function toggle() {
    shell.shown = !shell.shown;
    shell.button.setAttribute("aria-pressed", String(shell.shown));
    draw();
  }

  function activeViewport() {
    const cs = window.cornerstone;
    if (!cs || !cs.getEnabledElements) return null;
    for (const enabled of cs.getEnabledElements()) {
      const vp = enabled.viewport;
      if (vp && vp.getCurrentImageId && vp.getCurrentImageId()) return vp;
    }
    return null;
  }

  function draw() {
    if (shell.layer) { shell.layer.remove(); shell.layer = null; }
    if (!shell.shown) return;
    const vp = activeViewport();
    const cs = window.cornerstone;
    if (!vp) return;
    const imageId = vp.getCurrentImageId();
    const plane = cs.metaData.get("imagePlaneModule", imageId) || {};
    const rows = plane.rows, columns = plane.columns;
    if (!rows || !columns) return;
    const side = Math.min(rows, columns), top = Math.floor((rows - side) / 2), left = Math.floor((columns - side) / 2);
    const toCanvas = (col, row) => vp.worldToCanvas(cs.utilities.imageToWorldCoords(imageId, [col, row]));
    const element = vp.element;
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.id = "saliency-overlay";
    svg.setAttribute("style", "position:absolute;inset:0;width:100%;height:100%;pointer-events:none;z-index:10");
    const weights = new Map(shell.zones.map((z) => [z.name, z.weight]));
    for (let r = 0; r < 3; r++) {
      for (let c = 0; c < 3; c++) {
        const name = ZONES[r][c];
        const [x0, y0] = toCanvas(left + (side * EDGES[c]) / 28, top + (side * EDGES[r]) / 28);
        const [x1, y1] = toCanvas(left + (side * EDGES[c + 1]) / 28, top + (side * EDGES[r + 1]) / 28);
        const weighed = weights.has(name);
        const rect = document.createElementNS(svg.namespaceURI, "rect");
        rect.setAttribute("x", Math.min(x0, x1)); rect.setAttribute("y", Math.min(y0, y1));
        rect.setAttribute("width", Math.abs(x1 - x0)); rect.setAttribute("height", Math.abs(y1 - y0));
        rect.setAttribute("fill", weighed ? `rgba(255,64,32,${(0.15 + 0.5 * weights.get(name)).toFixed(2)})` : "none");
        rect.setAttribute("stroke", weighed ? "#ff4020" : "rgba(255,255,255,0.35)");
        rect.setAttribute("stroke-width", weighed ? "2" : "1");
        rect.dataset.zone = name;
        svg.appendChild(rect);
        if (weighed) {
          const label = document.createElementNS(svg.namespaceURI, "text");
          label.setAttribute("x", Math.min(x0, x1) + 6); label.setAttribute("y", Math.min(y0, y1) + 18);
          label.setAttribute("fill", "#fff"); label.setAttribute("font-size", "13"); label.setAttribute("font-family", "sans-serif");
          label.textContent = `${name} ${(100 * weights.get(name)).toFixed(0)}%`;
          svg.appendChild(label);
        }
      }
    }
    element.appendChild(svg);
    shell.layer = svg;
  }

  // Redrawn on every render of any viewport (zoom, pan, another image).
  function follow() {
    const cs = window.cornerstone;
    if (!cs || !cs.eventTarget) { setTimeout(follow, 250); return; }
    document.addEventListener(cs.Enums.Events.IMAGE_RENDERED, () => { if (shell.shown) draw(); }, true);
  }

  session().then(loadZones).catch(() => {});
  follow();
})();
