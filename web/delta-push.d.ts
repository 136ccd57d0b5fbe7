/**
 * Types of web/delta-push.js, the dependency-free browser client (docs/BROWSER.md).
 * Message and envelope types come from ./events.ts, imported as "./events.js": the
 * spelling `moduleResolution: node16/nodenext` requires (TS2835 without an
 * extension) and every resolver maps to events.ts; the imports are type-only.
 */

import type {
  AckMessage,
  ChannelPattern,
  Cursor,
  ErrorMessage,
  EventMessage,
  EventType,
  LaggedMessage,
  Priority,
  WelcomeMessage,
} from "./events.js";

export type { EventMessage, EventType, Priority } from "./events.js";

/** idle → connecting → connected → (reconnecting →) disconnected → connecting … ; closed when told or refused for good. */
export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "disconnected" | "closed";

/** What the client knows about a connection that ended. */
export interface CloseInfo {
  /** The WebSocket close code; null when the client gave up on the socket itself (timeout, no pong) or could not open it. */
  code: number | null;
  /** The close reason sent by the server, or the client's own reason. */
  reason: string;
  /** The last `error` message the server sent on that connection (e.g. TOKEN_EXPIRED before 4001). */
  error: ErrorMessage | null;
}

export interface StateDetail extends Partial<CloseInfo> {
  previous: ConnectionState;
  /** connected: the node's id, the user (null: anonymous) and the token expiry (ms). */
  node?: string;
  userId?: string | null;
  expiresAt?: number | null;
  /** disconnected: the reconnect delay chosen (ms) and the attempt number. */
  retryIn?: number;
  attempt?: number;
  /** closed: the client will not reconnect by itself (4001 without getToken, 4003, 4029). */
  fatal?: boolean;
}

/** A drop reported by the node, or (`local: true`) by this client's own buffer. */
export interface ClientLaggedMessage extends LaggedMessage {
  reason: LaggedMessage["reason"] | "client_buffer_full" | "client_conflated";
  local?: true;
}

/** An error from the server, or (`local: true`) from the client (code TOKEN_SOURCE: getToken failed). */
export type ClientErrorMessage = ErrorMessage | { action: "error"; code: "TOKEN_SOURCE"; message: string; local: true };

/**
 * What a handler receives: the `event` message with `data` the envelope object. Events of state
 * channels (market.ticker, market.orderbook) also carry `seq`, one more than the channel's previous
 * event. On a `delta: "fossil"` subscription the client rebuilds the envelope first: handlers get
 * exactly this shape (no `delta` key, `data` an object), as on a full subscription.
 */
export type ClientEventMessage<T extends string = EventType> = EventMessage<T> & { seq?: number };

export type EventHandler<T extends string = EventType> = (event: ClientEventMessage<T>) => void | Promise<void>;

/**
 * A state channel missed updates (a `seq` jump: conflated, dropped, lost on the bus), or a delta
 * could not be applied (no base, another base, corrupt: then `expected === got`). The event was
 * not delivered if it was a delta; the client has already resubscribed the matching subscriptions
 * without `since`, so the node sends the channel's latest value next.
 */
export interface GapNotice {
  channel: string;
  /** The seq the client could have used next. */
  expected: number;
  /** The seq that arrived. */
  got: number;
}

export interface DeltaPushOptions {
  /** WebSocket URL; default: the page's origin + /ws (through the router). */
  url?: string;
  /** A fixed token (no refresh: the connection ends with 4001 at its expiry). */
  token?: string;
  /** Called before each connect and before expiry (refresh through {"action":"auth"}). */
  getToken?: () => string | Promise<string>;
  /** A WebSocket constructor (tests inject a fake); default: globalThis.WebSocket. */
  WebSocket?: new (url: string) => WebSocket;
  /** Reconnect delay: the nth retry waits uniformly in [0, min(maxBackoff, minBackoff × 2^n)] ms. Defaults 100 and 10,000. */
  minBackoff?: number;
  maxBackoff?: number;
  /** Event ids remembered for deduplication (default 10,000). */
  dedupWindow?: number;
  /** Events waiting for slow handlers before drops (default 1,000). */
  bufferSize?: number;
  /** Refresh this many ms before expiry, at most half the token's remaining life (default 30,000). */
  refreshBefore?: number;
  /** App-level ping period and the silence after which the socket is given up (defaults 25,000 and 10,000 ms; 0 disables). */
  pingInterval?: number;
  pongTimeout?: number;
  /** From dialling to `welcome` (default 10,000 ms). */
  connectTimeout?: number;
  /** After `reconnect`, how long to wait for the server's close before closing (default 2,000 ms). */
  reconnectGrace?: number;
  /** Source of randomness for the jitter (tests). */
  random?: () => number;
  onState?: (state: ConnectionState, detail: StateDetail) => void;
  onLagged?: (notice: ClientLaggedMessage) => void;
  onUnrecovered?: (channels: string[], patterns: string[]) => void;
  onError?: (error: ClientErrorMessage, patterns: string[] | null) => void;
  onWelcome?: (welcome: WelcomeMessage) => void;
  onHandlerError?: (error: unknown, event: EventMessage) => void;
  /** A state channel's gap (see GapNotice); the client resubscribes by itself. */
  onGap?: (gap: GapNotice) => void;
}

export interface SubscribeOptions {
  /** Only events of this priority or higher (node-side, and checked again per handler). */
  priority?: Priority;
  /** At most this many events per second for these patterns (node-side). */
  limit?: number;
  /** Resume after this cursor (e.g. one saved from a previous page load). */
  since?: Cursor;
  /** This subscription's `recovered: false` channels. */
  onUnrecovered?: (channels: string[]) => void;
  /** State channels: the latest value of each matching channel right after the ack (node default: true). */
  snapshot?: boolean;
  /** State channels' events as Fossil deltas of the previous one (docs/DELTA.md); handlers still get whole envelopes. */
  delta?: "fossil";
}

export interface SubscriptionInfo {
  patterns: string[];
  priority: Priority | null;
  limit: number | null;
  snapshot: boolean | null;
  delta: "fossil" | null;
  cursor: Cursor | null;
  acked: boolean;
}

export interface ClientEvents {
  state: (state: ConnectionState, detail: StateDetail) => void;
  lagged: (notice: ClientLaggedMessage) => void;
  unrecovered: (channels: string[], patterns: string[]) => void;
  gap: (gap: GapNotice) => void;
  error: (error: ClientErrorMessage, patterns: string[] | null) => void;
  welcome: (welcome: WelcomeMessage) => void;
  ack: (ack: AckMessage, patterns: string[] | null) => void;
  authenticated: (message: { action: "authenticated"; userId: string; expiresAt: number }) => void;
  handlerError: (error: unknown, event: EventMessage) => void;
}

export declare const PRIORITIES: readonly Priority[];
export declare const FATAL_CLOSE_CODES: readonly number[];
export declare const RECONNECT_CLOSE_CODE: 1012;
export declare const DEFAULTS: Readonly<Required<Pick<DeltaPushOptions,
  "minBackoff" | "maxBackoff" | "dedupWindow" | "bufferSize" | "refreshBefore" | "pingInterval" | "pongTimeout" | "connectTimeout" | "reconnectGrace">>>;

export declare class DeltaPush {
  constructor(options?: DeltaPushOptions);
  readonly url: string;
  readonly state: ConnectionState;
  /** The current connection's welcome (node, userId, expiresAt, limits). */
  readonly welcome: WelcomeMessage | null;
  /** Welcomes received so far (1 + reconnects). */
  readonly connects: number;
  readonly closeInfo: CloseInfo | null;
  /** Set when the client gave up: 4001 without getToken, 4003, 4029. */
  readonly fatal: CloseInfo | null;
  readonly stats: { events: number; duplicates: number; dropped: number; serverDropped: number };
  readonly subscriptions: SubscriptionInfo[];
  /** Events waiting for a handler. */
  readonly buffered: number;
  connect(): this;
  close(): void;
  /** Returns the unsubscribe function. Throws TypeError on an invalid pattern or option. */
  subscribe<T extends string = EventType>(
    patterns: ChannelPattern | ChannelPattern[],
    handler: EventHandler<T>,
    options?: SubscribeOptions,
  ): () => void;
  on<K extends keyof ClientEvents>(name: K, listener: ClientEvents[K]): () => void;
}

export declare function createClient(options?: DeltaPushOptions): DeltaPush;

export declare function backoffDelay(attempt: number, minBackoff?: number, maxBackoff?: number, random?: () => number): number;

export declare class DedupWindow {
  constructor(size?: number);
  readonly size: number;
  readonly length: number;
  add(id: string): boolean;
  has(id: string): boolean;
}

export interface BufferedEvent {
  event: EventMessage;
  channel: string;
  rank: number;
  conflate: boolean;
}

export declare class EventBuffer {
  constructor(capacity?: number);
  readonly capacity: number;
  readonly length: number;
  push(item: BufferedEvent): { item: BufferedEvent; reason: "client_buffer_full" | "client_conflated" } | null;
  shift(): BufferedEvent | undefined;
  clear(): void;
}

export declare function parseChannel(text: string): { type: string; key: string | null } | null;
export declare function parsePattern(text: string): { typepat: string; keypat: string };
export declare function patternMatches(
  pattern: { typepat: string; keypat: string },
  channel: { type: string; key: string | null },
): boolean;
