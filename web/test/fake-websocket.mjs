// A fake WebSocket for the client's unit tests: the test plays the server.
// (Imported by the *.test.mjs files; it holds no tests of its own.)

/** A fresh fake WebSocket class whose `instances` lists every socket the client opened. */
export function fakeWebSocketClass() {
  class FakeWebSocket {
    static instances = [];

    constructor(url) {
      this.url = url;
      this.readyState = 0;
      this.sent = [];
      this.closedByClient = null;
      FakeWebSocket.instances.push(this);
    }

    send(text) {
      if (this.readyState !== 1) throw new Error("send on a socket that is not open");
      this.sent.push(JSON.parse(text));
    }

    close(code = 1000, reason = "") {
      if (this.readyState >= 2) return;
      this.readyState = 2;
      this.closedByClient = { code, reason };
      queueMicrotask(() => this.serverClose(code, reason));
    }

    // --- the server's side ---

    /** Open and send welcome (merged with `extra`). */
    accept(extra = {}) {
      this.readyState = 1;
      this.onopen?.({});
      this.receive({ action: "welcome", connectionId: "conn", node: "node-1", userId: null, expiresAt: null, limits: {}, ...extra });
    }

    receive(doc) {
      this.onmessage?.({ data: typeof doc === "string" ? doc : JSON.stringify(doc) });
    }

    serverClose(code, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      this.onclose?.({ code, reason, wasClean: true });
    }

    /** The messages the client sent with this action. */
    sentActions(action) {
      return this.sent.filter((m) => m.action === action);
    }

    /** Answer every subscribe sent so far with an ack (optionally with a cursor / recovered map). */
    ackAll(extra = {}) {
      for (const m of this.sentActions("subscribe")) {
        if (m.acked) continue;
        m.acked = true;
        this.receive({ action: "ack", subscribed: m.channels, unsubscribed: [], id: m.id, ...extra });
      }
    }
  }
  return FakeWebSocket;
}

let eventCounter = 0;

/** An event frame as a node sends it. */
export function eventFrame(channel, { id, priority, payload = {}, cursor } = {}) {
  eventCounter += 1;
  const eventId = id ?? `00000000-0000-4000-8000-${String(eventCounter).padStart(12, "0")}`;
  const type = channel.split(":")[0];
  const data = { id: eventId, type, source: "order-executor", timestamp: Date.now(), version: "1.0", payload };
  if (priority) data.priority = priority;
  return { action: "event", channel, data, cursor: cursor ?? `ep:${channel}:${eventId}` };
}

/** Wait until `condition()` is truthy (polling), or fail after `timeout` ms. */
export async function waitFor(condition, timeout = 2000, what = "condition") {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = condition();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
}

export const tick = () => new Promise((resolve) => setTimeout(resolve, 0));
