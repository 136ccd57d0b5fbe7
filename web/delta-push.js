/**
 * delta-push browser client: one resilient WebSocket for the whole app (SPEC §4, §8).
 *
 *     import { DeltaPush } from "/web/delta-push.js";
 *     const push = new DeltaPush({ getToken: () => fetch("/token").then((r) => r.text()) });
 *     const unsubscribe = push.subscribe(["order.*"], (event) => render(event.data));
 *     push.connect();
 *
 * It behaves like the Python `cluster.client.PushClient`: it connects through the
 * router (the same origin's `/ws` unless told otherwise); on any disconnect — a
 * crash, `reconnect` + 1012 from a draining node, a network error — it reconnects
 * with exponential backoff and full jitter, then resubscribes every subscription
 * with the last cursor it saw on it (`options.since`), so the node replays what was
 * missed. Events are deduplicated by id in a bounded window; the token is refreshed
 * before expiry through the async `getToken` callback; `lagged` notices and
 * `recovered: false` acks are surfaced through callbacks.
 *
 * State channels (`market.ticker`, `market.orderbook`) carry a per-channel `seq`; a jump
 * (updates conflated or lost) is reported through `onGap({channel, expected, got})` and
 * the channel's subscriptions are renewed without `since`, so the node sends the latest
 * value again. A subscription may ask for Fossil deltas (`delta: "fossil"`,
 * docs/DELTA.md): the client keeps the last envelope bytes per channel and rebuilds each
 * envelope with `./fossil.js`, so handlers get the same events as on a full
 * subscription; a delta it cannot apply (unknown base, corrupt) is not delivered and is
 * handled like a gap — never a wrong book.
 *
 * Handlers run one at a time, in arrival order; a handler that returns a promise is
 * awaited before the next event is handed out. A browser WebSocket cannot stop
 * reading, so events that arrive while a handler is busy wait in a bounded buffer
 * (`bufferSize`, default 1,000 events). When it is full the client drops, in this
 * order: an older queued `market.ticker` / `market.orderbook` event of the same
 * channel (conflation: only the newest matters), else the oldest event of the
 * lowest priority present (p3, then p2, then p1, then — only when everything
 * waiting is p0 — the oldest p0). Every drop is reported through `onLagged` as
 * `{action: "lagged", dropped, reason: "client_buffer_full" | "client_conflated",
 * local: true}`, coalesced per turn of the event loop. Memory is therefore bounded
 * by `bufferSize` events plus the dedup window of `dedupWindow` ids.
 *
 * The dependency-free ES module needs no build step; `delta-push.d.ts` types it.
 * Tokens are never logged: the client puts the token in the connect URL's `token`
 * query parameter (browsers cannot set headers on a WebSocket) and nowhere else.
 */

import { applyDelta } from "./fossil.js";

export const PRIORITIES = Object.freeze(["p0", "p1", "p2", "p3"]);
const PRIORITY_RANK = { p0: 0, p1: 1, p2: 2, p3: 3 };
const DEFAULT_RANK = 2; // an envelope without priority is p2 (SPEC §2)
const CONFLATED_TYPES = new Set(["market.ticker", "market.orderbook"]);
const DELTA_FORMATS = ["fossil"]; // subscribe options.delta (docs/DELTA.md)
const MAX_ENVELOPE_BYTES = 64 * 1024; // SPEC §2: a rebuilt envelope is never larger
const utf8 = new TextEncoder();
const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

/** Close codes after which retrying cannot help (without a new token, for 4001). */
export const FATAL_CLOSE_CODES = Object.freeze([4001, 4003, 4029]);
export const RECONNECT_CLOSE_CODE = 1012;

export const DEFAULTS = Object.freeze({
  minBackoff: 100, // ms; the nth retry waits uniformly in [0, min(maxBackoff, minBackoff * 2^n)]
  maxBackoff: 10_000,
  dedupWindow: 10_000, // event ids remembered
  bufferSize: 1_000, // events waiting for slow handlers
  refreshBefore: 30_000, // ms before expiresAt to refresh (at most half the lifetime)
  pingInterval: 25_000, // app-level ping (SPEC §4) so a dead network is noticed
  pongTimeout: 10_000, // silence after a ping before the socket is given up
  connectTimeout: 10_000, // from dialling to `welcome`
  reconnectGrace: 2_000, // after `reconnect`, wait this long for the server's close
});

// --- channels and patterns (SPEC §3; mirrors cluster/channels.py) --------------------

const TYPE_RE = /^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$/;
const NAME_RE = /^[a-z][a-z0-9_]*$/;
const KEY_RE = /^[A-Za-z0-9_\-./@]{1,128}$/;
const MAX_PATTERN_LENGTH = 300;

/** `{type, key}` of a channel name such as `market.ticker:BTC/USDT`, or null if invalid. */
export function parseChannel(text) {
  if (typeof text !== "string" || text.length > MAX_PATTERN_LENGTH) return null;
  const colon = text.indexOf(":");
  const type = colon < 0 ? text : text.slice(0, colon);
  if (!TYPE_RE.test(type)) return null;
  if (colon < 0) return { type, key: null };
  const key = text.slice(colon + 1);
  return KEY_RE.test(key) ? { type, key } : null;
}

/** `{typepat, keypat}` of a subscription pattern (keypat "" = no key part); throws TypeError if invalid. */
export function parsePattern(text) {
  if (typeof text !== "string" || !text || text.length > MAX_PATTERN_LENGTH) {
    throw new TypeError("a pattern is a non-empty string of at most 300 characters");
  }
  const colon = text.indexOf(":");
  const typepat = colon < 0 ? text : text.slice(0, colon);
  if (typepat !== "*") {
    const dot = typepat.indexOf(".");
    const domain = typepat.slice(0, dot);
    const name = typepat.slice(dot + 1);
    if (dot < 0 || !NAME_RE.test(domain) || !(name === "*" || NAME_RE.test(name))) {
      throw new TypeError(`invalid type pattern in ${JSON.stringify(text)}: use *, <domain>.* or <domain>.<name>`);
    }
  }
  if (colon < 0) return { typepat, keypat: "" };
  const keypat = text.slice(colon + 1);
  if (keypat !== "*" && !KEY_RE.test(keypat)) {
    throw new TypeError(`invalid key pattern in ${JSON.stringify(text)}: * or 1-128 of [A-Za-z0-9_-./@]`);
  }
  return { typepat, keypat };
}

/** Whether a parsed pattern matches a parsed channel (same rule as the node). */
export function patternMatches(pattern, channel) {
  const { typepat, keypat } = pattern;
  const typeOk = typepat === "*" || typepat === channel.type || typepat === channel.type.split(".")[0] + ".*";
  if (!typeOk) return false;
  if (keypat === "") return true; // no key part: the type with any key or none
  return channel.key !== null && (keypat === "*" || keypat === channel.key);
}

// --- reconnect delay, dedup window, bounded buffer ----------------------------------

/** Full jitter: uniform in [0, min(max, min * 2^attempt)] ms (AWS "exponential backoff and jitter"). */
export function backoffDelay(attempt, minBackoff = DEFAULTS.minBackoff, maxBackoff = DEFAULTS.maxBackoff, random = Math.random) {
  return random() * Math.min(maxBackoff, minBackoff * 2 ** attempt);
}

/** The last `size` event ids seen; `add` says whether an id is new. */
export class DedupWindow {
  constructor(size = DEFAULTS.dedupWindow) {
    this.size = size;
    this._ids = new Set(); // insertion-ordered: the first is the oldest
  }

  /** True if `id` was not seen in the window (and remembers it). */
  add(id) {
    if (this._ids.has(id)) return false;
    this._ids.add(id);
    if (this._ids.size > this.size) this._ids.delete(this._ids.values().next().value);
    return true;
  }

  has(id) {
    return this._ids.has(id);
  }

  get length() {
    return this._ids.size;
  }
}

/**
 * Events waiting for the application's handlers, at most `capacity` of them.
 * `push` returns `null` or the one event it dropped to make room, with the reason.
 */
export class EventBuffer {
  constructor(capacity = DEFAULTS.bufferSize) {
    if (!(capacity >= 1)) throw new RangeError("bufferSize must be at least 1");
    this.capacity = capacity;
    this._items = [];
  }

  get length() {
    return this._items.length;
  }

  shift() {
    return this._items.shift();
  }

  clear() {
    this._items.length = 0;
  }

  push(item) {
    const items = this._items;
    if (items.length < this.capacity) {
      items.push(item);
      return null;
    }
    if (item.conflate) {
      for (let i = items.length - 1; i >= 0; i--) {
        if (items[i].channel === item.channel) {
          const [old] = items.splice(i, 1);
          items.push(item);
          return { item: old, reason: "client_conflated" };
        }
      }
    }
    let victim = -1;
    let lowest = item.rank;
    for (let i = 0; i < items.length; i++) {
      if (items[i].rank > lowest || (victim < 0 && items[i].rank === lowest)) {
        victim = i;
        lowest = items[i].rank;
      }
    }
    if (victim < 0) return { item, reason: "client_buffer_full" }; // the newcomer is the least important
    const [old] = items.splice(victim, 1);
    items.push(item);
    return { item: old, reason: "client_buffer_full" };
  }
}

// --- the client ------------------------------------------------------------------------

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc || !loc.host) throw new TypeError("url is required outside a browser page");
  return `${loc.protocol === "https:" ? "wss:" : "ws:"}//${loc.host}/ws`;
}

function withToken(url, token) {
  if (!token) return url;
  return `${url}${url.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}`;
}

let clientCount = 0;

/** One connection to a delta-push cluster, shared by every subscription of the app. */
export class DeltaPush {
  constructor(options = {}) {
    this.options = { ...DEFAULTS, ...options };
    this.url = options.url || defaultUrl();
    this._token = options.token || null;
    this._getToken = options.getToken || null;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") throw new TypeError("no WebSocket implementation: pass options.WebSocket");
    this._random = options.random || Math.random;
    this._listeners = new Map();
    for (const [name, option] of [
      ["state", "onState"],
      ["lagged", "onLagged"],
      ["unrecovered", "onUnrecovered"],
      ["error", "onError"],
      ["welcome", "onWelcome"],
      ["handlerError", "onHandlerError"],
      ["gap", "onGap"],
    ]) {
      if (typeof options[option] === "function") this.on(name, options[option]);
    }
    this.state = "idle";
    this.welcome = null; // the current connection's welcome message
    this.connects = 0; // welcomes received
    this.closeInfo = null; // {code, reason, error} of the last ended connection
    this.fatal = null; // closeInfo when the client gave up (4001 without getToken, 4003, 4029)
    this.stats = { events: 0, duplicates: 0, dropped: 0, serverDropped: 0 };
    this._subscriptions = [];
    this._lastSeq = new Map(); // state channel -> seq of the last event seen on this connection
    this._bases = new Map(); // delta channel -> {seq, bytes} of its last event: the next delta's base
    this._resyncing = new Map(); // channel -> id of the resubscribe it waits for after an unusable delta
    this._seen = new DedupWindow(this.options.dedupWindow);
    this._buffer = new EventBuffer(this.options.bufferSize);
    this._delivering = false;
    this._pendingDrops = null; // {reason: count}, flushed as local lagged notices
    this._ids = 0;
    this._prefix = `c${++clientCount}-`;
    this._ws = null;
    this._welcomed = false;
    this._failures = 0;
    this._closing = true; // until connect()
    this._generation = 0; // bumped by connect() and close(): an older _open() in flight gives up
    this._timers = { retry: null, connect: null, refresh: null, ping: null, grace: null };
    this._lastError = null;
    this._lastSeen = 0;
    this._onOnline = () => {
      if (this.state === "disconnected") this._retryNow();
    };
  }

  // --- public API ------------------------------------------------------------------

  /** Start connecting (again after close()); returns the client. */
  connect() {
    if (!this._closing) return this;
    this._closing = false;
    this._generation += 1;
    this.fatal = null;
    this._failures = 0;
    globalThis.addEventListener?.("online", this._onOnline);
    this._open();
    return this;
  }

  /** Close (1000) and stop reconnecting; subscriptions stay and resume on connect(). */
  close() {
    this._closing = true;
    this._generation += 1;
    globalThis.removeEventListener?.("online", this._onOnline);
    this._clearTimer("retry");
    const ws = this._ws;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, "client closed");
      } catch {
        // already closing
      }
      this._ended(ws, { code: 1000, reason: "client closed", error: null });
    }
    this._setState("closed", { code: 1000, reason: "client closed" });
  }

  /**
   * Receive events on `patterns` until the returned function is called.
   * `options.priority`: only events of that priority or higher; `options.limit`: events per
   * second for these patterns (both enforced by the node); `options.since`: a cursor to resume from;
   * `options.onUnrecovered(channels)`: this subscription's `recovered: false`;
   * `options.snapshot`: state channels' latest values right after the ack (`true`) or not (`false`),
   * without it the node's default, which is on (`PUSH_SNAPSHOT_BY_DEFAULT`);
   * `options.delta: "fossil"`: state channels' events may come as deltas (handlers still get whole envelopes).
   */
  subscribe(patterns, handler, options = {}) {
    const list = typeof patterns === "string" ? [patterns] : [...patterns];
    if (!list.length) throw new TypeError("subscribe needs at least one pattern");
    if (typeof handler !== "function") throw new TypeError("subscribe needs a handler function");
    const { priority = null, limit = null, since = null, onUnrecovered = null, snapshot = null, delta = null } = options;
    if (priority !== null && !(priority in PRIORITY_RANK)) throw new TypeError("priority must be one of p0..p3");
    if (limit !== null && !(typeof limit === "number" && limit > 0)) throw new TypeError("limit must be a positive number");
    if (snapshot !== null && typeof snapshot !== "boolean") throw new TypeError("snapshot must be true or false");
    if (delta !== null && !DELTA_FORMATS.includes(delta)) throw new TypeError('delta must be "fossil"');
    const subscription = {
      patterns: list,
      parsed: list.map(parsePattern),
      handler,
      priority,
      rank: priority === null ? 3 : PRIORITY_RANK[priority],
      limit,
      snapshot,
      delta,
      cursor: since,
      onUnrecovered,
      requestId: null,
      acked: false,
      active: true,
    };
    this._subscriptions.push(subscription);
    if (this._welcomed) this._sendSubscribe(subscription);
    return () => this._unsubscribe(subscription);
  }

  /** Listen to "state", "lagged", "unrecovered", "gap", "error", "welcome", "ack", "handlerError"; returns an off function. */
  on(name, listener) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(listener);
    return () => this._listeners.get(name)?.delete(listener);
  }

  /** The subscriptions as the app made them (patterns, options and last cursor), for display. */
  get subscriptions() {
    return this._subscriptions.map(({ patterns, priority, limit, snapshot, delta, cursor, acked }) => ({
      patterns,
      priority,
      limit,
      snapshot,
      delta,
      cursor,
      acked,
    }));
  }

  /** Events waiting for a handler. */
  get buffered() {
    return this._buffer.length;
  }

  // --- connection lifecycle ------------------------------------------------------------

  async _open() {
    const generation = this._generation;
    this._setState("connecting", { attempt: this._failures });
    let token = this._token;
    if (this._getToken) {
      try {
        token = await this._getToken();
        this._token = token;
      } catch (error) {
        if (generation !== this._generation) return;
        this._emit("error", { action: "error", code: "TOKEN_SOURCE", message: `getToken failed: ${error?.message ?? error}`, local: true });
        this._scheduleRetry({ code: null, reason: "getToken failed", error: null });
        return;
      }
    }
    if (generation !== this._generation || this._ws) return; // closed, reconnected or already open meanwhile
    let ws;
    try {
      ws = new this._WebSocket(withToken(this.url, token));
    } catch (error) {
      this._scheduleRetry({ code: null, reason: `cannot open: ${error?.message ?? error}`, error: null });
      return;
    }
    this._ws = ws;
    this._welcomed = false;
    this._lastError = null;
    this._lastSeen = Date.now();
    ws.onmessage = (message) => this._onMessage(ws, message);
    ws.onclose = (event) => this._ended(ws, { code: event.code, reason: event.reason || "", error: this._lastError });
    ws.onerror = () => {}; // always followed by close, which carries what can be known
    this._startTimer("connect", this.options.connectTimeout, () => this._abandon(ws, "connect timeout"));
  }

  /** Give up on a socket that stopped answering; reconnect as if it had closed. */
  _abandon(ws, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    try {
      ws.close(1000, reason);
    } catch {
      // already closing
    }
    this._ended(ws, { code: null, reason, error: this._lastError });
  }

  _detach(ws) {
    ws.onmessage = ws.onclose = ws.onerror = null;
  }

  _ended(ws, info) {
    if (ws !== this._ws) return;
    this._ws = null;
    this._welcomed = false;
    for (const name of ["connect", "refresh", "ping", "grace"]) this._clearTimer(name);
    this.closeInfo = info;
    if (this._closing) return;
    const tokenCanChange = info.code === 4001 && this._getToken;
    if (FATAL_CLOSE_CODES.includes(info.code) && !tokenCanChange) {
      this._closing = true;
      this.fatal = info;
      globalThis.removeEventListener?.("online", this._onOnline);
      this._setState("closed", { ...info, fatal: true });
      return;
    }
    this._scheduleRetry(info);
  }

  _scheduleRetry(info) {
    this._failures += 1;
    const delay = backoffDelay(this._failures, this.options.minBackoff, this.options.maxBackoff, this._random);
    this._setState("disconnected", { ...info, retryIn: Math.round(delay), attempt: this._failures });
    this._startTimer("retry", delay, () => this._open());
  }

  _retryNow() {
    this._clearTimer("retry");
    this._open();
  }

  // --- messages -----------------------------------------------------------------------------

  _onMessage(ws, message) {
    if (ws !== this._ws) return;
    this._lastSeen = Date.now();
    if (typeof message.data !== "string") return; // the protocol is text frames only
    let doc;
    try {
      doc = JSON.parse(message.data);
    } catch {
      return;
    }
    switch (doc?.action) {
      case "event":
        return this._onEvent(doc);
      case "welcome":
        return this._onWelcome(doc);
      case "ack":
        return this._onAck(doc);
      case "lagged":
        this.stats.serverDropped += doc.dropped || 0;
        return this._emit("lagged", doc);
      case "error":
        this._lastError = doc;
        return this._emit("error", doc, this._subscriptions.find((s) => s.requestId === doc.id && doc.id != null)?.patterns ?? null);
      case "authenticated":
        this._scheduleRefresh(doc.expiresAt);
        return this._emit("authenticated", doc);
      case "reconnect":
        this._setState("reconnecting", { reason: doc.reason || "" });
        // the node closes with 1012 next; if it does not, do not wait for it forever
        this._startTimer("grace", this.options.reconnectGrace, () => this._abandon(ws, "reconnect requested"));
        return undefined;
      default:
        return undefined; // pong, or an action from a newer server
    }
  }

  _onWelcome(doc) {
    this._clearTimer("connect");
    this.welcome = doc;
    this._welcomed = true;
    this._failures = 0;
    this.connects += 1;
    // a new connection: the replays and snapshots of the resubscribe set new baselines, and every delta chain starts full
    this._lastSeq.clear();
    this._bases.clear();
    this._resyncing.clear();
    this._setState("connected", { node: doc.node, userId: doc.userId ?? null, expiresAt: doc.expiresAt ?? null });
    this._emit("welcome", doc);
    for (const subscription of this._subscriptions) this._sendSubscribe(subscription);
    this._scheduleRefresh(doc.expiresAt);
    this._startPing();
  }

  _onAck(doc) {
    for (const [channel, requestId] of this._resyncing) {
      if (requestId === doc.id) this._resyncing.delete(channel); // what follows is the fresh snapshot
    }
    const subscription = this._subscriptions.find((s) => s.requestId === doc.id && doc.id != null);
    this._emit("ack", doc, subscription?.patterns ?? null);
    if (!subscription) return;
    const lost = Object.entries(doc.recovered || {})
      .filter(([, ok]) => !ok)
      .map(([channel]) => channel);
    if (subscription.cursor === null || lost.length) subscription.cursor = doc.cursor || subscription.cursor;
    subscription.acked = true;
    if (lost.length) {
      this._emit("unrecovered", lost, subscription.patterns);
      if (subscription.onUnrecovered) this._call(subscription.onUnrecovered, lost);
    }
  }

  _onEvent(doc) {
    const channel = parseChannel(doc.channel);
    if (!channel) return;
    const targets = this._subscriptions.filter((s) => s.parsed.some((p) => patternMatches(p, channel)));
    let event = doc;
    if (typeof doc.data === "string") {
      // a delta channel: data is the envelope's exact text, or a Fossil delta from the previous one
      const envelope = this._rebuild(doc, targets);
      if (!envelope) return;
      const { delta: _delta, ...rest } = doc;
      event = { ...rest, data: envelope }; // what a full subscriber gets: no `delta`, data an object
    }
    const data = event.data;
    if (!data || typeof data !== "object") return;
    if (doc.cursor) for (const subscription of targets) subscription.cursor = doc.cursor;
    if (Number.isInteger(doc.seq)) this._checkSequence(doc.channel, doc.seq, targets);
    if (typeof data.id === "string" && !this._seen.add(data.id)) {
      this.stats.duplicates += 1;
      return;
    }
    this.stats.events += 1;
    const rank = data.priority in PRIORITY_RANK ? PRIORITY_RANK[data.priority] : DEFAULT_RANK;
    const dropped = this._buffer.push({ event, channel: doc.channel, parsed: channel, rank, conflate: CONFLATED_TYPES.has(channel.type) });
    if (dropped) this._dropped(dropped.reason);
    this._deliver();
  }

  /**
   * The envelope of a delta channel's event, or null when it cannot be trusted. A full event
   * replaces the channel's base; a delta is applied only to the base of `seq - 1`, and Fossil's
   * length and checksum checks refuse a corrupt one. Anything else — no base, another seq, a
   * corrupt delta — is not delivered: the base is forgotten and the channel resubscribed
   * (reported as a gap), so the application never sees a book built on the wrong bytes.
   */
  _rebuild(doc, targets) {
    const { channel, seq } = doc;
    const base = this._bases.get(channel);
    this._bases.delete(channel);
    let bytes;
    let envelope;
    try {
      if (doc.delta !== true) bytes = utf8.encode(doc.data);
      else if (!base || !Number.isInteger(seq) || base.seq !== seq - 1) throw new Error("the delta's base is not the last event received");
      else bytes = applyDelta(base.bytes, utf8.encode(doc.data), { maxSize: MAX_ENVELOPE_BYTES });
      envelope = JSON.parse(strictUtf8.decode(bytes));
      if (!envelope || typeof envelope !== "object" || Array.isArray(envelope)) throw new Error("the envelope is not a JSON object");
    } catch {
      if (!this._resyncing.has(channel)) {
        // else: sent before the node read our resubscribe; the fresh snapshot follows its ack
        const last = this._lastSeq.get(channel);
        const got = Number.isInteger(seq) ? seq : 0;
        this._gap(channel, last === undefined ? got : last + 1, got, targets);
      }
      return null;
    }
    this._bases.set(channel, { seq: Number.isInteger(seq) ? seq : null, bytes });
    if (doc.delta !== true) this._resyncing.delete(channel); // a full event: the chain starts again here
    return envelope;
  }

  /**
   * A state channel's seq grows by one; a jump means missed updates (conflated, dropped, lost
   * on the bus): the state is stale. A seq at or below the last one is a replay: ignored.
   */
  _checkSequence(channel, seq, targets) {
    const last = this._lastSeq.get(channel);
    if (last === undefined || seq === last + 1) {
      this._lastSeq.set(channel, seq);
      return;
    }
    if (seq <= last) return;
    this._gap(channel, last + 1, seq, targets);
  }

  /** Tell the app, and renew the channel's subscriptions without `since`, with `snapshot`: the latest value follows the ack. */
  _gap(channel, expected, got, targets) {
    this._lastSeq.delete(channel); // the snapshot after the resubscribe sets the next baseline
    this._emit("gap", { channel, expected, got });
    if (!targets.length || !this._welcomed) return;
    const channels = [...new Set(targets.flatMap((s) => s.patterns))];
    this._send({ action: "unsubscribe", channels, id: this._nextId() });
    for (const subscription of targets) {
      subscription.cursor = null; // a fresh snapshot, not a replay of what was skipped
      this._sendSubscribe(subscription, true);
    }
    this._resyncing.set(channel, targets[targets.length - 1].requestId);
  }

  /** Hand buffered events to handlers, one at a time; async handlers are awaited. */
  async _deliver() {
    if (this._delivering) return;
    this._delivering = true;
    try {
      while (this._buffer.length) {
        const { event, parsed, rank } = this._buffer.shift();
        for (const subscription of this._subscriptions.slice()) {
          if (!subscription.active || rank > subscription.rank) continue;
          if (!subscription.parsed.some((p) => patternMatches(p, parsed))) continue;
          try {
            const result = subscription.handler(event);
            if (result && typeof result.then === "function") await result;
          } catch (error) {
            this._emit("handlerError", error, event);
          }
        }
      }
    } finally {
      this._delivering = false;
    }
  }

  _dropped(reason) {
    this.stats.dropped += 1;
    if (this._pendingDrops) {
      this._pendingDrops[reason] = (this._pendingDrops[reason] || 0) + 1;
      return;
    }
    this._pendingDrops = { [reason]: 1 };
    queueMicrotask(() => {
      const drops = this._pendingDrops;
      this._pendingDrops = null;
      for (const [why, count] of Object.entries(drops)) {
        this._emit("lagged", { action: "lagged", dropped: count, reason: why, local: true });
      }
    });
  }

  // --- sending --------------------------------------------------------------------------

  _send(doc) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(doc));
    return true;
  }

  _nextId() {
    this._ids += 1;
    return `${this._prefix}${this._ids}`;
  }

  /** `resync`: after a gap, ask for the latest values explicitly (unless the subscription turned snapshots off). */
  _sendSubscribe(subscription, resync = false) {
    subscription.requestId = this._nextId();
    subscription.acked = false;
    const options = {};
    if (subscription.priority) options.priority = subscription.priority;
    if (subscription.limit) options.limit = subscription.limit;
    if (subscription.cursor) options.since = subscription.cursor;
    if (subscription.snapshot !== null) options.snapshot = subscription.snapshot;
    else if (resync) options.snapshot = true; // the node's default may be no snapshot (PUSH_SNAPSHOT_BY_DEFAULT)
    if (subscription.delta) options.delta = subscription.delta;
    const message = { action: "subscribe", channels: subscription.patterns, id: subscription.requestId };
    if (Object.keys(options).length) message.options = options;
    this._send(message);
  }

  _unsubscribe(subscription) {
    if (!subscription.active) return;
    subscription.active = false;
    this._subscriptions = this._subscriptions.filter((s) => s !== subscription);
    // a pattern another subscription still uses stays subscribed on the node
    const inUse = new Set(this._subscriptions.flatMap((s) => s.patterns));
    const channels = subscription.patterns.filter((p) => !inUse.has(p));
    if (channels.length && this._welcomed) this._send({ action: "unsubscribe", channels, id: this._nextId() });
  }

  // --- token refresh and heartbeat ---------------------------------------------------------

  _scheduleRefresh(expiresAt) {
    this._clearTimer("refresh");
    if (!this._getToken || !expiresAt) return;
    const remaining = Math.max(0, expiresAt - Date.now());
    const delay = remaining - Math.min(this.options.refreshBefore, remaining / 2);
    const ws = this._ws;
    this._startTimer("refresh", delay, async () => {
      let token;
      try {
        token = await this._getToken();
      } catch (error) {
        this._emit("error", { action: "error", code: "TOKEN_SOURCE", message: `getToken failed: ${error?.message ?? error}`, local: true });
        return; // at expiry the node closes 4001 and the reconnect asks getToken again
      }
      if (ws !== this._ws || !token) return;
      this._token = token;
      this._send({ action: "auth", token, id: this._nextId() });
    });
  }

  _startPing() {
    const { pingInterval, pongTimeout } = this.options;
    if (!pingInterval) return;
    const ws = this._ws;
    this._clearTimer("ping");
    this._timers.ping = setInterval(() => {
      if (Date.now() - this._lastSeen > pingInterval + pongTimeout) this._abandon(ws, "no answer to ping");
      else this._send({ action: "ping" });
    }, pingInterval);
  }

  // --- plumbing ---------------------------------------------------------------------------

  _startTimer(name, delay, callback) {
    this._clearTimer(name);
    this._timers[name] = setTimeout(() => {
      this._timers[name] = null;
      callback();
    }, Math.max(0, delay));
  }

  _clearTimer(name) {
    const timer = this._timers[name];
    if (timer !== null) {
      clearTimeout(timer); // also clears intervals
      this._timers[name] = null;
    }
  }

  _setState(state, detail = {}) {
    if (state === this.state && state !== "disconnected") return;
    const previous = this.state;
    this.state = state;
    this._emit("state", state, { previous, ...detail });
  }

  _emit(name, ...args) {
    const listeners = this._listeners.get(name);
    if (!listeners) return;
    for (const listener of [...listeners]) this._call(listener, ...args);
  }

  _call(listener, ...args) {
    try {
      const result = listener(...args);
      if (result && typeof result.catch === "function") result.catch((error) => console.error("delta-push: listener failed", error));
    } catch (error) {
      console.error("delta-push: listener failed", error);
    }
  }
}

/** `new DeltaPush(options)`; call `connect()` on the result. */
export function createClient(options) {
  return new DeltaPush(options);
}
