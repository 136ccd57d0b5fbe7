/**
 * delta-push event and protocol types (SPEC §2 envelope, §3 channels, §4 wire protocol).
 *
 * The lists below are the TypeScript side of cluster/envelope.py (KNOWN_TYPES,
 * KNOWN_SERVICES, PRIORITIES) and cluster/protocol.py (ErrorCode, CloseCode, the
 * client actions parse_client_message accepts and the server messages it builds).
 * tests/test_web_types.py parses this file and fails when the two drift apart:
 * change both in the same commit.
 *
 * Payload types are the publishers' business; an app declares the ones it relies on
 * by augmenting EventPayloads:
 *
 *     declare module "./events" {
 *       interface EventPayloads { "order.filled": { orderId: string; price: number } }
 *     }
 */

// --- SPEC §2: the envelope ------------------------------------------------------

export const EVENT_TYPES = [
  "order.created",
  "order.filled",
  "order.cancelled",
  "order.failed",
  "risk.alert",
  "risk.limit_reached",
  "risk.position_warning",
  "ai.insight_generated",
  "ai.analysis_complete",
  "ai.signal_detected",
  "strategy.created",
  "strategy.updated",
  "strategy.activated",
  "strategy.paused",
  "backtest.started",
  "backtest.progress",
  "backtest.completed",
  "backtest.failed",
  "market.ticker",
  "market.orderbook",
  "market.trades",
  "spirit.state_change",
  "spirit.notification",
] as const;

/** One of the 23 known event types, `<domain>.<name>`. */
export type EventType = (typeof EVENT_TYPES)[number];

/** The part of an event type before the dot. */
export type Domain = EventType extends `${infer D}.${string}` ? D : never;

export const SERVICES = [
  "order-executor",
  "risk-manager",
  "nlp-processor",
  "signal-analyzer",
  "strategy-service",
  "backtest-engine",
  "market-data-collector",
  "exchange-connector",
] as const;

/** One of the 8 known publishing services. */
export type ServiceName = (typeof SERVICES)[number];

export const PRIORITIES = ["p0", "p1", "p2", "p3"] as const;

/** p0 is the highest; an envelope without priority is p2. */
export type Priority = (typeof PRIORITIES)[number];

export const DEFAULT_PRIORITY: Priority = "p2";
export const ENVELOPE_VERSION = "1.0";

/** Payload types an app relies on, by event type (empty: augment it, see above). */
// eslint-disable-next-line @typescript-eslint/no-empty-interface
export interface EventPayloads {}

export type PayloadOf<T extends string> = T extends keyof EventPayloads ? EventPayloads[T] : unknown;

/**
 * An event as published. Nodes deliver any well-formed envelope (forward
 * compatibility), so `type` and `source` may be names this file does not know yet;
 * "spirit" is the source of wrapped legacy notifications.
 */
export interface EventEnvelope<T extends string = EventType> {
  /** UUID, unique per event. */
  id: string;
  type: T;
  source: ServiceName | "spirit" | (string & {});
  /** Unix milliseconds at publish. */
  timestamp: number;
  version: typeof ENVELOPE_VERSION;
  /** Set: a private event of that user. */
  userId?: string;
  /** Set: only that user's connections whose session id matches. */
  sessionId?: string;
  payload: PayloadOf<T>;
  /** Absent means p2. */
  priority?: Priority;
  /** Milliseconds; never delivered after timestamp + ttl. */
  ttl?: number;
  correlationId?: string;
}

/** An envelope of any known type, discriminated by `type`. */
export type AnyEventEnvelope = { [T in EventType]: EventEnvelope<T> }[EventType];

// --- SPEC §3: channels ------------------------------------------------------------

/** `<type>` or `<type>:<key>`, e.g. `market.ticker:BTC/USDT`. */
export type Channel = EventType | `${EventType}:${string}`;

/** `*`, `<domain>.*` or a type, optionally `:<key>` or `:*`, e.g. `order.*`, `market.ticker:*`. */
export type ChannelPattern =
  | "*"
  | `*:${string}`
  | `${Domain}.*`
  | `${Domain}.*:${string}`
  | Channel
  | (string & {});

// --- SPEC §4: wire protocol ----------------------------------------------------------

export const CLIENT_ACTIONS = ["subscribe", "unsubscribe", "auth", "ping"] as const;
export type ClientAction = (typeof CLIENT_ACTIONS)[number];

export const SERVER_ACTIONS = [
  "welcome",
  "ack",
  "event",
  "error",
  "authenticated",
  "pong",
  "lagged",
  "reconnect",
] as const;
export type ServerAction = (typeof SERVER_ACTIONS)[number];

export const ERROR_CODES = [
  "INVALID_JSON",
  "INVALID_MESSAGE",
  "UNKNOWN_ACTION",
  "INVALID_CHANNEL",
  "FORBIDDEN",
  "SUBSCRIPTION_LIMIT",
  "UNAUTHORIZED",
  "TOKEN_EXPIRED",
  "TOO_MANY_CONNECTIONS",
  "RATE_LIMITED",
  "INTERNAL",
  "SNAPSHOT_LIMIT",
] as const;
export type ErrorCode = (typeof ERROR_CODES)[number];

export const CLOSE_CODES = {
  NORMAL: 1000,
  FLOODING: 1008,
  TOO_BIG: 1009,
  INTERNAL: 1011,
  RECONNECT: 1012,
  UNAUTHORIZED: 4001,
  FORBIDDEN: 4003,
  SLOW_CONSUMER: 4008,
  TOO_MANY_CONNECTIONS: 4029,
} as const;
export type CloseCode = (typeof CLOSE_CODES)[keyof typeof CLOSE_CODES];

/** Why a node dropped events for this connection (README "Drops"). */
export const LAGGED_REASONS = ["queue_full", "conflated", "expired", "recovery_overflow"] as const;
export type LaggedReason = (typeof LAGGED_REASONS)[number];

/** A request id, echoed in replies (null when none was sent). */
export type RequestId = string | number | null;

/** An opaque cursor: `<epoch>:<channel>:<event id>` on events, `<epoch>:@<position>` on acks. */
export type Cursor = string;

// client → server

export interface SubscribeOptions {
  /** Only events of this priority or higher. */
  priority?: Priority;
  /** At most this many events per second for these channels. */
  limit?: number;
  /** Resume after this cursor (SPEC §8). */
  since?: Cursor;
}

export interface SubscribeMessage {
  action: "subscribe";
  channels: ChannelPattern[];
  options?: SubscribeOptions;
  id?: RequestId;
}

export interface UnsubscribeMessage {
  action: "unsubscribe";
  channels: ChannelPattern[];
  id?: RequestId;
}

export interface AuthMessage {
  action: "auth";
  token: string;
  id?: RequestId;
}

export interface PingMessage {
  action: "ping";
  id?: RequestId;
}

export type ClientMessage = SubscribeMessage | UnsubscribeMessage | AuthMessage | PingMessage;

// server → client

export interface Limits {
  maxConnectionsPerUser: number;
  maxSubscriptions: number;
  maxInboundPerSecond: number;
  eventsPerSecond: number;
  eventsBurst: number;
  queueSize: number;
  maxFrameBytes: number;
}

export interface WelcomeMessage {
  action: "welcome";
  connectionId: string;
  /** The node's --node-id. */
  node: string;
  userId: string | null;
  /** Token expiry in Unix ms; null for anonymous connections. */
  expiresAt: number | null;
  limits: Limits;
}

export interface AckMessage {
  action: "ack";
  subscribed: ChannelPattern[];
  unsubscribed: ChannelPattern[];
  id: RequestId;
  /** History position at subscribe time: a `since` for a later reconnect. */
  cursor?: Cursor;
  /** Per subscribed pattern, when `since` was given; false: resync by other means. */
  recovered?: Record<string, boolean>;
}

export interface EventMessage<T extends string = EventType> {
  action: "event";
  channel: Channel | (string & {});
  data: EventEnvelope<T>;
  cursor: Cursor;
}

export interface ErrorMessage {
  action: "error";
  code: ErrorCode;
  message: string;
  /** The rejected channels, for subscription errors. */
  channels?: string[];
  id: RequestId;
}

export interface AuthenticatedMessage {
  action: "authenticated";
  userId: string;
  expiresAt: number;
  id: RequestId;
}

export interface PongMessage {
  action: "pong";
  id?: RequestId;
}

export interface LaggedMessage {
  action: "lagged";
  dropped: number;
  reason: LaggedReason | (string & {});
}

export interface ReconnectMessage {
  action: "reconnect";
  reason: string;
}

export type ServerMessage =
  | WelcomeMessage
  | AckMessage
  | EventMessage
  | ErrorMessage
  | AuthenticatedMessage
  | PongMessage
  | LaggedMessage
  | ReconnectMessage;
