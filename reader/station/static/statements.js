// The ECG report's statements and measurements, in the report pane (ARCHITECTURE.md, "ECG statements and measurements").
// Statements come from the hub's library (/api/statements); the machine's (the triage's suggestions)
// are shown unconfirmed until the reader confirms (click, Enter on it, Alt+Y for all) or removes or
// changes them; the confirmed ones, in order, build the Findings text (editable). The measurements
// are prefilled from the hub's (exam.triage.ecg; a value not there yet fills in when the details come
// again) and each is editable; an edited value is marked as the reader's. Everything is shown with
// textContent.
import { el } from "./dom.js";

export const MEASUREMENTS = [
  ["heart_rate_bpm", "Rate", "bpm"], ["rr_ms", "RR", "ms"], ["pr_ms", "PR", "ms"], ["qrs_ms", "QRS", "ms"], ["qt_ms", "QT", "ms"],
  ["qtc_bazett_ms", "QTc Bazett", "ms"], ["qtc_fridericia_ms", "QTc Fridericia", "ms"],
  ["p_axis_deg", "P axis", "°"], ["qrs_axis_deg", "QRS axis", "°"], ["t_axis_deg", "T axis", "°"],
];
export const KEYS = [["Alt+S", "find a statement"], ["↑ ↓ Enter", "pick it"], ["Alt+Y", "confirm the machine's"],
  ["Enter / Del", "on a statement: confirm / remove"]];
const MAX_OPTIONS = 12;

// One statement as a line of the Findings text.
export function line(s) { return s.text_zh ? `${s.text_zh}（${s.text}）` : s.text; }

export function matches(library, query) {
  const words = query.toLowerCase().split(/\s+/).filter(Boolean);
  if (!words.length) return [];
  return library.filter((s) => {
    const hay = `${s.code} ${s.text} ${s.text_zh}`.toLowerCase();
    return words.every((w) => hay.includes(w));
  }).slice(0, MAX_OPTIONS);
}

export class StatementPane {
  // root: the pane's element; text: the Findings textarea; onChange: called after every change.
  constructor(root, { text, onChange }) {
    this.root = root; this.text = text; this.onChange = onChange;
    this.library = []; this.items = []; this.block = ""; this.options = []; this.active = 0;
    this.replaceAt = -1; this.enabled = false; this.hubValues = {}; this.edited = new Set();
    this.list = root.querySelector("[data-testid=statements]");
    this.search = root.querySelector("[data-testid=statement-search]");
    this.menu = root.querySelector("[data-testid=statement-options]");
    this.table = root.querySelector("[data-testid=measurements]");
    this.note = root.querySelector("[data-testid=statements-note]");
    root.querySelector("[data-testid=statement-keys]").replaceChildren(
      ...KEYS.flatMap(([k, what]) => [el("kbd", {}, k), ` ${what} · `]));
    this.search.addEventListener("input", () => { this.active = 0; this.showOptions(); });
    this.search.addEventListener("keydown", (event) => this.searchKey(event));
    this.search.addEventListener("blur", () => setTimeout(() => { this.menu.hidden = true; }, 150));
    this.menu.addEventListener("mousedown", (event) => {
      const li = event.target.closest("li[data-code]");
      if (li) { event.preventDefault(); this.add(li.dataset.code); }
    });
    this.list.addEventListener("click", (event) => this.listClick(event));
    this.list.addEventListener("keydown", (event) => this.listKey(event));
    root.querySelector("[data-testid=confirm-all]").addEventListener("click", () => this.confirmAll());
    root.querySelector("[data-testid=rebuild-text]").addEventListener("click", () => this.rebuild());
    this.buildTable();
  }

  setLibrary(answer) { this.library = (answer && answer.statements) || []; }

  // A new exam page: its statements (a draft's or a signed version's, else the machine's
  // suggestions) and measurements; `enabled` false for a signed report being read.
  load({ ecg, report, suggested, measurements, enabled }) {
    this.root.hidden = !ecg;
    this.enabled = Boolean(ecg && enabled);
    this.items = ((report && report.statements) || suggested || []).map((s) => ({
      code: s.code, text: s.text || "", text_zh: s.text_zh || "", source: s.source || "reader",
      confirmed: Boolean(s.confirmed) || (s.source || "reader") === "reader",
    }));
    this.block = this.textOf();
    if (this.block && !this.text.value.startsWith(this.block)) this.block = "";  // not built from them
    this.hubValues = { ...(measurements || {}) };
    this.edited = new Set((report && report.measurements_edited) || []);
    const stored = (report && report.measurements) || null;
    for (const [name] of MEASUREMENTS) {
      const input = this.input(name);
      const value = stored ? stored[name] : this.hubValues[name];
      input.value = value === undefined || value === null ? "" : String(Math.round(Number(value) * 10) / 10);
      this.mark(name);
    }
    this.search.value = ""; this.menu.hidden = true; this.note.textContent = "";
    this.setEnabled(this.enabled);
    this.render();
  }

  setEnabled(on) {
    this.enabled = on;
    for (const node of this.root.querySelectorAll("input, button")) node.disabled = !on;
    this.render();
  }

  // The hub's measurements again (a second triage pass): fill what is empty and not the reader's.
  refresh(measurements) {
    this.hubValues = { ...(measurements || {}) };
    for (const [name] of MEASUREMENTS) {
      const input = this.input(name);
      const value = this.hubValues[name];
      if (!this.edited.has(name) && input.value === "" && value !== undefined) {
        input.value = String(Math.round(Number(value) * 10) / 10);
        this.mark(name);
      }
    }
  }

  missing() { return MEASUREMENTS.some(([name]) => this.hubValues[name] === undefined && !this.edited.has(name)); }

  // What the report body carries.
  body() {
    if (this.root.hidden) return {};
    const measurements = {};
    for (const [name] of MEASUREMENTS) {
      const raw = this.input(name).value.trim();
      if (raw !== "" && Number.isFinite(Number(raw))) measurements[name] = Number(raw);
    }
    return {
      statements: this.items.map(({ code, source, confirmed }) => ({ code, source, confirmed })),
      measurements, measurements_edited: [...this.edited].filter((n) => n in measurements),
    };
  }

  // ---- statements ------------------------------------------------------------------------------
  textOf() { return this.items.filter((s) => s.confirmed).map(line).join("\n"); }

  // The Findings text after a change: the part built from the statements is rebuilt when the
  // reader left it as built; otherwise they are told, and "Rebuild" puts it back.
  sync() {
    const next = this.textOf();
    const value = this.text.value;
    if (this.block && value.startsWith(this.block)) {
      this.text.value = next + value.slice(this.block.length);
      this.block = next; this.note.textContent = "";
    } else if (!this.block) {
      this.text.value = next && value ? `${next}\n${value}` : next || value;
      this.block = next; this.note.textContent = "";
    } else {
      this.note.textContent = "The statements changed and the findings were edited by hand: check the text, or rebuild it.";
    }
    this.render();
    this.onChange();
  }

  rebuild() {
    const value = this.text.value;
    const rest = this.block && value.startsWith(this.block) ? value.slice(this.block.length) : "";
    this.block = ""; this.text.value = rest.replace(/^\n/, "");
    this.sync();
  }

  add(code) {
    const s = this.library.find((x) => x.code === code);
    if (!s || !this.enabled) return;
    const item = { code: s.code, text: s.text, text_zh: s.text_zh, source: "reader", confirmed: true };
    const at = this.items.findIndex((x) => x.code === code);
    if (this.replaceAt >= 0 && this.replaceAt < this.items.length) {
      this.items.splice(this.replaceAt, 1, item);
      this.replaceAt = -1;
    } else if (at >= 0) this.items[at] = { ...this.items[at], confirmed: true };
    else this.items.push(item);
    this.items = this.items.filter((x, i, all) => all.findIndex((y) => y.code === x.code) === i);
    this.search.value = ""; this.menu.hidden = true;
    this.sync();
  }

  confirm(i) { if (this.enabled && this.items[i]) { this.items[i].confirmed = true; this.sync(); } }
  remove(i) { if (this.enabled && this.items[i]) { this.items.splice(i, 1); this.sync(); } }
  change(i) {
    if (!this.enabled || !this.items[i]) return;
    this.replaceAt = i;
    this.search.value = this.items[i].text.split(" ")[0];
    this.focusSearch(); this.showOptions();
  }
  confirmAll() {
    if (!this.enabled || !this.items.some((s) => !s.confirmed)) return;
    for (const s of this.items) s.confirmed = true;
    this.sync();
  }

  focusSearch() { this.search.focus(); this.search.select(); }

  showOptions() {
    this.options = matches(this.library, this.search.value);
    this.active = Math.max(0, Math.min(this.active, this.options.length - 1));
    this.menu.replaceChildren(...this.options.map((s, i) => el("li", {
      role: "option", "aria-selected": String(i === this.active), class: i === this.active ? "active" : "",
      dataset: { testid: "statement-option", code: s.code },
    }, el("span", { class: "code" }, s.code), " ", s.text, " · ", s.text_zh)));
    this.menu.hidden = this.options.length === 0;
    this.search.setAttribute("aria-expanded", String(!this.menu.hidden));
  }

  searchKey(event) {
    if (event.key === "ArrowDown" || event.key === "ArrowUp") {
      event.preventDefault();
      this.active += event.key === "ArrowDown" ? 1 : -1;
      this.showOptions();
    } else if (event.key === "Enter" && !event.ctrlKey && !event.metaKey) {
      event.preventDefault();
      if (this.options[this.active]) this.add(this.options[this.active].code);
    } else if (event.key === "Escape") {  // close the list; not "back to the worklist"
      event.preventDefault(); event.stopPropagation();
      this.search.value = ""; this.menu.hidden = true; this.replaceAt = -1;
      this.text.focus();
    }
  }

  listClick(event) {
    const li = event.target.closest("li[data-index]");
    if (!li) return;
    const i = Number(li.dataset.index);
    const act = event.target.closest("button");
    if (act && act.dataset.act === "remove") this.remove(i);
    else if (act && act.dataset.act === "change") this.change(i);
    else if (!this.items[i].confirmed) this.confirm(i);
  }

  listKey(event) {
    const li = event.target.closest("li[data-index]");
    if (!li || event.target !== li) return;
    const i = Number(li.dataset.index);
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); event.stopPropagation(); this.confirm(i); }
    else if (event.key === "Delete" || event.key === "Backspace") { event.preventDefault(); this.remove(i); }
  }

  render() {
    this.list.replaceChildren(...this.items.map((s, i) => {
      const state = s.confirmed ? "confirmed" : "unconfirmed";
      const li = el("li", {
        class: `statement ${state} ${s.source}`, tabindex: "0",
        title: s.confirmed ? s.code : "the machine's statement: click or Enter to confirm",
        dataset: { testid: "statement", code: s.code, state, source: s.source, index: String(i) },
      }, el("span", { class: "tag" }, s.confirmed ? (s.source === "machine" ? "confirmed" : "reader") : "unconfirmed"),
      " ", s.text, " · ", s.text_zh);
      if (this.enabled) {
        li.append(" ", el("button", { type: "button", dataset: { act: "change", testid: "statement-change" }, title: "change it" }, "change"),
          el("button", { type: "button", dataset: { act: "remove", testid: "statement-remove" }, title: "remove it (Del)" }, "✕"));
      }
      return li;
    }));
    const waiting = this.items.filter((s) => !s.confirmed).length;
    this.root.dataset.unconfirmed = String(waiting);
  }

  // ---- measurements --------------------------------------------------------------------------
  input(name) { return this.table.querySelector(`input[data-name="${name}"]`); }

  buildTable() {
    this.table.replaceChildren(...MEASUREMENTS.map(([name, label, unit]) => {
      const input = el("input", { type: "number", step: "1", inputmode: "decimal", dataset: { name, testid: `measure-${name}` }, "aria-label": label });
      input.addEventListener("input", () => { this.edited.add(name); this.mark(name); this.onChange(); });
      return el("tr", {}, el("th", {}, label), el("td", {}, input), el("td", { class: "note" }, unit),
        el("td", { class: "who", dataset: { testid: `measure-source-${name}` } }));
    }));
  }

  mark(name) {
    const input = this.input(name);
    const source = this.edited.has(name) ? "reader" : input.value === "" ? "" : "hub";
    input.dataset.source = source;
    input.closest("tr").querySelector(".who").textContent = source === "reader" ? "reader's" : source === "hub" ? "measured" : "—";
  }
}
