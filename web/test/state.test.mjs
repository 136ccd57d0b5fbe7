// State channels (issue 15): seq gaps and resubscribes, the snapshot and delta options, and
// Fossil delta frames (docs/DELTA.md) rebuilt into the same events a full subscriber gets.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { DeltaPush } from "../delta-push.js";
import { checksum } from "../fossil.js";
import { eventFrame, fakeWebSocketClass, waitFor } from "./fake-websocket.mjs";

const FIXTURES = JSON.parse(readFileSync(new URL("../../tests/fixtures/fossil_delta.json", import.meta.url), "utf8"));
const BOOK = "market.orderbook:BTC/USDT";
const text = (b64) => Buffer.from(b64, "base64").toString("utf8"); // the books and their deltas are UTF-8 (ASCII)
const bytes = (b64) => new Uint8Array(Buffer.from(b64, "base64"));
// (source, target, delta) of 50-level order books, deltas made by npm fossil-delta and by cluster/fossil.py
const PAIRS = ["npm", "python"].flatMap((kind) =>
  FIXTURES[kind].filter((c) => c.name.startsWith("order book")).map((c) => ({ ...c, name: `${kind} ${c.name}` })),
);

function connected(options = {}) {
  const WebSocket = fakeWebSocketClass();
  const gaps = [];
  const push = new DeltaPush({
    url: "ws://router.test/ws",
    WebSocket,
    minBackoff: 1,
    maxBackoff: 4,
    pingInterval: 0,
    onGap: (gap) => gaps.push(gap),
    ...options,
  });
  push.connect();
  WebSocket.instances[0].accept();
  return { push, gaps, sockets: WebSocket.instances, socket: WebSocket.instances[0] };
}

function stateFrame(channel, seq, extra = {}) {
  return { ...eventFrame(channel, extra), seq };
}

function full(envelopeText, seq, channel = BOOK) {
  return { action: "event", channel, delta: false, data: envelopeText, cursor: `e:${seq}`, seq };
}

function delta(deltaText, seq, channel = BOOK) {
  return { action: "event", channel, delta: true, data: deltaText, cursor: `e:${seq}`, seq };
}

/** The event a subscriber without deltas gets for the same envelope. */
function asFullSubscriberSeesIt(envelopeText, seq, channel = BOOK) {
  return { action: "event", channel, data: JSON.parse(envelopeText), cursor: `e:${seq}`, seq };
}

/** The resubscribe a gap causes: an unsubscribe then a subscribe (after `from` messages sent before). */
function resubscribeAfter(socket, from) {
  const sent = socket.sent.slice(from);
  assert.deepEqual(
    sent.map((m) => m.action),
    ["unsubscribe", "subscribe"],
  );
  return sent[1];
}

// --- sequence numbers --------------------------------------------------------------------

test("a seq jump calls onGap and resubscribes the matching subscriptions without since", () => {
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe(["market.ticker:*"], (e) => seen.push(e.seq), { limit: 5 });
  push.subscribe(["market.trades"], () => {});
  socket.ackAll({ cursor: "e:0" });
  for (const seq of [1, 2, 3]) socket.receive(stateFrame("market.ticker:BTC/USDT", seq));
  const before = socket.sent.length;
  socket.receive(stateFrame("market.ticker:BTC/USDT", 6)); // 4 and 5 conflated away
  assert.deepEqual(gaps, [{ channel: "market.ticker:BTC/USDT", expected: 4, got: 6 }]);
  const again = resubscribeAfter(socket, before);
  assert.deepEqual(socket.sent[before].channels, ["market.ticker:*"]);
  assert.deepEqual(again.channels, ["market.ticker:*"]);
  assert.deepEqual(again.options, { limit: 5, snapshot: true }, "no since: the latest value, not a replay");
  assert.deepEqual(seen, [1, 2, 3, 6], "a full event is delivered even after a gap");
  push.close();
});

test("a seq at or below the last one is ignored, and other channels keep their own count", () => {
  const { push, gaps, socket } = connected();
  push.subscribe(["market.ticker"], () => {});
  for (const seq of [1, 2, 2, 1, 3]) socket.receive(stateFrame("market.ticker:A/B", seq));
  for (const seq of [7, 8]) socket.receive(stateFrame("market.ticker:C/D", seq));
  socket.receive(eventFrame("market.ticker:E/F")); // no seq: not counted
  assert.deepEqual(gaps, []);
  push.close();
});

test("after a gap the next event sets the baseline: one onGap per gap", () => {
  const { push, gaps, socket } = connected();
  push.subscribe(["market.ticker"], () => {});
  for (const seq of [1, 5, 6, 7, 9]) socket.receive(stateFrame("market.ticker:A/B", seq));
  assert.deepEqual(
    gaps.map((g) => [g.expected, g.got]),
    [
      [2, 5],
      [8, 9],
    ],
  );
  push.close();
});

test("a subscription that turned snapshots off keeps them off when a gap renews it", () => {
  const { push, socket } = connected();
  push.subscribe(["market.ticker:A/B"], () => {}, { snapshot: false });
  for (const seq of [1, 3]) socket.receive(stateFrame("market.ticker:A/B", seq));
  const [first, again] = socket.sentActions("subscribe");
  assert.deepEqual([first.options, again.options], [{ snapshot: false }, { snapshot: false }]);
  push.close();
});

test("baselines reset on each welcome", async () => {
  const { push, gaps, sockets, socket } = connected();
  push.subscribe(["market.ticker:A/B"], () => {});
  for (const seq of [1, 2]) socket.receive(stateFrame("market.ticker:A/B", seq));
  socket.serverClose(1012);
  await waitFor(() => sockets.length === 2, 1000, "the reconnect");
  sockets[1].accept();
  sockets[1].receive(stateFrame("market.ticker:A/B", 9)); // the snapshot of the new connection
  sockets[1].receive(stateFrame("market.ticker:A/B", 10));
  assert.deepEqual(gaps, []);
  push.close();
});

// --- options ------------------------------------------------------------------------------

test("snapshot and delta options are sent with the subscribe, and checked", () => {
  const { push, socket } = connected();
  push.subscribe([BOOK], () => {}, { snapshot: false, delta: "fossil", priority: "p1" });
  push.subscribe(["market.ticker"], () => {}, { snapshot: true });
  push.subscribe(["order.*"], () => {});
  const [book, ticker, orders] = socket.sentActions("subscribe");
  assert.deepEqual(book.options, { priority: "p1", snapshot: false, delta: "fossil" });
  assert.deepEqual(ticker.options, { snapshot: true });
  assert.equal(orders.options, undefined);
  assert.deepEqual(
    push.subscriptions.map((s) => [s.snapshot, s.delta]),
    [
      [false, "fossil"],
      [true, null],
      [null, null],
    ],
  );
  for (const bad of [{ delta: "Fossil" }, { delta: "zstd" }, { delta: true }, { snapshot: 0 }, { snapshot: "false" }]) {
    assert.throws(() => push.subscribe([BOOK], () => {}, bad), TypeError, JSON.stringify(bad));
  }
  push.close();
});

// --- delta frames -----------------------------------------------------------------------------

test("delta frames rebuild every fixture book byte for byte, and handlers get what a full subscriber gets", () => {
  assert.ok(PAIRS.length >= 12);
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e), { delta: "fossil" });
  socket.ackAll();
  let seq = 0;
  const expected = [];
  for (const pair of PAIRS) {
    socket.receive(full(text(pair.source), ++seq)); // the node's full event (after a drop, say) restarts the chain
    expected.push(asFullSubscriberSeesIt(text(pair.source), seq));
    socket.receive(delta(text(pair.delta), ++seq));
    expected.push(asFullSubscriberSeesIt(text(pair.target), seq));
    assert.deepEqual(push._bases.get(BOOK), { seq, bytes: bytes(pair.target) }, `${pair.name}: the exact bytes`);
  }
  assert.deepEqual(gaps, []);
  // ids repeat between the npm and python fixtures (same books): dedup delivers each envelope once
  const unique = expected.filter((e, i) => expected.findIndex((f) => f.data.id === e.data.id) === i);
  assert.deepEqual(seen, unique);
  assert.ok(seen.every((e) => !("delta" in e)));
  push.close();
});

/** A correct (if naive) Fossil delta: the common prefix and suffix copied, the middle inserted. */
function naiveDelta(sourceText, targetText) {
  const digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";
  const n = (value) => {
    let out = "";
    do {
      out = digits[value % 64] + out;
      value = Math.floor(value / 64);
    } while (value);
    return out;
  };
  const [source, target] = [sourceText, targetText].map((t) => new TextEncoder().encode(t));
  const continuation = (byte) => (byte & 0xc0) === 0x80; // never split a UTF-8 character: the literal must be text
  let prefix = 0;
  while (prefix < source.length && prefix < target.length && source[prefix] === target[prefix]) prefix++;
  while (prefix > 0 && prefix < target.length && continuation(target[prefix])) prefix--;
  let suffix = 0;
  const room = Math.min(source.length, target.length) - prefix;
  while (suffix < room && source[source.length - 1 - suffix] === target[target.length - 1 - suffix]) suffix++;
  while (suffix > 0 && continuation(target[target.length - suffix])) suffix--;
  const middle = target.subarray(prefix, target.length - suffix);
  let out = `${n(target.length)}\n`;
  if (prefix) out += `${n(prefix)}@0,`;
  if (middle.length) out += `${n(middle.length)}:${new TextDecoder().decode(middle)}`; // a count of bytes
  if (suffix) out += `${n(suffix)}@${n(source.length - suffix)},`;
  return `${out}${n(checksum(target))};`;
}

test("a chain of deltas on one channel: each applies to the envelope the previous one rebuilt", () => {
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e), { delta: "fossil" });
  const envelopes = [text(PAIRS[0].source)];
  for (let i = 1; i < 8; i++) {
    const book = JSON.parse(envelopes[i - 1]);
    book.id = `00000000-0000-4000-8000-${String(i).padStart(12, "0")}`;
    book.payload.bids[i][1] = `${i}.00000000`; // a level changed, as a real update
    book.payload.sequence += 1;
    envelopes.push(JSON.stringify(book));
  }
  socket.receive(full(envelopes[0], 41));
  for (let i = 1; i < envelopes.length; i++) {
    socket.receive(delta(naiveDelta(envelopes[i - 1], envelopes[i]), 41 + i));
    assert.equal(new TextDecoder().decode(push._bases.get(BOOK).bytes), envelopes[i], "the exact bytes");
  }
  assert.deepEqual(
    seen,
    envelopes.map((e, i) => asFullSubscriberSeesIt(e, 41 + i)),
  );
  assert.deepEqual(gaps, []);
  push.close();
});

test("random envelopes with any Unicode come back byte for byte through delta frames", () => {
  let state = 15;
  const random = () => ((state = (state * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const alphabet = ["a", "Z", "0", " ", '"', "\\", "\n", "é", "€", "ордер", "🚀", "\u0000", "\u2028", "𝄞"];
  const word = () => Array.from({ length: Math.floor(random() * 12) }, () => alphabet[Math.floor(random() * alphabet.length)]).join("");
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e), { delta: "fossil" });
  let previous = JSON.stringify({ id: "r0", type: "market.orderbook", payload: { [word()]: word() } });
  socket.receive(full(previous, 1));
  for (let seq = 2; seq < 200; seq++) {
    const book = JSON.parse(previous);
    book.id = `r${seq}`;
    book.payload[word()] = random() < 0.5 ? word() : [word(), Math.floor(random() * 1e6)];
    if (random() < 0.3) delete book.payload[Object.keys(book.payload)[0]];
    const next = JSON.stringify(book);
    socket.receive(delta(naiveDelta(previous, next), seq));
    assert.deepEqual(push._bases.get(BOOK).bytes, new TextEncoder().encode(next), `seq ${seq}`);
    assert.deepEqual(seen.at(-1), asFullSubscriberSeesIt(next, seq));
    previous = next;
  }
  assert.deepEqual(gaps, []);
  assert.equal(seen.length, 199);
  push.close();
});

test("a delta that would build more than 64 KiB is refused", () => {
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e), { delta: "fossil" });
  const small = JSON.stringify({ id: "s", type: "market.orderbook", payload: "x" });
  const big = JSON.stringify({ id: "b", type: "market.orderbook", payload: "x".repeat(70_000) });
  socket.receive(full(small, 1));
  socket.receive(delta(naiveDelta(small, big), 2));
  assert.equal(seen.length, 1);
  assert.deepEqual(gaps, [{ channel: BOOK, expected: 2, got: 2 }]);
  push.close();
});

function corrupted(deltaText) {
  const at = deltaText.indexOf(":") + 5; // inside the first literal: same length, wrong checksum
  return deltaText.slice(0, at) + (deltaText[at] === "0" ? "1" : "0") + deltaText.slice(at + 1);
}

test("a corrupt delta is not delivered: onGap, the base forgotten, one resubscribe, then the snapshot", () => {
  const [a, b] = PAIRS.filter((p) => p.name.startsWith("python order book"));
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e.seq), { delta: "fossil" });
  socket.ackAll();
  socket.receive(full(text(a.source), 1));
  const before = socket.sent.length;
  socket.receive(delta(corrupted(text(a.delta)), 2));
  assert.deepEqual(gaps, [{ channel: BOOK, expected: 2, got: 2 }], "the event expected came but could not be used");
  assert.equal(push._bases.has(BOOK), false);
  const again = resubscribeAfter(socket, before);
  assert.deepEqual(again.options, { snapshot: true, delta: "fossil" });
  // sent by the node before it read the resubscribe: no base, dropped without another gap
  socket.receive(delta(text(a.delta), 3));
  assert.equal(gaps.length, 1);
  assert.equal(socket.sent.length, before + 2);
  socket.ackAll();
  socket.receive(full(text(b.source), 3)); // the snapshot after the ack
  socket.receive(delta(text(b.delta), 4));
  assert.deepEqual(seen, [1, 3, 4]);
  assert.deepEqual(push._bases.get(BOOK), { seq: 4, bytes: bytes(b.target) });
  push.close();
});

test("a delta on an unknown base is not delivered: none yet, another seq, another book", () => {
  const [a, b, c] = PAIRS.filter((p) => p.name.startsWith("python order book"));
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e.data.id), { delta: "fossil" });
  socket.ackAll();
  socket.receive(delta(text(a.delta), 2)); // no full event yet on this connection
  socket.ackAll();
  socket.receive(full(text(b.source), 5));
  socket.receive(delta(text(b.delta), 7)); // made for base 6, the client holds 5
  socket.ackAll();
  socket.receive(full(text(c.source), 8));
  socket.receive(delta(text(a.delta), 9)); // right seq, made from another book: Fossil's checks refuse it
  assert.deepEqual(
    gaps.map((g) => [g.expected, g.got]),
    [
      [2, 2],
      [6, 7],
      [9, 9],
    ],
  );
  assert.deepEqual(seen, [JSON.parse(text(b.source)).id, JSON.parse(text(c.source)).id], "never a wrong book");
  assert.equal(socket.sentActions("unsubscribe").length, 3);
  push.close();
});

test("a full event whose text is not a JSON object is not delivered either", () => {
  const { push, gaps, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e), { delta: "fossil" });
  socket.receive(full("[1,2]", 1));
  socket.ackAll();
  socket.receive(full("{not json", 2));
  assert.deepEqual(seen, []);
  assert.equal(gaps.length, 2);
  push.close();
});

test("a new connection starts every delta chain again", async () => {
  const [a] = PAIRS.filter((p) => p.name.startsWith("python order book"));
  const { push, gaps, sockets, socket } = connected();
  const seen = [];
  push.subscribe([BOOK], (e) => seen.push(e.seq), { delta: "fossil" });
  socket.receive(full(text(a.source), 1));
  socket.serverClose(1012);
  await waitFor(() => sockets.length === 2, 1000, "the reconnect");
  sockets[1].accept();
  sockets[1].receive(delta(text(a.delta), 2)); // the old connection's base does not count
  assert.deepEqual(seen, [1]);
  assert.deepEqual(gaps, [{ channel: BOOK, expected: 2, got: 2 }]);
  push.close();
});

test("a latest value sent on subscribe reaches the handler marked snapshot, delta channel or not", () => {
  const { push, socket } = connected();
  const seen = [];
  push.subscribe(["market.ticker:X/Y"], (e) => seen.push([e.seq, e.snapshot === true]));
  push.subscribe([BOOK], (e) => seen.push([e.seq, e.snapshot === true]), { delta: "fossil" });
  socket.ackAll({ cursor: "e:0" });
  socket.receive({ ...stateFrame("market.ticker:X/Y", 3), snapshot: true });
  socket.receive(stateFrame("market.ticker:X/Y", 4));
  const [pair] = PAIRS;
  socket.receive({ ...full(text(pair.source), 7), snapshot: true });
  socket.receive(delta(text(pair.delta), 8));
  assert.deepEqual(seen, [
    [3, true],
    [4, false],
    [7, true],
    [8, false],
  ]);
  push.close();
});
