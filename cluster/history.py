"""Bounded per-channel history for recovery (SPEC §8), and cursors.

Publishing through the SDK runs one Lua script that appends the envelope to the
channel's Redis stream and PUBLISHes it, so history and the live stream never
disagree. Every entry gets a cluster-wide position ``<ms>-<seq>`` (server clock,
never going back, and one global sequence), so entries of different channels
order the same way everywhere. Streams keep at most ``history_size`` entries
and ``history_seconds`` of time; expired events (ttl) are filtered on replay.

A cursor names the last event a client saw: ``<epoch>:<channel>:<event id>``;
a subscribe ack carries a position cursor ``<epoch>:@<ms>-<seq>`` (the history's
position at that moment) so that a client that has seen no event yet can still
recover. The epoch is a random value stored in Redis: when Redis restarts or is
flushed it changes, and old cursors are known to be unrecoverable.

Non-Python publishers get history by running the same script (``PUBLISH_SCRIPT``)
with EVALSHA/EVAL; see docs/RECOVERY.md for its keys and arguments.

On a Redis Cluster every script must stay in one slot, so history is kept per
channel: the stream is ``push:history:{<channel>}`` (the channel is its hash
tag), its entry ids come from XADD on the owning shard (``<ms>-<seq>``, exact per
channel), and ``CLUSTER_PUBLISH_SCRIPT`` writes it alone; the SDK publishes the
live message after it (:mod:`cluster.shard_publish`). Channels of different
shards then order by the shards' clocks: recovery is exact per channel and in
time order across channels. The epoch stays one key (``push:epoch``).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import redis.asyncio as aioredis

from cluster.bus_routing import ADMIN_CHANNEL, EVENTS_PREFIX, user_channel
from cluster.channels import ChannelError, Pattern, parse_channel
from cluster.redis_url import AsyncClient
from cluster.state import state_key, state_set_key

EPOCH_KEY = "push:epoch"
SEQ_KEY = "push:history:seq"
CLOCK_KEY = "push:history:clock"
STREAM_PREFIX = "push:history:stream:"
CHANNELS_PREFIX = "push:history:channels:"
CLUSTER_STREAM_PREFIX = "push:history:{"  # + channel + "}": one slot per channel on a Redis Cluster
SCAN_BATCH = 200
MAX_STREAM_SEQ = 2**64 - 1

PUBLISH_SCRIPT = """
-- KEYS: 1 stream of the channel, 2 channel set of the domain, 3 sequence, 4 clock, 5 epoch,
--       6 and 7 (state channels only, cluster/state.py): the channel's state hash, the type's state set
-- ARGV: 1 bus channel (events:<channel>, or push:user:{<userId>} for a private event),
--       2 envelope JSON, 3 event id, 4 channel, 5 max events per channel, 6 retention ms,
--       7 epoch to create if there is none,
--       8 push:admin for a private event ('' or absent otherwise): then ARGV[1] and ARGV[8] both
--         get the routed message "<channel> <envelope>" instead of the bare envelope,
--       9 (state channels) ms the latest value is kept
-- A state channel's envelope gets its sequence number as a last field ("seq":N) everywhere it
-- goes; the script then returns {receivers, seq}, else the receivers PUBLISH counted.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local last = tonumber(redis.call('GET', KEYS[4]) or '0')
if now < last then now = last end
redis.call('SET', KEYS[4], now)
redis.call('SET', KEYS[5], ARGV[7], 'NX')
local seq = redis.call('INCR', KEYS[3])
local retention = tonumber(ARGV[6])
local message = ARGV[2]
local state_seq = 0
if KEYS[6] then
  state_seq = redis.call('HINCRBY', KEYS[6], 's', 1)
  message = string.sub(ARGV[2], 1, -2) .. ',"seq":' .. state_seq .. '}'
  redis.call('HSET', KEYS[6], 'e', message)
  redis.call('PEXPIRE', KEYS[6], ARGV[9])
  redis.call('SADD', KEYS[7], ARGV[4])
  redis.call('PEXPIRE', KEYS[7], ARGV[9])
end
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], now .. '-' .. seq, 'i', ARGV[3], 'e', message)
redis.call('XTRIM', KEYS[1], 'MINID', now - retention)
redis.call('PEXPIRE', KEYS[1], retention)
redis.call('SADD', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[2], retention)
local receivers
if ARGV[8] and ARGV[8] ~= '' then
  local routed = ARGV[4] .. ' ' .. message
  receivers = redis.call('PUBLISH', ARGV[1], routed) + redis.call('PUBLISH', ARGV[8], routed)
else
  receivers = redis.call('PUBLISH', ARGV[1], message)
end
if KEYS[6] then return {receivers, state_seq} end
return receivers
"""


CLUSTER_PUBLISH_SCRIPT = """
-- Redis Cluster: KEYS: 1 stream of the channel (push:history:{<channel>}),
--                      2 (state channels only) its state hash (push:state:{<channel>})
-- ARGV: 1 envelope JSON, 2 event id, 3 max events per channel, 4 retention ms,
--       5 (state channels) ms the latest value is kept
-- Only stores, and returns the state sequence number (0 for other channels; the stored
-- envelope then ends with "seq":N); the caller publishes the live message afterwards
-- (cluster/shard_publish.py), with the same "seq" (cluster.state.with_seq).
local retention = tonumber(ARGV[4])
local state_seq = 0
local envelope = ARGV[1]
if KEYS[2] then
  state_seq = redis.call('HINCRBY', KEYS[2], 's', 1)
  envelope = string.sub(ARGV[1], 1, -2) .. ',"seq":' .. state_seq .. '}'
  redis.call('HSET', KEYS[2], 'e', envelope)
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'i', ARGV[2], 'e', envelope)
local ms = tonumber(string.match(id, '^(%d+)'))
redis.call('XTRIM', KEYS[1], 'MINID', ms - retention)
redis.call('PEXPIRE', KEYS[1], retention)
return state_seq
"""


def cluster_stream_key(channel: str) -> str:
    return f"{CLUSTER_STREAM_PREFIX}{channel}}}"


def channels_key(channel: str) -> str:
    """The set listing the channels of ``channel``'s domain that have history."""
    return CHANNELS_PREFIX + channel.partition(".")[0]


def make_cursor(epoch: str, channel: str, event_id: str) -> str:
    return f"{epoch}:{channel}:{event_id}"


@dataclass(frozen=True, slots=True)
class Cursor:
    epoch: str
    channel: str = ""
    event_id: str = ""
    position: bytes = b""  # set for position cursors: a stream id every later entry exceeds


def parse_cursor(text: str) -> Cursor | None:
    """The parts of a cursor, or None if it is not one of ours."""
    epoch, sep, rest = text.partition(":")
    if sep and epoch and rest.startswith("@"):
        ms, dash, seq = rest[1:].partition("-")
        if dash and ms.isdigit() and seq.isdigit():
            return Cursor(epoch, position=f"{int(ms)}-{int(seq)}".encode())
        return None
    channel, sep2, event_id = rest.rpartition(":")
    if not (sep and sep2 and epoch and event_id):
        return None
    try:
        parse_channel(channel)
    except ChannelError:
        return None
    return Cursor(epoch, channel, event_id)


def publish_keys(channel: str, state: bool = False) -> list[str]:
    keys = [STREAM_PREFIX + channel, channels_key(channel), SEQ_KEY, CLOCK_KEY, EPOCH_KEY]
    if state:
        keys += [state_key(channel, cluster=False), state_set_key(channel.partition(":")[0])]
    return keys


def publish_args(
    channel: str,
    envelope: bytes,
    event_id: str,
    max_events: int,
    retention_seconds: int,
    user_id: str | None = None,
    state_seconds: int | None = None,
) -> list[object]:
    """The script's arguments: a private event goes to its user's channel and ``push:admin`` (SPEC §3);
    ``state_seconds`` for a state channel (its keys from ``publish_keys(channel, state=True)``)."""
    args: list[object] = [
        EVENTS_PREFIX + channel if user_id is None else user_channel(user_id),
        envelope,
        event_id,
        channel,
        max_events,
        retention_seconds * 1000,
        secrets.token_hex(4),
        ADMIN_CHANNEL if user_id is not None else "",
    ]
    if state_seconds is not None:
        args.append(state_seconds * 1000)
    return args


def _position(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq)


@dataclass(frozen=True, slots=True)
class Replay:
    """What history holds after a cursor: ``recovered`` False means a gap."""

    recovered: bool
    events: list[tuple[str, bytes]]  # (channel, envelope JSON), oldest first


LOST = Replay(False, [])


class History:
    """Reads history for recovery on a node."""

    def __init__(self, client: AsyncClient, max_events: int, *, cluster: bool = False) -> None:
        self._client = client
        self.max_events = max_events
        self.cluster = cluster

    def stream_key(self, channel: str) -> str:
        return cluster_stream_key(channel) if self.cluster else STREAM_PREFIX + channel

    async def epoch(self) -> str:
        value = await self._client.get(EPOCH_KEY)
        return value.decode() if value else ""

    async def position(self) -> str | None:
        """A position cursor for "now": every event published later is after it."""
        if self.cluster:  # per-channel ids: every entry from this millisecond on is after it
            epoch = await self._client.get(EPOCH_KEY)
            seconds, micros = await self._client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            return f"{epoch.decode()}:@{now_ms - 1}-{MAX_STREAM_SEQ}" if epoch else None
        epoch, clock, seq = await self._client.mget(EPOCH_KEY, CLOCK_KEY, SEQ_KEY)
        if not epoch:
            return None
        return f"{epoch.decode()}:@{int(clock or 0)}-{int(seq or 0)}"

    async def locate(self, cursor: Cursor) -> bytes | None:
        """The stream position of the cursor's event, scanning back from the newest."""
        key = self.stream_key(cursor.channel)
        wanted = cursor.event_id.encode()
        end: bytes | str = "+"
        scanned = 0
        while scanned < self.max_events:
            entries = await self._client.xrevrange(key, max=end, min="-", count=SCAN_BATCH)
            if not entries:
                return None
            for entry_id, fields in entries:
                if fields.get(b"i") == wanted:
                    return entry_id
            scanned += len(entries)
            end = b"(" + entries[-1][0]
        return None

    async def channels(self, pattern: Pattern) -> list[str]:
        """Channels with history that ``pattern`` matches."""
        if pattern.domain is not None:
            keys = [CHANNELS_PREFIX + pattern.domain]
        else:
            keys = [key.decode() async for key in self._client.scan_iter(match=CHANNELS_PREFIX + "*", count=500)]
        found: list[str] = []
        for key in keys:
            for raw in await self._client.smembers(key):
                name = raw.decode()
                try:
                    channel = parse_channel(name)
                except ChannelError:
                    continue
                if pattern.matches(channel):
                    found.append(name)
        return found

    async def after(self, cursor: Cursor, patterns: list[Pattern], limit: int | None = None) -> dict[Pattern, Replay]:
        """For each pattern, the events after ``cursor`` on every channel it matches (at most ``limit``)."""
        if not cursor.epoch or cursor.epoch != await self.epoch():
            return {p: LOST for p in patterns}
        position = cursor.position or await self.locate(cursor)
        if not position:
            return {p: LOST for p in patterns}
        start = _position(position)
        result: dict[Pattern, Replay] = {}
        for pattern in patterns:
            result[pattern] = await self._replay(pattern, position, start, limit or self.max_events)
        return result

    async def _replay(self, pattern: Pattern, position: bytes, start: tuple[int, int], limit: int) -> Replay:
        merged: list[tuple[tuple[int, int], str, bytes]] = []
        for name in await self.channels(pattern):
            key = self.stream_key(name)
            pipe = self._client.pipeline(transaction=False)
            pipe.xinfo_stream(key)
            pipe.xrange(key, min=b"(" + position, max="+", count=limit + 1)
            try:
                info, entries = await pipe.execute()
            except aioredis.ResponseError:
                continue  # the stream expired between listing and reading: nothing newer
            deleted = info.get("max-deleted-entry-id") or info.get(b"max-deleted-entry-id")
            if deleted and _position(deleted if isinstance(deleted, bytes) else str(deleted).encode()) > start:
                return LOST  # entries newer than the cursor were trimmed away
            if len(entries) > limit:
                return LOST
            merged.extend((_position(entry_id), name, fields[b"e"]) for entry_id, fields in entries)
        merged.sort(key=lambda item: item[0])
        if len(merged) > limit:
            return LOST
        return Replay(True, [(name, envelope) for _, name, envelope in merged])
