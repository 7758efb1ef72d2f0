// The dashboard page: sessions, a session's variables (live), a variable's history and chart.
// Plain DOM, no build step, no third-party code. All text goes in through textContent.
"use strict";

const state = {
  token: sessionStorage.getItem("dspex-token") || "",
  claims: null,
  authRequired: false,
  stream: null, // AbortController of the open event stream
  streamSession: null,
  variables: new Map(), // name -> record, for the open session
  route: { session: null, variable: null },
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") node.textContent = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

function headers(extra = {}) {
  const h = { ...extra };
  if (state.token) h.Authorization = `Bearer ${state.token}`;
  return h;
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error && body.error.message) || `HTTP ${status}`);
    this.status = status;
    this.error = (body && body.error) || {};
  }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    if (response.status === 401 && state.authRequired) askForToken("The token was refused: " + ((body && body.error && body.error.message) || "unauthenticated"));
    throw new ApiError(response.status, body);
  }
  return body;
}

function can(perm) {
  if (!state.claims) return false;
  const perms = state.claims.perms || [];
  return perms.includes(perm) || perms.includes("admin");
}

function fmtTime(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds) || seconds <= 0) return "—";
  const d = new Date(seconds * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}

function fmtValue(record) {
  if (record.secret) return "••••• (secret)";
  return typeof record.value === "string" ? record.value : JSON.stringify(record.value);
}

function editText(record) {
  if (record.secret) return "";
  return typeof record.value === "string" ? record.value : JSON.stringify(record.value);
}

function fmtConstraints(constraints) {
  const parts = [];
  for (const [key, value] of Object.entries(constraints || {})) {
    parts.push(`${key}: ${Array.isArray(value) ? value.join(" | ") : JSON.stringify(value)}`);
  }
  return parts.join(", ") || "—";
}

function describeError(err) {
  const e = err.error || {};
  const message = e.message || err.message;
  // The bridge's messages name the rule already ("... (rule max)"); say it only where they don't.
  return e.rule && !message.includes(`rule ${e.rule}`) ? `${message} (rule ${e.rule})` : message;
}

// ------------------------------------------------------------------ token

function askForToken(message) {
  $("token-error").textContent = message || "";
  $("token-input").value = state.token;
  const dialog = $("token-dialog");
  if (!dialog.open) dialog.showModal();
  $("token-input").focus();
}

async function loadClaims() {
  try {
    state.claims = await api("/api/whoami");
  } catch (err) {
    state.claims = null;
    askForToken(describeError(err));
    return false;
  }
  const who = state.claims.sub ? `signed in as ${state.claims.sub} (${(state.claims.perms || []).join(", ")})` : "";
  $("who").textContent = who;
  return true;
}

$("token-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.token = $("token-input").value.trim();
  sessionStorage.setItem("dspex-token", state.token);
  if (await loadClaims()) {
    $("token-dialog").close();
    route();
  }
});

$("token-button").addEventListener("click", () => askForToken(""));

// ------------------------------------------------------------------ sessions

let searchTimer = null;
$("session-search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(loadSessions, 200);
});

async function loadSessions() {
  const q = $("session-search").value.trim();
  $("sessions-error").textContent = "";
  let body;
  try {
    body = await api(`/api/sessions?q=${encodeURIComponent(q)}`);
  } catch (err) {
    $("sessions-error").textContent = describeError(err);
    return;
  }
  const list = $("session-list");
  list.replaceChildren();
  for (const s of body.sessions) {
    const current = state.route.session === s.id ? "page" : null;
    const count = `${s.variables} variable${s.variables === 1 ? "" : "s"}` +
      (s.watchers !== null && s.watchers !== undefined ? ` · ${s.watchers} watching` : "") +
      (s.owner ? ` · ${s.owner}` : "") +
      (s.last_access ? ` · ${fmtTime(s.last_access)}` : "");
    list.append(el("li", {}, el("a", { href: `#/s/${encodeURIComponent(s.id)}`, "aria-current": current, "data-session": s.id },
      s.id, el("span", { class: "count", text: count }))));
  }
  if (!body.sessions.length) list.append(el("li", { class: "muted", text: q ? "No session matches." : "No sessions." }));
}

// ------------------------------------------------------------------ one session

function rowFor(record) {
  const writable = can("write") && !record.secret;
  const input = el("input", {
    type: "text", value: editText(record), "aria-label": `New value of ${record.name}`,
    disabled: !writable, "data-role": "value-input",
  });
  const save = el("button", { type: "submit", disabled: !writable, text: "Save", "data-role": "save" });
  const fieldError = el("div", { class: "field-error", role: "alert", "data-role": "field-error" });
  const form = el("form", { class: "edit", onsubmit: (e) => { e.preventDefault(); saveValue(record.name, input, fieldError); } },
    input, save);
  const lease = record.lease;
  const leaseCell = el("td", { "data-label": "Lease", "data-role": "lease" });
  if (lease) {
    leaseCell.append(el("span", { text: `held by ${lease.optimizer_id}` }), " ",
      el("button", { type: "button", disabled: !(can("optimize") || can("admin")), text: "Stop lease",
        onclick: () => stopLease(record.name, fieldError) }));
  } else {
    leaseCell.textContent = "—";
  }
  const sid = state.route.session;
  return el("tr", { "data-variable": record.name },
    el("th", { scope: "row", "data-label": "Name" }, record.name),
    el("td", { "data-label": "Type", text: record.type }),
    el("td", { class: "constraints", "data-label": "Constraints", text: fmtConstraints(record.constraints) }),
    el("td", { class: "value", "data-label": "Value" },
      el("div", { "data-role": "value", text: fmtValue(record) }), form, fieldError),
    el("td", { class: "num", "data-label": "Version", "data-role": "version", text: String(record.version) }),
    el("td", { "data-label": "Changed by", "data-role": "changed-by", text: record.changed_by || "—" }),
    el("td", { "data-label": "When", "data-role": "when", text: fmtTime(record.updated_at) }),
    leaseCell,
    el("td", {}, el("a", { href: `#/s/${encodeURIComponent(sid)}/v/${encodeURIComponent(record.name)}`, text: "History" })));
}

function renderVariables() {
  const body = $("variables").querySelector("tbody");
  body.replaceChildren();
  for (const record of state.variables.values()) body.append(rowFor(record));
  if (!state.variables.size) body.append(el("tr", {}, el("td", { colspan: "9", class: "muted", text: "No variables yet." })));
}

function applyRecord(record, flash) {
  const known = state.variables.get(record.name);
  if (known && known.version > record.version) return; // an older write arriving late
  state.variables.set(record.name, record);
  if (state.route.variable === null) {
    const body = $("variables").querySelector("tbody");
    const old = body.querySelector(`tr[data-variable="${CSS.escape(record.name)}"]`);
    const fresh = rowFor(record);
    if (old) {
      // Keep what a person is typing: only replace the row if its input is not being edited.
      const input = old.querySelector("[data-role=value-input]");
      if (input && document.activeElement === input) {
        old.querySelector("[data-role=value]").textContent = fmtValue(record);
        old.querySelector("[data-role=version]").textContent = String(record.version);
        old.querySelector("[data-role=changed-by]").textContent = record.changed_by || "—";
        old.querySelector("[data-role=when]").textContent = fmtTime(record.updated_at);
      } else {
        old.replaceWith(fresh);
      }
    } else {
      if (state.variables.size === 1) body.replaceChildren();
      body.append(fresh);
    }
    const row = body.querySelector(`tr[data-variable="${CSS.escape(record.name)}"]`);
    if (flash && row) {
      row.classList.add("flash");
      setTimeout(() => row.classList.remove("flash"), 1200);
    }
  }
}

// ------------------------------------------------------------------ recent module calls

function fmtBinding(binding) {
  const parts = [binding.variable || "?"];
  if (binding.version !== undefined && binding.version !== null) parts.push(` v${binding.version}`);
  if (Object.prototype.hasOwnProperty.call(binding, "value")) {
    const v = binding.value;
    parts.push(" = ", typeof v === "string" ? v : JSON.stringify(v));
  }
  return parts.join("");
}

function renderCalls(calls) {
  const body = $("calls").querySelector("tbody");
  body.replaceChildren();
  for (const call of calls) {
    const list = el("ul", { class: "bindings" });
    for (const [attr, binding] of Object.entries(call.bindings || {})) {
      list.append(el("li", { "data-attribute": attr, title: attr, text: fmtBinding(binding || {}) }));
    }
    body.append(el("tr", { "data-role": "call" },
      el("td", { "data-label": "When", text: fmtTime(call.at) }),
      el("td", { "data-label": "Module", text: String(call.module || "—") }),
      el("td", { "data-label": "Bound variables" }, list)));
  }
  if (!calls.length) body.append(el("tr", {}, el("td", { colspan: "3", class: "muted", text: "No calls reported yet." })));
}

let callsLoading = null;
async function loadCalls(sid) {
  // One request at a time: events arriving meanwhile ask for one more load when it is done.
  if (callsLoading) { callsLoading.again = true; return; }
  callsLoading = { again: false };
  try {
    $("calls-error").textContent = "";
    const body = await api(`/api/sessions/${encodeURIComponent(sid)}/calls`);
    if (state.route.session === sid) renderCalls(body.calls || []);
  } catch (err) {
    if (state.route.session === sid) $("calls-error").textContent = describeError(err);
  } finally {
    const again = callsLoading.again;
    callsLoading = null;
    if (again && state.route.session === sid && state.route.variable === null) loadCalls(sid);
  }
}

async function openSession(sid) {
  $("empty").hidden = true;
  $("variable-view").hidden = true;
  $("session-view").hidden = false;
  $("session-title").textContent = sid;
  $("session-error").textContent = "";
  let body;
  try {
    body = await api(`/api/sessions/${encodeURIComponent(sid)}`);
  } catch (err) {
    $("session-error").textContent = describeError(err);
    state.variables.clear();
    renderVariables();
    return;
  }
  const s = body.session;
  $("session-meta").textContent = `${s.variables} variables · created ${fmtTime(s.created_at)}` +
    (s.owner ? ` · owner ${s.owner}` : "");
  state.variables = new Map(body.variables.map((v) => [v.name, v]));
  renderVariables();
  follow(sid);
  loadCalls(sid);
}

async function saveValue(name, input, fieldError) {
  fieldError.textContent = "";
  const record = state.variables.get(name);
  try {
    const body = await api(`/api/sessions/${encodeURIComponent(state.route.session)}/variables/${encodeURIComponent(name)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ value: input.value }),
    });
    applyRecord(body.variable, true);
  } catch (err) {
    fieldError.textContent = describeError(err);
    if (record) input.value = editText(record);
    input.focus();
  }
}

async function stopLease(name, fieldError) {
  fieldError.textContent = "";
  try {
    const body = await api(`/api/sessions/${encodeURIComponent(state.route.session)}/variables/${encodeURIComponent(name)}/lease/stop`, { method: "POST" });
    applyRecord(body.variable, true);
  } catch (err) {
    fieldError.textContent = describeError(err);
  }
}

// ------------------------------------------------------------------ live updates

function setLive(text, live) {
  const pill = $("live");
  pill.textContent = text;
  pill.classList.toggle("live", live);
}

function follow(sid) {
  if (state.streamSession === sid && state.stream) return;
  if (state.stream) state.stream.abort();
  const controller = new AbortController();
  state.stream = controller;
  state.streamSession = sid;
  const run = async (delay) => {
    if (controller.signal.aborted) return;
    try {
      const response = await fetch(`/api/sessions/${encodeURIComponent(sid)}/events`, { headers: headers(), signal: controller.signal });
      if (!response.ok || !response.body) throw new Error(`HTTP ${response.status}`);
      setLive("live", true);
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          handleEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
        }
      }
    } catch (err) {
      if (controller.signal.aborted) return;
    }
    setLive("reconnecting…", false);
    setTimeout(() => run(Math.min(delay * 2, 10000)), delay);
  };
  run(500);
}

function handleEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  if (!data.length) return;
  const payload = JSON.parse(data.join("\n"));
  if (event === "failure") {
    setLive("stopped", false);
    $("session-error").textContent = payload.message;
    return;
  }
  if (event !== "update" || !payload.variable) return;
  if (state.route.variable === null && state.route.session) loadCalls(state.route.session);
  if (payload.kind === "deleted") {
    state.variables.delete(payload.name);
    if (state.route.variable === null) renderVariables();
    return;
  }
  applyRecord(payload.variable, true);
  if (state.route.variable === payload.name) loadHistory(state.route.session, payload.name);
}

// ------------------------------------------------------------------ one variable

function numeric(type) { return type === "float" || type === "integer"; }

function drawChart(history) {
  const svg = $("chart");
  svg.replaceChildren();
  const points = history.filter((h) => typeof h.value === "number").map((h) => [h.version, h.value]).sort((a, b) => a[0] - b[0]);
  if (points.length < 1) { $("chart-figure").hidden = true; return; }
  $("chart-figure").hidden = false;
  const W = 640, H = 200, pad = 28;
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs) + 1;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const sx = (x) => pad + ((x - x0) / (x1 - x0)) * (W - 2 * pad);
  const sy = (y) => H - pad - ((y - y0) / (y1 - y0)) * (H - 2 * pad);
  let d = "";
  points.forEach(([x, y], i) => {
    const next = i + 1 < points.length ? points[i + 1][0] : x1;
    d += `${i ? "L" : "M"}${sx(x)},${sy(y)} L${sx(next)},${sy(y)} `;
  });
  const ns = "http://www.w3.org/2000/svg";
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", d);
  path.setAttribute("class", "step");
  svg.append(path);
  for (const [x, y] of points) {
    const c = document.createElementNS(ns, "circle");
    c.setAttribute("cx", sx(x)); c.setAttribute("cy", sy(y)); c.setAttribute("r", 3); c.setAttribute("class", "dot");
    svg.append(c);
  }
  for (const [y, label] of [[y1, y1], [y0, y0]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", 2); t.setAttribute("y", sy(y) + 4); t.textContent = String(Number(label.toPrecision(4)));
    svg.append(t);
  }
  $("chart-caption").textContent = `Value by version, v${x0}–v${x1 - 1} (step chart)`;
}

async function loadHistory(sid, name) {
  $("variable-error").textContent = "";
  let body;
  try {
    body = await api(`/api/sessions/${encodeURIComponent(sid)}/variables/${encodeURIComponent(name)}/history`);
  } catch (err) {
    $("variable-error").textContent = describeError(err);
    return;
  }
  const v = body.variable;
  state.variables.set(v.name, v);
  $("variable-meta").textContent = `${v.type} · ${fmtConstraints(v.constraints)} · now ${fmtValue(v)} at v${v.version}` +
    (v.lease ? ` · lease held by ${v.lease.optimizer_id}` : "");
  const tbody = $("history").querySelector("tbody");
  tbody.replaceChildren();
  for (const h of body.history) {
    const current = h.version === v.version;
    const meta = Object.entries(h.metadata || {}).map(([k, val]) => `${k}=${val}`).join(", ") || "—";
    const button = el("button", {
      type: "button", disabled: current || !can("write") || v.secret, text: current ? "Current" : `Roll back to v${h.version}`,
      onclick: () => rollback(sid, name, h.version),
    });
    tbody.append(el("tr", { "data-version": String(h.version) },
      el("td", { class: "num", text: String(h.version) }),
      el("td", { text: v.secret ? "••••• (secret)" : (typeof h.value === "string" ? h.value : JSON.stringify(h.value)) }),
      el("td", { text: fmtTime(h.timestamp) }),
      el("td", { text: h.changed_by || "—" }),
      el("td", { text: meta }),
      el("td", {}, button)));
  }
  if (numeric(v.type) && !v.secret) drawChart(body.history); else $("chart-figure").hidden = true;
}

async function rollback(sid, name, version) {
  $("variable-error").textContent = "";
  try {
    const body = await api(`/api/sessions/${encodeURIComponent(sid)}/variables/${encodeURIComponent(name)}/rollback`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ version }),
    });
    state.variables.set(name, body.variable);
    await loadHistory(sid, name);
  } catch (err) {
    $("variable-error").textContent = describeError(err);
  }
}

function openVariable(sid, name) {
  $("empty").hidden = true;
  $("session-view").hidden = true;
  $("variable-view").hidden = false;
  $("variable-title").textContent = `${name} — ${sid}`;
  $("back-link").setAttribute("href", `#/s/${encodeURIComponent(sid)}`);
  follow(sid);
  loadHistory(sid, name);
}

// ------------------------------------------------------------------ routing

function parseRoute() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  if (parts[0] === "s" && parts[1]) return { session: parts[1], variable: parts[2] === "v" && parts[3] ? parts[3] : null };
  return { session: null, variable: null };
}

function route() {
  const next = parseRoute();
  const sameSession = next.session === state.route.session;
  state.route = next;
  for (const a of $("session-list").querySelectorAll("a")) {
    if (a.dataset.session === next.session) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  if (!next.session) {
    if (state.stream) state.stream.abort();
    state.stream = null; state.streamSession = null;
    $("session-view").hidden = true; $("variable-view").hidden = true; $("empty").hidden = false;
    loadSessions();
    return;
  }
  if (!sameSession && state.stream) { state.stream.abort(); state.stream = null; state.streamSession = null; }
  if (next.variable) openVariable(next.session, next.variable); else openSession(next.session);
}

window.addEventListener("hashchange", route);

async function start() {
  let config;
  try {
    config = await api("/api/config");
  } catch (err) {
    $("sessions-error").textContent = describeError(err);
    return;
  }
  state.authRequired = config.auth_required;
  $("bridge").textContent = `bridge ${config.bridge}`;
  $("token-button").hidden = !config.auth_required;
  if (config.auth_required && !state.token) { askForToken(""); return; }
  if (!(await loadClaims())) return;
  await loadSessions();
  route();
}

start();
