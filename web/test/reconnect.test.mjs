// Reconnect, backoff, resubscribe-with-cursor, token refresh and fatal closes of web/delta-push.js.
import assert from "node:assert/strict";
import { test } from "node:test";

import { DeltaPush, backoffDelay } from "../delta-push.js";
import { eventFrame, fakeWebSocketClass, tick, waitFor } from "./fake-websocket.mjs";

const URL = "ws://router.test/ws";

function client(options = {}) {
  const WebSocket = fakeWebSocketClass();
  const states = [];
  const push = new DeltaPush({
    url: URL,
    WebSocket,
    minBackoff: 1,
    maxBackoff: 8,
    pingInterval: 0,
    random: () => 1, // the top of the jitter window, so delays are predictable
    onState: (state, detail) => states.push({ state, ...detail }),
    ...options,
  });
  return { push, WebSocket, sockets: WebSocket.instances, states };
}

test("full jitter: the delay is uniform in [0, min(max, min * 2^attempt)]", () => {
  assert.equal(backoffDelay(1, 100, 10_000, () => 1), 200);
  assert.equal(backoffDelay(3, 100, 10_000, () => 1), 800);
  assert.equal(backoffDelay(20, 100, 10_000, () => 1), 10_000);
  assert.equal(backoffDelay(5, 100, 10_000, () => 0), 0);
  assert.equal(backoffDelay(2, 100, 10_000, () => 0.5), 200);
  for (let i = 0; i < 1000; i++) {
    const delay = backoffDelay(4, 100, 10_000);
    assert.ok(delay >= 0 && delay <= 1600, `delay ${delay}`);
  }
});

test("failed attempts back off exponentially up to the maximum, and a welcome resets the backoff", async () => {
  const { push, sockets, states } = client();
  push.connect();
  for (let i = 0; i < 5; i++) {
    await waitFor(() => sockets.length === i + 1, 2000, `attempt ${i + 1}`);
    sockets[i].serverClose(1006);
  }
  const delays = states.filter((s) => s.state === "disconnected").map((s) => s.retryIn);
  assert.deepEqual(delays, [2, 4, 8, 8, 8]);
  await waitFor(() => sockets.length === 6);
  sockets[5].accept();
  assert.equal(push.state, "connected");
  sockets[5].serverClose(1006);
  assert.equal(states.at(-1).state, "disconnected");
  assert.equal(states.at(-1).retryIn, 2, "the first retry after a working connection uses the smallest window");
  push.close();
});

test("reconnect + 1012 from a draining node: reconnect at once and resubscribe with the last cursor", async () => {
  const { push, sockets, states } = client();
  const seen = [];
  push.subscribe(["order.*"], (e) => seen.push(e.data.payload.n));
  push.subscribe(["market.ticker:BTC/USDT"], () => {});
  push.connect();
  const first = sockets[0];
  first.accept({ node: "node-a" });
  assert.deepEqual(
    first.sentActions("subscribe").map((m) => [m.channels, m.options]),
    [[["order.*"], undefined], [["market.ticker:BTC/USDT"], undefined]],
  );
  first.ackAll({ cursor: "ep:@1-1" });
  first.receive(eventFrame("order.filled", { payload: { n: 1 }, cursor: "ep:order.filled:e1" }));
  first.receive({ action: "reconnect", reason: "node is draining" });
  assert.equal(push.state, "reconnecting");
  first.serverClose(1012, "node is draining");
  await waitFor(() => sockets.length === 2, 1000, "the second connection");
  const second = sockets[1];
  second.accept({ node: "node-b" });
  const resubscribed = second.sentActions("subscribe");
  assert.deepEqual(resubscribed.map((m) => m.options.since), ["ep:order.filled:e1", "ep:@1-1"]);
  assert.equal(push.welcome.node, "node-b");
  assert.equal(push.connects, 2);
  assert.deepEqual(
    states.map((s) => s.state),
    ["connecting", "connected", "reconnecting", "disconnected", "connecting", "connected"],
  );
  assert.equal(states[3].code, 1012);
  assert.deepEqual(seen, [1]);
  push.close();
});

test("a node that sends reconnect but never closes is left after the grace period", async () => {
  const { push, sockets } = client({ reconnectGrace: 20 });
  push.connect();
  sockets[0].accept();
  sockets[0].receive({ action: "reconnect", reason: "rebalance" });
  await waitFor(() => sockets.length === 2, 1000, "a new connection");
  assert.ok(sockets[0].closedByClient, "the old socket was closed by the client");
  push.close();
});

test("no welcome within connectTimeout: the attempt is abandoned and retried", async () => {
  const { push, sockets, states } = client({ connectTimeout: 20 });
  push.connect();
  await waitFor(() => sockets.length === 2, 1000, "a retry");
  assert.equal(states.find((s) => s.state === "disconnected").reason, "connect timeout");
  push.close();
});

test("a silent connection is given up after pingInterval + pongTimeout", async () => {
  const { push, sockets } = client({ pingInterval: 10, pongTimeout: 10 });
  push.connect();
  sockets[0].accept();
  await waitFor(() => sockets[0].sentActions("ping").length >= 1, 1000, "a ping");
  await waitFor(() => sockets.length === 2, 1000, "a reconnect after silence");
  push.close();
});

test("4001 with a fixed token is final: no reconnect, the server's reason is kept", async () => {
  const { push, sockets, states } = client({ token: "t0" });
  push.connect();
  assert.equal(sockets[0].url, `${URL}?token=t0`);
  sockets[0].accept({ userId: "u1", expiresAt: Date.now() });
  sockets[0].receive({ action: "error", code: "TOKEN_EXPIRED", message: "token expired", id: null });
  sockets[0].serverClose(4001, "token expired");
  await tick();
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(sockets.length, 1);
  assert.equal(push.state, "closed");
  assert.equal(push.fatal.code, 4001);
  assert.equal(push.fatal.error.code, "TOKEN_EXPIRED");
  assert.equal(states.at(-1).fatal, true);
  assert.equal(states.at(-1).reason, "token expired");
});

test("4003 and 4029 are final too; 1011 and 4008 are retried", async () => {
  for (const [code, final] of [[4003, true], [4029, true], [1011, false], [4008, false]]) {
    const { push, sockets } = client();
    push.connect();
    sockets[0].accept();
    sockets[0].serverClose(code);
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(push.state === "closed", final, `close ${code}`);
    assert.equal(sockets.length > 1, !final, `close ${code}`);
    push.close();
  }
});

test("4001 with getToken reconnects with a fresh token", async () => {
  let n = 0;
  const { push, sockets } = client({ getToken: async () => `tok-${++n}` });
  push.connect();
  await waitFor(() => sockets.length === 1);
  assert.equal(sockets[0].url, `${URL}?token=tok-1`);
  sockets[0].accept();
  sockets[0].serverClose(4001, "token expired");
  await waitFor(() => sockets.length === 2, 1000, "a reconnect");
  assert.equal(sockets[1].url, `${URL}?token=tok-2`);
  push.close();
});

test("the token is refreshed before expiry with an auth message, and again after authenticated", async () => {
  let n = 0;
  const { push, sockets } = client({ getToken: async () => `tok-${++n}`, refreshBefore: 30_000 });
  push.connect();
  await waitFor(() => sockets.length === 1);
  sockets[0].accept({ userId: "u1", expiresAt: Date.now() + 60 });
  // refresh at half the remaining life (refreshBefore is larger than it)
  const auth = await waitFor(() => sockets[0].sentActions("auth")[0], 1000, "an auth message");
  assert.equal(auth.token, "tok-2");
  sockets[0].receive({ action: "authenticated", userId: "u1", expiresAt: Date.now() + 40, id: auth.id });
  await waitFor(() => sockets[0].sentActions("auth").length === 2, 1000, "a second refresh");
  assert.equal(sockets[0].sentActions("auth")[1].token, "tok-3");
  assert.equal(sockets.length, 1, "refreshing does not reconnect");
  push.close();
});

test("a failing getToken is reported and retried with backoff", async () => {
  let calls = 0;
  const errors = [];
  const { push, sockets } = client({
    getToken: async () => {
      calls += 1;
      if (calls < 3) throw new Error("auth server down");
      return "tok";
    },
    onError: (e) => errors.push(e),
  });
  push.connect();
  await waitFor(() => sockets.length === 1, 1000, "a connection once getToken works");
  assert.equal(errors.length, 2);
  assert.equal(errors[0].code, "TOKEN_SOURCE");
  push.close();
});

test("close() stops reconnecting and connect() starts again with the same subscriptions", async () => {
  const { push, sockets } = client();
  push.subscribe("risk.*", () => {});
  push.connect();
  sockets[0].accept();
  push.close();
  assert.equal(push.state, "closed");
  assert.deepEqual(sockets[0].closedByClient, { code: 1000, reason: "client closed" });
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(sockets.length, 1);
  push.connect();
  sockets[1].accept();
  assert.deepEqual(sockets[1].sentActions("subscribe")[0].channels, ["risk.*"]);
  push.close();
});

test("a recovered: false ack is surfaced and the subscription takes the ack's cursor", async () => {
  const { push, sockets } = client();
  const lost = [];
  const own = [];
  push.on("unrecovered", (channels, patterns) => lost.push({ channels, patterns }));
  push.subscribe(["order.*"], () => {}, { since: "old-epoch:order.filled:e0", onUnrecovered: (c) => own.push(c) });
  push.connect();
  sockets[0].accept();
  assert.equal(sockets[0].sentActions("subscribe")[0].options.since, "old-epoch:order.filled:e0");
  sockets[0].ackAll({ cursor: "new-epoch:@5-1", recovered: { "order.*": false } });
  await tick();
  assert.deepEqual(lost, [{ channels: ["order.*"], patterns: ["order.*"] }]);
  assert.deepEqual(own, [["order.*"]]);
  assert.equal(push.subscriptions[0].cursor, "new-epoch:@5-1");
  push.close();
});

test("server lagged notices and subscription errors reach the app", async () => {
  const { push, sockets } = client();
  const lagged = [];
  const errors = [];
  push.on("lagged", (n) => lagged.push(n));
  push.on("error", (e, patterns) => errors.push([e.code, patterns]));
  push.subscribe(["order.*"], () => {});
  push.connect();
  sockets[0].accept();
  const sub = sockets[0].sentActions("subscribe")[0];
  sockets[0].receive({ action: "error", code: "FORBIDDEN", message: "private", channels: ["order.*"], id: sub.id });
  sockets[0].receive({ action: "lagged", dropped: 7, reason: "queue_full" });
  assert.deepEqual(errors, [["FORBIDDEN", ["order.*"]]]);
  assert.deepEqual(lagged, [{ action: "lagged", dropped: 7, reason: "queue_full" }]);
  assert.equal(push.stats.serverDropped, 7);
  push.close();
});

test("close() and connect() while getToken is pending open exactly one socket", async () => {
  let release;
  const pending = [];
  const { push, sockets } = client({
    getToken: () =>
      new Promise((resolve) => {
        pending.push(resolve);
        release = resolve;
      }),
  });
  push.connect();
  push.close();
  push.connect();
  for (const resolve of pending) resolve("tok");
  release("tok");
  await waitFor(() => sockets.length >= 1);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(sockets.length, 1);
  push.close();
});
