"""The client wire protocol of SPEC §4: parse client frames, build server frames.

Pure: no I/O and no asyncio, so the parser is fuzzed with hypothesis and the
node and router are thin I/O layers around it. :func:`parse_client_message`
returns a typed message or raises :class:`ProtocolError`, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import orjson

from cluster.envelope import PRIORITY_RANK


class ErrorCode:
    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNKNOWN_ACTION = "UNKNOWN_ACTION"
    INVALID_CHANNEL = "INVALID_CHANNEL"
    FORBIDDEN = "FORBIDDEN"
    SUBSCRIPTION_LIMIT = "SUBSCRIPTION_LIMIT"
    UNAUTHORIZED = "UNAUTHORIZED"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOO_MANY_CONNECTIONS = "TOO_MANY_CONNECTIONS"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL = "INTERNAL"
    SNAPSHOT_LIMIT = "SNAPSHOT_LIMIT"  # a subscribe matched more state channels than PUSH_SNAPSHOT_MAX_CHANNELS


class CloseCode:
    NORMAL = 1000
    FLOODING = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    RECONNECT = 1012
    UNAUTHORIZED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    TOO_MANY_CONNECTIONS = 4029


MAX_CHANNELS_PER_MESSAGE = 100
MAX_REQUEST_ID = 128
MAX_TOKEN = 8192
MAX_CURSOR = 512
DELTA_FORMATS = ("fossil",)  # options.delta values (docs/DELTA.md)

RequestId = Union[str, int, None]


class ProtocolError(Exception):
    """A client frame that breaks the protocol; becomes an ``error`` message."""

    def __init__(self, code: str, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Subscribe:
    channels: tuple[str, ...]
    id: RequestId = None
    priority: int | None = None  # rank: only events of this rank or lower (0 = p0)
    limit: float | None = None  # events per second for these channels
    since: str | None = None
    snapshot: bool | None = None  # state channels: their latest values right after the ack (None: the node's default)
    delta: str | None = None  # "fossil": state channels' events as Fossil deltas of the previous one (docs/DELTA.md)
    # options.delta had another value: the node refuses the message's state-channel patterns with
    # INVALID_MESSAGE and subscribes the others (docs/DELTA.md: "for that subscription only")
    invalid_delta: bool = False


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channels: tuple[str, ...]
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Auth:
    token: str
    id: RequestId = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: RequestId = None


ClientMessage = Union[Subscribe, Unsubscribe, Auth, Ping]


def _request_id(doc: dict[str, Any]) -> RequestId:
    value = doc.get("id")
    if value is None:
        return None
    if type(value) is int or (type(value) is str and len(value) <= MAX_REQUEST_ID):
        return value
    raise ProtocolError(
        ErrorCode.INVALID_MESSAGE, f"id must be a string of at most {MAX_REQUEST_ID} characters or an integer"
    )


def _channels(doc: dict[str, Any], request_id: RequestId) -> tuple[str, ...]:
    channels = doc.get("channels")
    if type(channels) is not list or not channels:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "channels must be a non-empty list of strings", request_id)
    if len(channels) > MAX_CHANNELS_PER_MESSAGE:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"at most {MAX_CHANNELS_PER_MESSAGE} channels per message", request_id
        )
    if any(type(c) is not str for c in channels):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "channels must be strings", request_id)
    return tuple(dict.fromkeys(channels))  # de-duplicated, order kept


def _subscribe(doc: dict[str, Any], request_id: RequestId) -> Subscribe:
    channels = _channels(doc, request_id)
    options = doc.get("options")
    if options is None:
        return Subscribe(channels, request_id)
    if type(options) is not dict:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "options must be an object", request_id)
    priority = options.get("priority")
    if priority is not None and (type(priority) is not str or priority not in PRIORITY_RANK):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "options.priority must be one of p0..p3", request_id)
    limit = options.get("limit")
    if limit is not None and (type(limit) not in (int, float) or not 0 < limit <= 1_000_000):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "options.limit must be a positive number of events per second", request_id
        )
    since = options.get("since")
    if since is not None and (type(since) is not str or not 0 < len(since) <= MAX_CURSOR):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "options.since must be a cursor string", request_id)
    snapshot = options.get("snapshot")
    if snapshot is not None and type(snapshot) is not bool:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "options.snapshot must be true or false", request_id)
    delta = options.get("delta")
    invalid_delta = delta is not None and (type(delta) is not str or delta not in DELTA_FORMATS)
    return Subscribe(
        channels,
        request_id,
        None if priority is None else PRIORITY_RANK[priority],
        None if limit is None else float(limit),
        since,
        snapshot,
        None if invalid_delta else delta,
        invalid_delta,
    )


INVALID_DELTA_MESSAGE = 'options.delta must be "fossil"'


def parse_client_message(data: str | bytes) -> ClientMessage:
    """Parse one client text frame into a typed message."""
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "frame is not valid JSON") from None
    if type(doc) is not dict:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "frame must be a JSON object")
    request_id = _request_id(doc)
    action = doc.get("action")
    if type(action) is not str:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "action is required", request_id)
    if action == "subscribe":
        return _subscribe(doc, request_id)
    if action == "unsubscribe":
        return Unsubscribe(_channels(doc, request_id), request_id)
    if action == "auth":
        token = doc.get("token")
        if type(token) is not str or not 0 < len(token) <= MAX_TOKEN:
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "token must be a non-empty string", request_id)
        return Auth(token, request_id)
    if action == "ping":
        return Ping(request_id)
    raise ProtocolError(ErrorCode.UNKNOWN_ACTION, f"unknown action {action[:64]!r}", request_id)


# --- server → client -----------------------------------------------------------


def _encode(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()


def welcome(connection_id: str, node: str, user_id: str | None, expires_at: int | None, limits: dict[str, Any]) -> str:
    return _encode(
        {
            "action": "welcome",
            "connectionId": connection_id,
            "node": node,
            "userId": user_id,
            "expiresAt": expires_at,
            "limits": limits,
        }
    )


def ack(
    request_id: RequestId,
    subscribed: list[str] | tuple[str, ...] = (),
    unsubscribed: list[str] | tuple[str, ...] = (),
    recovered: dict[str, bool] | None = None,
    cursor: str | None = None,
) -> str:
    doc: dict[str, Any] = {
        "action": "ack",
        "subscribed": list(subscribed),
        "unsubscribed": list(unsubscribed),
        "id": request_id,
    }
    if cursor is not None:
        doc["cursor"] = cursor  # where history stood at subscribe time: a `since` for a later reconnect
    if recovered is not None:
        doc["recovered"] = recovered
    return _encode(doc)


def error(code: str, message: str, request_id: RequestId = None, channels: list[str] | None = None) -> str:
    doc: dict[str, Any] = {"action": "error", "code": code, "message": message}
    if channels is not None:
        doc["channels"] = channels
    doc["id"] = request_id
    return _encode(doc)


def authenticated(user_id: str, expires_at: int, request_id: RequestId = None) -> str:
    return _encode({"action": "authenticated", "userId": user_id, "expiresAt": expires_at, "id": request_id})


def pong(request_id: RequestId = None) -> str:
    return _encode({"action": "pong"} if request_id is None else {"action": "pong", "id": request_id})


def lagged(dropped: int, reason: str) -> str:
    return _encode({"action": "lagged", "dropped": dropped, "reason": reason})


def reconnect(reason: str) -> str:
    return _encode({"action": "reconnect", "reason": reason})


def event_frame(channel: str, raw_envelope: bytes, cursor: str, seq: int | None = None, snapshot: bool = False) -> bytes:
    """The ``event`` message, embedding the envelope's bytes as received (no re-encoding).

    ``seq`` is a state channel's sequence number (cluster/state.py): one more than the
    previous event of the channel, so a client sees a gap (conflation, lag, bus loss).
    ``snapshot``: the channel's latest value sent on subscribe (``"snapshot":true``), not a
    live update: its ``timestamp`` is when it was published, which may be long ago.
    """
    return b"".join(
        (
            b'{"action":"event","channel":',
            orjson.dumps(channel),
            b',"data":',
            raw_envelope,
            b',"cursor":',
            orjson.dumps(cursor),
            b"" if seq is None else b',"seq":%d' % seq,
            b',"snapshot":true}' if snapshot else b"}",
        )
    )


def delta_event_frame(channel: str, data: bytes, delta: bool, cursor: str, seq: int, snapshot: bool = False) -> bytes:
    """The ``event`` message of a delta channel (docs/DELTA.md): ``data`` is a JSON string already
    escaped (the envelope's exact text, or the Fossil delta from the envelope of ``seq - 1``)."""
    return b"".join(
        (
            b'{"action":"event","channel":',
            orjson.dumps(channel),
            b',"delta":true,"data":' if delta else b',"delta":false,"data":',
            data,
            b',"cursor":',
            orjson.dumps(cursor),
            b',"seq":%d' % seq,
            b',"snapshot":true}' if snapshot else b"}",
        )
    )


# --- the client side: what clients send, and one parser for what they receive ----------
#
# PushClient, the locust users and the tests speak the protocol through these, so the
# wire format is written once for both sides (the browser client mirrors them in JS).


def subscribe_request(
    channels: list[str] | tuple[str, ...],
    request_id: RequestId = None,
    *,
    priority: str | None = None,
    limit: float | None = None,
    since: str | None = None,
    snapshot: bool | None = None,
    delta: str | None = None,
) -> str:
    options: dict[str, Any] = {}
    if snapshot is not None:
        options["snapshot"] = snapshot
    if delta is not None:
        options["delta"] = delta
    if priority is not None:
        options["priority"] = priority
    if limit is not None:
        options["limit"] = limit
    if since is not None:
        options["since"] = since
    doc: dict[str, Any] = {"action": "subscribe", "channels": list(channels)}
    if options:
        doc["options"] = options
    if request_id is not None:
        doc["id"] = request_id
    return _encode(doc)


def unsubscribe_request(channels: list[str] | tuple[str, ...], request_id: RequestId = None) -> str:
    doc: dict[str, Any] = {"action": "unsubscribe", "channels": list(channels)}
    if request_id is not None:
        doc["id"] = request_id
    return _encode(doc)


def auth_request(token: str, request_id: RequestId = None) -> str:
    return _encode(
        {"action": "auth", "token": token}
        if request_id is None
        else {"action": "auth", "token": token, "id": request_id}
    )


def ping_request(request_id: RequestId = None) -> str:
    return _encode({"action": "ping"} if request_id is None else {"action": "ping", "id": request_id})


@dataclass(frozen=True, slots=True)
class ServerMessage:
    """A message from the server; ``doc`` is the whole decoded object (what callbacks receive)."""

    action: str
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Welcome(ServerMessage):
    connection_id: str = ""
    node: str = ""
    user_id: str | None = None
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class Ack(ServerMessage):
    id: RequestId = None
    subscribed: tuple[str, ...] = ()
    unsubscribed: tuple[str, ...] = ()
    recovered: dict[str, bool] | None = None
    cursor: str | None = None

    @property
    def unrecovered(self) -> list[str]:
        """Channels the node could not replay (``recovered: false``): the client must resync them."""
        return [name for name, ok in (self.recovered or {}).items() if not ok]


@dataclass(frozen=True, slots=True)
class Event(ServerMessage):
    channel: str = ""
    data: dict[str, Any] | None = None  # None on a delta channel: see ``text``
    cursor: str | None = None
    seq: int | None = None  # state channels: consecutive per channel; a jump is a gap
    # delta channels (docs/DELTA.md): ``data`` is a string, kept in ``text``: the envelope's exact
    # JSON text (``delta`` False) or a Fossil delta from the previous envelope (``delta`` True)
    delta: bool | None = None
    text: str | None = None
    snapshot: bool = False  # the channel's latest value sent on subscribe, not a live update

    @property
    def event_id(self) -> str | None:
        return self.data.get("id") if self.data else None


@dataclass(frozen=True, slots=True)
class ErrorMessage(ServerMessage):
    code: str = ""
    message: str = ""
    id: RequestId = None
    channels: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Authenticated(ServerMessage):
    user_id: str = ""
    expires_at: int | None = None


@dataclass(frozen=True, slots=True)
class Lagged(ServerMessage):
    dropped: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Reconnect(ServerMessage):
    reason: str = ""


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(item for item in value if isinstance(item, str)) if isinstance(value, list) else ()


def parse_server_message(data: str | bytes) -> ServerMessage:
    """Parse one server text frame; an action this client does not know comes back as a plain ``ServerMessage``.

    Raises :class:`ProtocolError` (INVALID_JSON / INVALID_MESSAGE) for a frame that is not a
    JSON object with a string ``action``: a broken server or proxy, not something to act on.
    """
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_JSON, "server frame is not valid JSON") from None
    if type(doc) is not dict or type(doc.get("action")) is not str:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "server frame must be a JSON object with an action")
    action: str = doc["action"]
    get = doc.get
    if action == "event":
        envelope = get("data")
        seq = get("seq")
        delta = get("delta")
        return Event(
            action,
            doc,
            str(get("channel", "")),
            envelope if isinstance(envelope, dict) else None,
            get("cursor"),
            seq if type(seq) is int else None,
            delta if type(delta) is bool else None,
            envelope if type(envelope) is str else None,
            get("snapshot") is True,
        )
    if action == "ack":
        recovered = get("recovered")
        return Ack(
            action,
            doc,
            get("id"),
            _strings(get("subscribed")),
            _strings(get("unsubscribed")),
            recovered if isinstance(recovered, dict) else None,
            get("cursor"),
        )
    if action == "welcome":
        return Welcome(action, doc, str(get("connectionId", "")), str(get("node", "")), get("userId"), get("expiresAt"))
    if action == "error":
        return ErrorMessage(action, doc, str(get("code", "")), str(get("message", "")), get("id"), _strings(get("channels")))
    if action == "authenticated":
        return Authenticated(action, doc, str(get("userId", "")), get("expiresAt"))
    if action == "lagged":
        dropped = get("dropped")
        return Lagged(action, doc, dropped if type(dropped) is int else 0, str(get("reason", "")))
    if action == "reconnect":
        return Reconnect(action, doc, str(get("reason", "")))
    return ServerMessage(action, doc)
