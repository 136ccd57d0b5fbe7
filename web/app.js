// The live event page: one DeltaPush connection to this origin's /ws (through the router),
// one subscription per picked pattern, events rendered per panel, connection health on top.
//
// URL parameters: ?token=<jwt> (taken, then removed from the address bar), ?channels=a,b
// (the patterns to pick), ?connect=0 (do not connect on load). Every list is bounded.

import { DeltaPush, parsePattern } from "./delta-push.js";

const PRESETS = ["market.ticker", "market.trades", "market.orderbook", "order.*", "risk.*", "ai.*", "strategy.*", "backtest.*", "spirit.*"];
const DEFAULT_PICKED = ["market.ticker", "order.*", "risk.*"];
const MAX_ROWS = 200; // per event list
const MAX_LOG = 300;
const MAX_TICKERS = 60;
const STORAGE_KEY = "delta-push.channels"; // the picked patterns (never the token)

const $ = (id) => document.getElementById(id);
const el = (tag, className, text) => {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
};

const page = {
  client: null,
  subscriptions: new Map(), // pattern -> {off, status}
  picked: [],
  lastRendered: null, // the client calls every matching subscription: render an event once
  tickers: new Map(), // channel -> tile
  counts: { events: 0, duplicates: 0, dropped: 0, recovered: 0, unrecovered: 0, reconnects: 0 },
  connectedAt: null,
  previousNode: null,
};

// --- start -------------------------------------------------------------------------------

function start() {
  const params = new URLSearchParams(location.search);
  const token = params.get("token");
  if (token !== null) {
    $("token").value = token;
    params.delete("token"); // out of the address bar, history and screenshots
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
  }
  const fromUrl = params.get("channels");
  let stored = null;
  try {
    stored = JSON.parse(localStorage.getItem(STORAGE_KEY) || "null");
  } catch {
    stored = null;
  }
  page.picked = fromUrl !== null ? fromUrl.split(",").map((s) => s.trim()).filter(Boolean) : Array.isArray(stored) ? stored : [...DEFAULT_PICKED];
  page.picked = page.picked.filter(isPattern);
  renderChips();

  $("connect-form").addEventListener("submit", (e) => {
    e.preventDefault();
    connect();
  });
  $("disconnect").addEventListener("click", disconnect);
  $("add-pattern").addEventListener("click", addCustom);
  $("custom-pattern").addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      addCustom();
    }
  });
  setInterval(tickClock, 1000);
  if (params.get("connect") !== "0" && token !== null) connect();
  else log("info", "Paste a token and press Connect (empty: anonymous, public market channels only).");
}

function isPattern(text) {
  try {
    parsePattern(text);
    return true;
  } catch {
    return false;
  }
}

// --- connection ----------------------------------------------------------------------------

function connect() {
  disconnect();
  const token = $("token").value.trim();
  const client = new DeltaPush({ token: token || undefined });
  page.client = client;
  window.deltaPush = client; // for the browser console
  page.previousNode = null;
  client.on("state", onState);
  client.on("lagged", onLagged);
  client.on("unrecovered", onUnrecovered);
  client.on("ack", onAck);
  client.on("error", onError);
  client.on("handlerError", (error) => log("error", `page failed to render an event: ${error}`));
  for (const pattern of page.picked) subscribe(pattern);
  hideBanner();
  client.connect();
  $("connect").textContent = "Reconnect";
  $("disconnect").disabled = false;
}

function disconnect() {
  if (!page.client) return;
  const client = page.client;
  page.client = null;
  client.close();
  page.subscriptions.clear();
  renderChips();
  $("disconnect").disabled = true;
  $("connect").textContent = "Connect";
}

function subscribe(pattern) {
  const off = page.client.subscribe([pattern], render);
  page.subscriptions.set(pattern, { off, status: "pending" });
}

function setPicked(pattern, on) {
  page.picked = on ? [...new Set([...page.picked, pattern])] : page.picked.filter((p) => p !== pattern);
  try {
    localStorage.setItem(STORAGE_KEY, JSON.stringify(page.picked));
  } catch {
    // storage disabled: the pick lasts for this page only
  }
  if (page.client) {
    if (on && !page.subscriptions.has(pattern)) subscribe(pattern);
    if (!on && page.subscriptions.has(pattern)) {
      page.subscriptions.get(pattern).off();
      page.subscriptions.delete(pattern);
      log("info", `unsubscribed ${pattern}`);
    }
  }
  renderChips();
}

function addCustom() {
  const input = $("custom-pattern");
  const pattern = input.value.trim();
  if (!pattern) return;
  if (!isPattern(pattern)) {
    input.setCustomValidity("not a pattern: *, <domain>.* or <domain>.<name>, optionally :<key> or :*");
    input.reportValidity();
    return;
  }
  input.setCustomValidity("");
  input.value = "";
  setPicked(pattern, true);
}

const STATE_TEXT = {
  idle: "NOT CONNECTED",
  connecting: "CONNECTING",
  connected: "LIVE",
  reconnecting: "MOVING NODE",
  disconnected: "DISCONNECTED",
  closed: "CLOSED",
};

function onState(state, detail) {
  const box = $("state");
  box.dataset.state = state;
  let text = STATE_TEXT[state] || state.toUpperCase();
  if (state === "disconnected" && detail.retryIn !== undefined) text += ` · retry in ${detail.retryIn} ms`;
  if (state === "connecting" && detail.attempt) text += ` · attempt ${detail.attempt + 1}`;
  $("state-text").textContent = text;
  const client = page.client;
  if (state === "connected") {
    page.connectedAt = Date.now();
    $("node").textContent = detail.node;
    $("user").textContent = detail.userId ?? "anonymous";
    if (client && client.connects > 1) {
      page.counts.reconnects += 1;
      log("ok", `reconnected to ${detail.node}${page.previousNode && page.previousNode !== detail.node ? ` (was ${page.previousNode})` : ""}; resuming from cursors`);
    } else {
      log("ok", `connected to ${detail.node} as ${detail.userId ?? "anonymous"}`);
    }
    page.previousNode = detail.node;
    for (const entry of page.subscriptions.values()) entry.status = "pending";
    renderChips();
  } else if (state === "reconnecting") {
    log("warn", `node ${page.previousNode ?? ""} asked to reconnect: ${detail.reason || "no reason"}`);
  } else if (state === "disconnected") {
    page.connectedAt = null;
    log("warn", `disconnected${describeClose(detail)} · retry in ${detail.retryIn} ms`);
  } else if (state === "closed") {
    page.connectedAt = null;
    for (const entry of page.subscriptions.values()) entry.status = "closed";
    renderChips();
    if (detail.fatal) {
      const what = detail.previous === "connected" ? "Connection closed by the server" : "Connection refused";
      const text = `${what}${describeClose(detail)}. Not retrying: ${advice(detail.code)}`;
      log("error", text);
      showBanner(text, detail.code);
      $("connect").textContent = "Connect";
    } else {
      log("info", "closed");
    }
  }
  renderCounts();
}

function describeClose(detail) {
  const parts = [];
  if (detail.code !== null && detail.code !== undefined) parts.push(`close ${detail.code}`);
  if (detail.reason) parts.push(detail.reason);
  const error = detail.error;
  if (error && error.code) {
    const said = detail.reason && String(error.message).startsWith(detail.reason);
    parts.push(said ? error.code : `${error.code}: ${error.message}`); // the close reason already says it
  }
  return parts.length ? ` (${parts.join(" — ")})` : "";
}

function advice(code) {
  if (code === 4001) return "the token is missing, invalid or expired — paste a fresh token and connect.";
  if (code === 4003) return "this origin or channel is forbidden for this token.";
  if (code === 4029) return "too many connections for this user — close another tab.";
  return "see the connection log.";
}

function onLagged(notice) {
  page.counts.dropped += notice.dropped || 0;
  const where = notice.local ? "this page fell behind" : "the node dropped events";
  log("warn", `lagged: ${notice.dropped} event${notice.dropped === 1 ? "" : "s"} dropped (${notice.reason}) — ${where}`);
  renderCounts();
}

function onUnrecovered(channels, patterns) {
  page.counts.unrecovered += channels.length;
  for (const pattern of patterns || []) {
    const entry = page.subscriptions.get(pattern);
    if (entry) entry.status = "unrecovered";
  }
  const text = `recovered: false for ${channels.join(", ")} — history no longer reaches back; events may be missing, resync needed`;
  log("error", text);
  showBanner(text);
  renderChips();
  renderCounts();
}

function onAck(ack, patterns) {
  const recovered = ack.recovered || null;
  for (const pattern of patterns || ack.subscribed || []) {
    const entry = page.subscriptions.get(pattern);
    if (!entry) continue;
    if (recovered && recovered[pattern] === true) {
      entry.status = "recovered";
      page.counts.recovered += 1;
      log("ok", `${pattern}: resumed from cursor — missed events replayed, no gap`);
    } else if (!recovered || recovered[pattern] !== false) {
      entry.status = "live";
    }
  }
  renderChips();
  renderCounts();
}

function onError(error, patterns) {
  const channels = error.channels && error.channels.length ? ` [${error.channels.join(", ")}]` : "";
  log("error", `${error.code}: ${error.message}${channels}`);
  for (const pattern of error.channels || patterns || []) {
    const entry = page.subscriptions.get(pattern);
    if (entry) entry.status = "rejected";
  }
  renderChips();
}

// --- events ----------------------------------------------------------------------------------

function render(event) {
  const data = event.data;
  if (data.id === page.lastRendered) return;
  page.lastRendered = data.id;
  page.counts.events += 1;
  if (data.type === "market.ticker") renderTicker(event);
  else {
    const domain = data.type.split(".")[0];
    const list = domain === "order" ? "orders" : domain === "risk" ? "risk" : "activity";
    addRow(list, event);
  }
  renderCounts();
}

const TAG_LABELS = {
  limit_reached: "limit",
  position_warning: "position",
  insight_generated: "insight",
  analysis_complete: "analysis",
  signal_detected: "signal",
  state_change: "state",
  notification: "notice",
};

function addRow(listId, event) {
  const data = event.data;
  const list = $(listId);
  const row = el("li", "row");
  row.dataset.eventId = data.id;
  row.dataset.type = data.type;
  row.dataset.channel = event.channel;
  const priority = data.priority || "p2";
  row.dataset.priority = priority;
  const [domain, name] = data.type.split(".");
  const head = el("span", "head");
  const key = event.channel.includes(":") ? event.channel.slice(event.channel.indexOf(":") + 1) : null;
  if (listId === "activity") head.append(el("b", "domain", domain));
  if (key) head.append(el("b", "key", key));
  const summary = el("span", "summary");
  summary.append(...summaryParts(data.payload));
  row.append(
    el("span", `tag tag-${name}`, TAG_LABELS[name] || name.replace(/_/g, " ")),
    el("span", `prio prio-${priority}`, priority),
    head,
    el("time", "t", clock(data.timestamp)),
    summary,
  );
  row.title = `${event.channel} · ${data.source} · ${data.id}\n${JSON.stringify(data.payload)}`;
  list.prepend(row);
  while (list.childElementCount > MAX_ROWS) list.lastElementChild.remove();
  $(`n-${listId}`).textContent = String(Number($(`n-${listId}`).textContent) + 1);
}

function summaryParts(payload) {
  if (payload === null || payload === undefined) return [];
  if (typeof payload !== "object") return [el("span", "v", String(payload))];
  const parts = [];
  for (const [key, value] of Object.entries(payload).slice(0, 8)) {
    let shown = value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
    if (shown.length > 60) shown = `${shown.slice(0, 59)}…`;
    const part = el("span", "kv");
    part.append(el("span", "k", key), el("span", "v", shown));
    if (parts.length) parts.push(" "); // a break opportunity between pairs, none inside one
    parts.push(part);
  }
  return parts;
}

function renderTicker(event) {
  const data = event.data;
  const payload = data.payload && typeof data.payload === "object" ? data.payload : { value: data.payload };
  let tile = page.tickers.get(event.channel);
  if (!tile) {
    if (page.tickers.size >= MAX_TICKERS) return;
    const box = $("tickers");
    box.querySelector(".empty")?.remove();
    tile = el("article", "tile");
    tile.dataset.channel = event.channel;
    tile.dataset.updates = "0";
    tile.append(el("h3", "sym", event.channel.split(":")[1] || event.channel), el("div", "px"), el("div", "chg"), el("div", "ba"), el("div", "age"));
    page.tickers.set(event.channel, tile);
    const tiles = [...page.tickers.keys()].sort();
    box.insertBefore(tile, page.tickers.get(tiles[tiles.indexOf(event.channel) + 1]) || null);
    $("n-tickers").textContent = String(page.tickers.size);
  }
  const price = pick(payload, ["price", "last", "lastPrice", "close", "p", "value"]);
  const previous = Number(tile.dataset.price);
  tile.dataset.eventId = data.id;
  tile.dataset.updates = String(Number(tile.dataset.updates) + 1);
  tile.dataset.at = String(data.timestamp);
  tile.querySelector(".px").textContent = price === undefined ? summarize(payload) : formatNumber(price);
  const change = pick(payload, ["changePct", "change24h", "change", "pct"]);
  const chg = tile.querySelector(".chg");
  chg.textContent = change === undefined ? "" : `${Number(change) > 0 ? "+" : ""}${formatNumber(change)}%`;
  chg.className = `chg ${Number(change) > 0 ? "up" : Number(change) < 0 ? "down" : ""}`;
  const bid = pick(payload, ["bid", "b"]);
  const ask = pick(payload, ["ask", "a"]);
  tile.querySelector(".ba").textContent = bid === undefined && ask === undefined ? "" : `${formatNumber(bid ?? "—")} / ${formatNumber(ask ?? "—")}`;
  tile.querySelector(".age").textContent = "now";
  if (price !== undefined && !Number.isNaN(previous) && Number(price) !== previous) {
    tile.classList.remove("flash-up", "flash-down");
    void tile.offsetWidth; // restart the animation
    tile.classList.add(Number(price) > previous ? "flash-up" : "flash-down");
  }
  if (price !== undefined) tile.dataset.price = String(price);
}

function pick(obj, names) {
  for (const name of names) if (obj && obj[name] !== undefined && obj[name] !== null) return obj[name];
  return undefined;
}

function formatNumber(value) {
  const n = Number(value);
  if (!Number.isFinite(n)) return String(value);
  const digits = Math.abs(n) >= 1000 ? 2 : Math.abs(n) >= 1 ? 4 : 6;
  return n.toLocaleString("en-US", { maximumFractionDigits: digits });
}

function summarize(payload) {
  if (payload === null || payload === undefined) return "";
  if (typeof payload !== "object") return String(payload);
  const parts = [];
  for (const [key, value] of Object.entries(payload)) {
    const shown = value !== null && typeof value === "object" ? JSON.stringify(value) : String(value);
    parts.push(`${key}=${shown.length > 40 ? `${shown.slice(0, 39)}…` : shown}`);
    if (parts.length === 6) break;
  }
  return parts.join("  ");
}

const pad = (n, w = 2) => String(n).padStart(w, "0");
function clock(ms) {
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function duration(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  const h = Math.floor(s / 3600);
  return h ? `${h}h${pad(Math.floor((s % 3600) / 60))}m` : `${pad(Math.floor(s / 60))}:${pad(s % 60)}`;
}

function ago(ms) {
  const s = Math.floor(ms / 1000);
  return s < 60 ? `${s}s` : s < 3600 ? `${Math.floor(s / 60)}m` : `${Math.floor(s / 3600)}h`;
}

// --- chrome: chips, counters, log, banner, clocks ---------------------------------------------------

function renderChips() {
  const box = $("channels");
  for (const chip of [...box.querySelectorAll(".chip")]) chip.remove();
  for (const pattern of [...new Set([...PRESETS, ...page.picked])]) {
    const label = el("label", "chip");
    const input = el("input");
    input.type = "checkbox";
    input.value = pattern;
    input.checked = page.picked.includes(pattern);
    input.addEventListener("change", () => setPicked(pattern, input.checked));
    label.dataset.pattern = pattern;
    const entry = page.subscriptions.get(pattern);
    if (entry) label.dataset.status = entry.status;
    label.append(input, el("span", "", pattern));
    box.append(label);
  }
  const subs = $("subscriptions");
  subs.replaceChildren();
  for (const [pattern, entry] of page.subscriptions) {
    const item = el("li", `sub sub-${entry.status}`);
    item.dataset.pattern = pattern;
    item.append(el("span", "pat", pattern), el("span", "st", entry.status));
    subs.append(item);
  }
}

function renderCounts() {
  const client = page.client;
  if (client) page.counts.duplicates = client.stats.duplicates;
  for (const [name, value] of Object.entries(page.counts)) {
    const dd = $(`count-${name}`);
    dd.textContent = value.toLocaleString("en-US");
    dd.toggleAttribute("data-nonzero", value > 0);
  }
}

function log(level, text) {
  const list = $("log");
  const item = el("li", `entry ${level}`);
  item.dataset.level = level;
  item.append(el("time", "t", clock(Date.now())), el("span", "msg", text));
  list.prepend(item);
  while (list.childElementCount > MAX_LOG) list.lastElementChild.remove();
}

function showBanner(text, code) {
  const banner = $("banner");
  banner.textContent = text;
  if (code !== undefined) banner.dataset.code = String(code);
  banner.hidden = false;
}

function hideBanner() {
  const banner = $("banner");
  banner.hidden = true;
  delete banner.dataset.code;
}

function tickClock() {
  const client = page.client;
  const welcome = client && client.state === "connected" ? client.welcome : null;
  $("uptime").textContent = page.connectedAt ? duration(Date.now() - page.connectedAt) : "—";
  const expiry = $("expiry");
  if (welcome && welcome.expiresAt) {
    const left = welcome.expiresAt - Date.now();
    expiry.textContent = left > 0 ? `expires in ${duration(left)}` : "expired";
    expiry.className = left < 60_000 ? "soon" : "";
  } else {
    expiry.textContent = welcome ? "none (anonymous)" : "—";
    expiry.className = "";
  }
  const now = Date.now();
  for (const tile of page.tickers.values()) {
    const age = now - Number(tile.dataset.at);
    tile.querySelector(".age").textContent = age < 1500 ? "now" : `${ago(age)} ago`;
    tile.classList.toggle("stale", age > 30_000);
  }
}

start();
