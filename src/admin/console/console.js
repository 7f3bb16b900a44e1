// The hookrelay console: plain DOM, no framework, no network but this origin's
// /admin/ API. Every value from the API is put in the page as text
// (textContent, createTextNode), never as markup: payloads come from outside.

const TOKEN_KEY = "hookrelay.token";
let token = sessionStorage.getItem(TOKEN_KEY);
let refresh = null;
// The render in progress: one that a newer render overtook paints nothing
// (a slow refresh of a page left must not replace the page shown).
let rendering = null;

const main = document.getElementById("main");
const nav = document.getElementById("nav");
const statusBox = document.getElementById("status");

// ---- DOM helpers ----------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "text") node.textContent = String(value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children.flat()) if (child) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

/// A time in the viewer's zone, with the raw timestamp on hover.
function time(iso) {
  if (!iso) return el("span", { class: "muted" }, "—");
  const d = new Date(iso);
  return el("time", { datetime: iso, title: iso }, isNaN(d) ? iso : d.toLocaleString());
}

function pill(text, kind) {
  return el("span", { class: `pill ${kind || text}` }, text);
}

function show(message, kind = "error") {
  statusBox.replaceChildren(message ? el("div", { class: kind }, message) : "");
}

// ---- API ------------------------------------------------------------------

class ApiError extends Error {}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      method: options.method || "GET",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: options.body === undefined ? undefined : JSON.stringify(options.body),
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError("The relay cannot be reached: is it running, and is this its admin address?");
  }
  if (response.status === 401) {
    signOut("The token was refused: sign in again.");
    throw new ApiError("unauthorized");
  }
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (response.status === 503) {
    // The store's trouble, or the relay's own word (a worker that did not answer).
    const said = body && body.error;
    throw new ApiError(said && said !== "storage unavailable" ? `Not done: ${said}.` : "Storage is unavailable: the relay cannot read or write its store.");
  }
  if (!response.ok) throw new ApiError((body && body.error) || `The relay answered ${response.status}.`);
  return body;
}

// A button's action: when it fails, the page says why.
function act(action) {
  return async () => {
    try {
      await action();
    } catch (err) {
      if (err.message !== "unauthorized") show(err.message);
    }
  };
}

// ---- Sign in and out ------------------------------------------------------

function signOut(message) {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  // No hashchange: it would clear the message.
  history.replaceState(null, "", "#/sign-in");
  render().then(() => show(message || ""));
}

function signInView() {
  nav.hidden = true;
  const input = el("input", { id: "token", type: "password", autocomplete: "off", required: true });
  const form = el("form", { class: "card signin", onsubmit: async (e) => {
    e.preventDefault();
    token = input.value.trim();
    try {
      await api("/admin/targets");
    } catch (err) {
      if (err.message !== "unauthorized") show(err.message);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    show("");
    if (location.hash === "#/overview") route();
    else location.hash = "#/overview";
  } },
  el("h1", {}, "Sign in"),
  el("p", { class: "muted" }, "Use the relay's admin token (admin.token in routes.yaml). It is kept in this tab only, and forgotten when you sign out."),
  el("label", { for: "token" }, "Admin token"), input,
  el("button", { type: "submit", id: "sign-in" }, "Sign in"));
  main.replaceChildren(form);
  input.focus();
}

// ---- Overview -------------------------------------------------------------

const COLORS = {
  accepted: "#1d7a46", duplicate: "#8a94a3", unauthorized: "#b3261e", forbidden: "#7f1d1d",
  invalid: "#d97706", too_large: "#a16207", unavailable: "#6b21a8",
  delivered: "#1d7a46", retried: "#d97706", dead: "#b3261e", skipped: "#8a94a3", coalesced: "#1f5fbf",
};
const PALETTE = ["#1f5fbf", "#1d7a46", "#d97706", "#6b21a8", "#b3261e", "#0e7490", "#a16207", "#4b5563"];

function targetsTable(targets) {
  if (!targets.length) return el("p", { class: "empty" }, "No targets are configured.");
  return el("div", { class: "scroll" }, el("table", { id: "targets-table" },
    el("thead", {}, el("tr", {}, ["Target", "Queued", "In flight", "Held", "Dead", "Circuit", "Paused"].map((h) => el("th", {}, h)))),
    el("tbody", {}, targets.map((t) => el("tr", { "data-target": t.name },
      el("td", {}, t.name), el("td", {}, t.queued), el("td", {}, t.in_flight), el("td", {}, t.held ?? 0),
      el("td", {}, t.dead), el("td", {}, pill(t.circuit)), el("td", {}, t.paused ? pill("paused") : "no"))))));
}

/// Per-minute stacked bars of `series` ([{name, color, values}]).
function barChart(id, title, minutes, series) {
  const width = 600, height = 140, n = minutes.length || 1;
  const totals = minutes.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
  const max = Math.max(1, ...totals);
  const bars = [];
  minutes.forEach((m, i) => {
    let y = height;
    for (const s of series) {
      const v = s.values[i] || 0;
      if (!v) continue;
      const h = (v / max) * (height - 10);
      y -= h;
      bars.push(svg("rect", { x: (i * width) / n + 1, y, width: Math.max(1, width / n - 2), height: h, fill: s.color },
        svg("title", {}, `${new Date(m.start).toLocaleTimeString()} ${s.name}: ${v}`)));
    }
  });
  return chartCard(id, title, max, bars, series);
}

/// Lines of `series` over the minutes.
function lineChart(id, title, minutes, series) {
  const width = 600, height = 140, n = Math.max(1, minutes.length - 1);
  const max = Math.max(1, ...series.flatMap((s) => s.values.filter((v) => v !== null)));
  const lines = series.map((s) => svg("polyline", {
    fill: "none", stroke: s.color, "stroke-width": 2,
    points: s.values.map((v, i) => `${(i * width) / n},${height - ((v || 0) / max) * (height - 10)}`).join(" "),
  }));
  return chartCard(id, title, max, lines, series);
}

function chartCard(id, title, max, shapes, series) {
  const empty = !series.some((s) => s.values.some((v) => v));
  return el("section", { class: "card chart", id },
    el("h2", {}, title),
    el("div", { class: "muted" }, `last hour, per minute; top ${max}`),
    svg("svg", { viewBox: "0 0 600 140", preserveAspectRatio: "none", role: "img", "aria-label": title },
      svg("line", { x1: 0, y1: 140, x2: 600, y2: 140, stroke: "#d9dee5" }), shapes),
    empty ? el("div", { class: "empty" }, "Nothing in the last hour.") :
      el("div", { class: "legend" }, series.map((s) => el("span", {},
        svg("svg", { width: 10, height: 10, "aria-hidden": "true" }, svg("rect", { width: 10, height: 10, fill: s.color })), ` ${s.name}`))));
}

/// Series per `name outcome` from the minutes' maps.
function outcomeSeries(minutes, field) {
  const keys = new Set();
  for (const m of minutes) for (const [name, outcomes] of Object.entries(m[field])) for (const o of Object.keys(outcomes)) keys.add(`${name}\u0000${o}`);
  return [...keys].sort().map((key, i) => {
    const [name, outcome] = key.split("\u0000");
    return { name: `${name} ${outcome}`, color: COLORS[outcome] && keys.size <= 8 ? COLORS[outcome] : PALETTE[i % PALETTE.length],
      values: minutes.map((m) => (m[field][name] || {})[outcome] || 0) };
  });
}

async function overviewView() {
  const mine = rendering;
  const [targets, stats] = await Promise.all([api("/admin/targets"), api("/admin/stats?minutes=60")]);
  const minutes = stats.minutes;
  const queueNames = [...new Set(minutes.flatMap((m) => Object.keys(m.queued)))].sort();
  const queue = queueNames.map((name, i) => ({ name, color: PALETTE[i % PALETTE.length], values: minutes.map((m) => m.queued[name] ?? null) }));
  if (mine !== rendering) return;
  main.replaceChildren(
    el("h1", {}, "Overview"),
    el("section", { class: "card" }, el("h2", {}, "Targets"), targetsTable(targets.targets)),
    el("div", { class: "charts" },
      barChart("chart-webhooks", "Webhooks per source, by outcome", minutes, outcomeSeries(minutes, "webhooks")),
      barChart("chart-deliveries", "Deliveries per target, by outcome", minutes, outcomeSeries(minutes, "deliveries")),
      lineChart("chart-queue", "Queue depth per target", minutes, queue)));
  refresh = setTimeout(() => route(), 5000);
}

// ---- Events ---------------------------------------------------------------

function params() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

async function eventsView() {
  const mine = rendering;
  const p = params();
  const targets = (await api("/admin/targets")).targets.map((t) => t.name);
  const query = new URLSearchParams();
  for (const k of ["source", "event", "status", "target", "before"]) if (p.get(k)) query.set(k, p.get(k));
  query.set("limit", "50");
  const list = await api(`/admin/events?${query}`);
  const field = (name, label, input) => el("label", { for: `f-${name}` }, label, input);
  const select = (name, options) => el("select", { id: `f-${name}`, name },
    el("option", { value: "" }, "any"), options.map((o) => el("option", { value: o, selected: p.get(name) === o }, o)));
  const form = el("form", { class: "filters", onsubmit: (e) => {
    e.preventDefault();
    const next = new URLSearchParams();
    for (const [k, v] of new FormData(e.target)) if (v) next.set(k, v);
    location.hash = `#/events?${next}`;
  } },
  field("source", "Source", el("input", { id: "f-source", name: "source", value: p.get("source") || "", placeholder: "any" })),
  field("event", "Event (glob)", el("input", { id: "f-event", name: "event", value: p.get("event") || "", placeholder: "e.g. page.*" })),
  field("status", "Status", select("status", ["pending", "delivered", "dead", "skipped", "coalesced"])),
  field("target", "Target", select("target", targets)),
  el("button", { type: "submit" }, "Filter"));
  const rows = list.events.map((e) => el("tr", {},
    el("td", {}, time(e.received_at)),
    el("td", {}, e.source),
    el("td", {}, el("a", { href: `#/events/${encodeURIComponent(e.id)}` }, e.event)),
    el("td", { class: "hide-narrow" }, e.deliveries.map((d) => pill(`${d.target}: ${d.status}`, d.status)))));
  const older = list.next_before ? el("button", { class: "secondary", type: "button", onclick: () => {
    const next = new URLSearchParams(params());
    next.set("before", list.next_before);
    location.hash = `#/events?${next}`;
  } }, "Older") : null;
  if (mine !== rendering) return;
  main.replaceChildren(el("h1", {}, "Events"), form,
    rows.length ? el("div", { class: "scroll" }, el("table", { id: "events-table" },
      el("thead", {}, el("tr", {}, el("th", {}, "Received"), el("th", {}, "Source"), el("th", {}, "Event"), el("th", { class: "hide-narrow" }, "Deliveries"))),
      el("tbody", {}, rows))) : el("p", { class: "empty" }, "No events match."),
    el("div", { class: "actions" }, p.get("before") ? el("a", { href: "#/events" }, "Newest") : null, older));
}

function deliveryDetails(d) {
  const parts = [];
  if (d.due_at) parts.push("due ", time(d.due_at));
  if (d.delivered_at) parts.push("delivered ", time(d.delivered_at));
  if (d.dead_at) parts.push("dead ", time(d.dead_at), ": ", d.reason);
  if (d.skipped_at) parts.push("skipped ", time(d.skipped_at));
  if (d.coalesced_at) parts.push("coalesced into ", el("a", { href: `#/events/${encodeURIComponent(d.into)}` }, d.into));
  if (d.waiting_for) parts.push(" waiting for ", el("a", { href: `#/events/${encodeURIComponent(d.waiting_for)}` }, d.waiting_for));
  if (d.coalesced) parts.push(` (stands for ${d.coalesced} events)`);
  return parts;
}

async function eventView(id) {
  const mine = rendering;
  const ev = await api(`/admin/events/${encodeURIComponent(id)}`);
  const redeliver = (target) => act(async () => {
    const q = target ? `?target=${encodeURIComponent(target)}` : "";
    const r = await api(`/admin/events/${encodeURIComponent(id)}/redeliver${q}`, { method: "POST" });
    await route();
    show(`Queued again for ${r.redelivered.join(", ") || "no target"}.`, "notice");
  });
  const deliveries = ev.deliveries.map((d) => el("section", { class: "card", "data-target": d.target },
    el("h2", {}, d.target, " ", pill(d.status)),
    el("p", {}, deliveryDetails(d)),
    d.attempts.length ? el("div", { class: "scroll" }, el("table", { class: "attempts" },
      el("thead", {}, el("tr", {}, el("th", {}, "Attempt at"), el("th", {}, "Status or error"), el("th", {}, "Duration"))),
      el("tbody", {}, d.attempts.map((a) => el("tr", {},
        el("td", {}, time(a.at)), el("td", {}, a.status ?? a.error ?? ""), el("td", {}, `${a.duration_ms} ms`)))))) :
      el("p", { class: "muted" }, "Not attempted yet."),
    el("button", { type: "button", class: "secondary", onclick: redeliver(d.target) }, `Redeliver to ${d.target}`)));
  if (mine !== rendering) return;
  main.replaceChildren(
    el("h1", {}, ev.event, " ", el("span", { class: "muted" }, `from ${ev.source}`)),
    el("p", {}, "Received ", time(ev.received_at), " · ", el("code", {}, ev.id)),
    el("div", { class: "actions" }, ev.deliveries.length ? el("button", { type: "button", id: "redeliver-all", onclick: redeliver(null) }, "Redeliver to every target") : null),
    ...(deliveries.length ? deliveries : [el("p", { class: "empty" }, "No target's route matched this event.")]),
    el("h2", {}, "Payload"),
    el("pre", { class: "payload", id: "payload" }, JSON.stringify(ev.payload, null, 2)),
    el("details", {}, el("summary", {}, "As received, byte for byte (what the targets are sent)"),
      el("pre", { class: "payload", id: "payload-raw" }, ev.payload_text)));
}

// ---- Dead letters ---------------------------------------------------------

async function deadLettersView() {
  const mine = rendering;
  const p = params();
  const target = p.get("target") || "";
  const targets = (await api("/admin/targets")).targets.map((t) => t.name);
  const q = new URLSearchParams({ limit: "200" });
  if (target) q.set("target", target);
  if (p.get("before")) q.set("before", p.get("before"));
  const page = await api(`/admin/dead-letters?${q}`);
  const list = page.dead_letters;
  const older = page.next_before ? el("button", { class: "secondary", type: "button", id: "dead-older", onclick: () => {
    const next = new URLSearchParams(params());
    next.set("before", page.next_before);
    location.hash = `#/dead-letters?${next}`;
  } }, "Older") : null;
  const confirmBox = el("div", { class: "actions", id: "confirm" });
  const ask = (question, action) => confirmBox.replaceChildren(el("span", {}, question),
    el("button", { type: "button", id: "confirm-yes", onclick: act(async () => { confirmBox.replaceChildren(); await action(); }) }, "Yes, replay"),
    el("button", { type: "button", class: "secondary", onclick: () => confirmBox.replaceChildren() }, "Cancel"));
  // One request per target: a row is one event's dead letter to one target,
  // and an event may be dead for several.
  const replay = async (bodies) => {
    let replayed = 0;
    for (const body of bodies) replayed += (await api("/admin/dead-letters/replay", { method: "POST", body })).replayed;
    await route();
    show(`${replayed} replayed.`, "notice");
  };
  const checks = list.map((d) => el("input", { type: "checkbox", "data-id": d.id, "data-target": d.target, "aria-label": `select ${d.id} for ${d.target}` }));
  const selected = () => {
    const byTarget = new Map();
    for (const c of checks.filter((c) => c.checked)) byTarget.set(c.dataset.target, [...(byTarget.get(c.dataset.target) || []), c.dataset.id]);
    return [...byTarget].map(([target, ids]) => ({ target, ids }));
  };
  const rows = list.map((d, i) => el("tr", {},
    el("td", {}, checks[i]),
    el("td", {}, el("a", { href: `#/events/${encodeURIComponent(d.id)}` }, d.id)),
    el("td", {}, d.target),
    el("td", {}, time(d.dead_at)),
    el("td", {}, d.reason, d.last_attempt ? el("div", { class: "muted" }, `last: ${d.last_attempt.status ?? d.last_attempt.error ?? ""}`) : null)));
  if (mine !== rendering) return;
  main.replaceChildren(el("h1", {}, "Dead letters"),
    el("form", { class: "filters", onchange: (e) => { location.hash = e.target.value ? `#/dead-letters?target=${encodeURIComponent(e.target.value)}` : "#/dead-letters"; } },
      el("label", { for: "f-target" }, "Target", el("select", { id: "f-target" }, el("option", { value: "" }, "all"),
        targets.map((t) => el("option", { value: t, selected: t === target }, t))))),
    el("div", { class: "actions" },
      el("button", { type: "button", id: "replay-selected", disabled: !list.length, onclick: () => {
        const bodies = selected();
        const count = bodies.reduce((n, b) => n + b.ids.length, 0);
        if (!count) return show("Select dead letters to replay first.");
        ask(`Replay ${count} selected?`, () => replay(bodies));
      } }, "Replay selected"),
      target ? el("button", { type: "button", id: "replay-all", class: "secondary", disabled: !list.length,
        onclick: () => ask(`Replay every dead letter of ${target}?`, () => replay([{ target }])) }, `Replay all of ${target}`) : null),
    confirmBox,
    list.length ? el("div", { class: "scroll" }, el("table", { id: "dead-table" },
      el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, "Event"), el("th", {}, "Target"), el("th", {}, "Died"), el("th", {}, "Last error"))),
      el("tbody", {}, rows))) : el("p", { class: "empty" }, "No dead letters."),
    older);
}

// ---- Targets --------------------------------------------------------------

async function targetsView() {
  const mine = rendering;
  const targets = (await api("/admin/targets")).targets;
  const toggle = (t) => act(async () => {
    await api(`/admin/targets/${encodeURIComponent(t.name)}/${t.paused ? "resume" : "pause"}`, { method: "POST" });
    await route();
    show(`${t.name} ${t.paused ? "resumed" : "paused"}.`, "notice");
  });
  if (mine !== rendering) return;
  main.replaceChildren(el("h1", {}, "Targets"), targetsTable(targets),
    el("div", { class: "actions" }, targets.map((t) => el("button", { type: "button", id: `toggle-${t.name}`, class: t.paused ? "" : "secondary", onclick: toggle(t) },
      `${t.paused ? "Resume" : "Pause"} ${t.name}`))));
}

// ---- Routing --------------------------------------------------------------

async function render() {
  clearTimeout(refresh);
  rendering = {};
  const hash = location.hash.split("?")[0];
  if (!token) return signInView();
  nav.hidden = false;
  for (const a of nav.querySelectorAll("a")) a.classList.toggle("current", hash.startsWith(a.getAttribute("href")));
  if (hash.startsWith("#/events/")) return eventView(decodeURIComponent(hash.slice("#/events/".length)));
  if (hash === "#/events") return eventsView();
  if (hash === "#/dead-letters") return deadLettersView();
  if (hash === "#/targets") return targetsView();
  if (hash !== "#/overview") {
    location.hash = "#/overview";
    return;
  }
  return overviewView();
}

async function route() {
  const done = render();
  // Set as render began: a render overtaken since says nothing either.
  const mine = rendering;
  try {
    await done;
    if (mine !== rendering) return;
    if (statusBox.firstChild && statusBox.firstChild.className === "error") show("");
  } catch (err) {
    if (mine === rendering && err.message !== "unauthorized") show(err.message);
  }
}

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", () => { show(""); route(); });
route();
