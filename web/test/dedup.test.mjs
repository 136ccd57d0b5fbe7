// Deduplication by event id, dispatch to handlers, and the bounded buffer for slow handlers.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DedupWindow, DeltaPush, EventBuffer, parseChannel, parsePattern, patternMatches } from "../delta-push.js";
import { eventFrame, fakeWebSocketClass, tick, waitFor } from "./fake-websocket.mjs";

function connected(options = {}) {
  const WebSocket = fakeWebSocketClass();
  const push = new DeltaPush({ url: "ws://router.test/ws", WebSocket, minBackoff: 1, maxBackoff: 4, pingInterval: 0, ...options });
  push.connect();
  WebSocket.instances[0].accept();
  return { push, sockets: WebSocket.instances, socket: WebSocket.instances[0] };
}

test("the dedup window remembers the last N ids and forgets the oldest", () => {
  const window = new DedupWindow(3);
  assert.equal(window.add("a"), true);
  assert.equal(window.add("a"), false);
  window.add("b");
  window.add("c");
  window.add("d"); // evicts a
  assert.equal(window.length, 3);
  assert.equal(window.has("a"), false);
  assert.equal(window.add("a"), true);
  assert.equal(window.has("b"), false, "b was the oldest when a came back");
  assert.equal(window.add("d"), false);
});

test("an event replayed after a reconnect reaches the handler once", async () => {
  const { push, sockets, socket } = connected();
  const seen = [];
  push.subscribe(["order.*"], (e) => seen.push(e.data.id));
  socket.ackAll();
  const e1 = eventFrame("order.filled");
  const e2 = eventFrame("order.filled");
  const e3 = eventFrame("order.cancelled");
  socket.receive(e1);
  socket.receive(e2);
  socket.serverClose(1012);
  await waitFor(() => sockets.length === 2, 1000, "the reconnect");
  sockets[1].accept();
  assert.equal(sockets[1].sentActions("subscribe")[0].options.since, e2.cursor);
  // the node's replay overlaps what was already seen (e.g. a drain race): delivered once each
  for (const frame of [e1, e2, e3, e3]) sockets[1].receive(frame);
  assert.deepEqual(seen, [e1.data.id, e2.data.id, e3.data.id]);
  assert.equal(push.stats.duplicates, 3);
  assert.equal(push.subscriptions[0].cursor, e3.cursor);
  push.close();
});

test("the dedup window is bounded by dedupWindow", () => {
  const { push, socket } = connected({ dedupWindow: 2 });
  const seen = [];
  push.subscribe(["market.trades"], (e) => seen.push(e.data.id));
  const [a, b, c] = [eventFrame("market.trades"), eventFrame("market.trades"), eventFrame("market.trades")];
  for (const frame of [a, b, c, a]) socket.receive(frame);
  assert.deepEqual(seen, [a.data.id, b.data.id, c.data.id, a.data.id], "a fell out of a window of 2");
  push.close();
});

test("every matching subscription's handler gets the event once; priority filters per handler", () => {
  const { push, socket } = connected();
  const all = [];
  const urgent = [];
  const tickers = [];
  push.subscribe(["*"], (e) => all.push(e.data.type));
  push.subscribe(["risk.*", "order.*"], (e) => urgent.push(e.data.type), { priority: "p1" });
  push.subscribe(["market.ticker:*"], (e) => tickers.push(e.channel));
  socket.receive(eventFrame("risk.alert", { priority: "p0" }));
  socket.receive(eventFrame("order.filled")); // p2 by default
  socket.receive(eventFrame("market.ticker:ETH/USDT"));
  socket.receive(eventFrame("market.ticker")); // no key: not matched by market.ticker:*
  assert.deepEqual(all, ["risk.alert", "order.filled", "market.ticker", "market.ticker"]);
  assert.deepEqual(urgent, ["risk.alert"]);
  assert.deepEqual(tickers, ["market.ticker:ETH/USDT"]);
  push.close();
});

test("unsubscribe stops the handler and leaves patterns other subscriptions use", () => {
  const { push, socket } = connected();
  const a = [];
  const b = [];
  const offA = push.subscribe(["order.*", "risk.*"], (e) => a.push(e.data.type));
  push.subscribe(["risk.*"], (e) => b.push(e.data.type));
  offA();
  offA(); // idempotent
  assert.deepEqual(socket.sentActions("unsubscribe").map((m) => m.channels), [["order.*"]]);
  socket.receive(eventFrame("risk.alert"));
  assert.deepEqual(a, []);
  assert.deepEqual(b, ["risk.alert"]);
  push.close();
});

test("a slow async handler gets events in order, one at a time", async () => {
  const { push, socket } = connected();
  const log = [];
  let running = 0;
  push.subscribe(["order.*"], async (e) => {
    running += 1;
    assert.equal(running, 1, "handlers never overlap");
    await new Promise((r) => setTimeout(r, 2));
    log.push(e.data.payload.n);
    running -= 1;
  });
  for (let n = 0; n < 5; n++) socket.receive(eventFrame("order.filled", { payload: { n } }));
  await waitFor(() => log.length === 5);
  assert.deepEqual(log, [0, 1, 2, 3, 4]);
  push.close();
});

test("when the buffer is full: conflate tickers, then drop the oldest of the lowest priority, report lagged locally", async () => {
  const { push, socket } = connected({ bufferSize: 3 });
  const delivered = [];
  const lagged = [];
  let release;
  const gate = new Promise((r) => (release = r));
  push.on("lagged", (n) => lagged.push(n));
  push.subscribe(["*"], async (e) => {
    delivered.push(e.data.payload.name);
    if (e.data.payload.name === "first") await gate;
  });
  socket.receive(eventFrame("order.filled", { payload: { name: "first" } })); // being handled
  socket.receive(eventFrame("market.ticker:BTC/USDT", { payload: { name: "btc-1" } }));
  socket.receive(eventFrame("order.filled", { priority: "p3", payload: { name: "low" } }));
  socket.receive(eventFrame("risk.alert", { priority: "p0", payload: { name: "alert" } })); // full now
  socket.receive(eventFrame("market.ticker:BTC/USDT", { payload: { name: "btc-2" } })); // replaces btc-1
  socket.receive(eventFrame("order.filled", { priority: "p1", payload: { name: "fill" } })); // drops "low" (p3)
  socket.receive(eventFrame("order.filled", { priority: "p3", payload: { name: "later-low" } })); // least important: dropped itself
  assert.equal(push.buffered, 3);
  await tick();
  assert.deepEqual(lagged, [
    { action: "lagged", dropped: 1, reason: "client_conflated", local: true },
    { action: "lagged", dropped: 2, reason: "client_buffer_full", local: true },
  ]);
  release();
  await waitFor(() => delivered.length === 4);
  assert.deepEqual(delivered, ["first", "alert", "btc-2", "fill"]);
  assert.equal(push.stats.dropped, 3);
  push.close();
});

test("a buffer full of p0 events drops the oldest p0, and says so", () => {
  const buffer = new EventBuffer(2);
  const item = (name, rank) => ({ event: { name }, channel: "risk.alert", rank, conflate: false });
  assert.equal(buffer.push(item("a", 0)), null);
  assert.equal(buffer.push(item("b", 0)), null);
  const dropped = buffer.push(item("c", 0));
  assert.equal(dropped.item.event.name, "a");
  assert.equal(dropped.reason, "client_buffer_full");
  assert.deepEqual([buffer.shift().event.name, buffer.shift().event.name], ["b", "c"]);
});

test("a handler that throws is reported and does not stop delivery", () => {
  const errors = [];
  const { push, socket } = connected({ onHandlerError: (error) => errors.push(error.message) });
  const seen = [];
  push.subscribe(["order.*"], (e) => {
    if (e.data.payload.bad) throw new Error("boom");
    seen.push(e.data.payload.n);
  });
  socket.receive(eventFrame("order.filled", { payload: { bad: true } }));
  socket.receive(eventFrame("order.filled", { payload: { n: 2 } }));
  assert.deepEqual(errors, ["boom"]);
  assert.deepEqual(seen, [2]);
  push.close();
});

test("patterns follow SPEC §3 like cluster/channels.py", () => {
  const matches = (pattern, channel) => patternMatches(parsePattern(pattern), parseChannel(channel));
  assert.ok(matches("order.*", "order.filled"));
  assert.ok(matches("market.*", "market.ticker:BTC/USDT"));
  assert.ok(matches("market.ticker", "market.ticker:BTC/USDT"), "no key part: any key or none");
  assert.ok(matches("market.ticker", "market.ticker"));
  assert.ok(matches("market.ticker:BTC/USDT", "market.ticker:BTC/USDT"));
  assert.ok(!matches("market.ticker:BTC/USDT", "market.ticker:ETH/USDT"));
  assert.ok(!matches("market.ticker:*", "market.ticker"), ":* needs a key");
  assert.ok(matches("*", "spirit.notification"));
  assert.ok(matches("*:BTC/USDT", "market.trades:BTC/USDT"));
  assert.ok(!matches("order.*", "risk.alert"));
  for (const bad of ["", "order", "Order.*", "order.*:", "order.filled:a b", ".x", "*.filled"]) {
    assert.throws(() => parsePattern(bad), TypeError, bad);
  }
  assert.equal(parseChannel("market.ticker:"), null);
  const { push } = connected();
  assert.throws(() => push.subscribe(["order"], () => {}), TypeError);
  assert.throws(() => push.subscribe(["order.*"], () => {}, { priority: "p9" }), TypeError);
  push.close();
});
