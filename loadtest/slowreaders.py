"""Readers that cannot keep up, for the bench's slow-reader workload (issue 13).

:class:`~loadtest.wsclient.BenchWebSocket` reads 100,000 frames per second on one
core without decoding them, so the servers never see a backlog. Real fan-out at the
open is read by clients that are slower than the server writes; two kinds here:

- :class:`AiohttpReader`: one ``aiohttp`` ``ws_connect`` per connection and a
  ``receive()`` loop that decodes every frame with orjson — what a Python service
  subscribing to the feed does. At 2,000 × 50 events/s it saturates the load
  generator's core, so how slow it is depends on that core's speed.
- :class:`ThrottledWebSocket`: the fast protocol client, which after every read
  pauses the transport for as long as reading its events at ``read_rate`` events/s
  would take, on a socket with a small receive buffer (:data:`THROTTLED_RCVBUF`), so
  that one read is a few dozen frames rather than a quarter megabyte and the
  backlog piles up where a slow remote client leaves it: in the server's socket
  and queues. It is the same on any machine.

Both speak to a delta-push node (welcome, subscribe/ack, events in the
``{"action":"event",...}`` envelope, ``lagged`` notices, close codes such as 4008)
or to Nchan (every data frame is one published envelope, subscribed on upgrade),
and count into the same :class:`~loadtest.wsclient.Stats` as the fast client.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import aiohttp
import orjson
from yarl import URL

from loadtest.wsclient import BenchWebSocket, Stats

SLOW_READERS = ("aiohttp", "sleep")
THROTTLED_RCVBUF = 32768  # SO_RCVBUF of the sleep reader (Linux doubles it): ~80 frames, ~2 s of reading, per read


class AiohttpReader:
    """One aiohttp WebSocket client whose ``receive()`` loop decodes every frame, as an application would."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        stats: Stats,
        *,
        nchan: bool = False,
        subscribe: bytes | None = None,
        probe: bool = False,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.stats = stats
        self.nchan = nchan
        self.subscribe_message = subscribe
        self.probe = probe
        self.welcomed: asyncio.Future[float] = loop.create_future()
        self.subscribed: asyncio.Future[float] = loop.create_future()
        self.close_code: int | None = None
        self._task = loop.create_task(self._run(session, url))

    async def _run(self, session: aiohttp.ClientSession, url: str) -> None:
        try:
            ws = await session.ws_connect(URL(url, encoded=True), autoping=True, heartbeat=None, max_msg_size=1 << 20)
        except (aiohttp.ClientError, OSError) as exc:
            self._fail(ConnectionError(f"connect failed: {type(exc).__name__}"))
            return
        if self.nchan:
            self._ready(self.welcomed, self.subscribed)
        while True:
            msg = await ws.receive()
            if msg.type is aiohttp.WSMsgType.TEXT or msg.type is aiohttp.WSMsgType.BINARY:
                doc = orjson.loads(msg.data)
                if self.nchan:
                    self._event(doc)
                    continue
                action = doc.get("action")
                if action == "event":
                    self._event(doc["data"])
                elif action == "welcome":
                    self._ready(self.welcomed)
                    if self.subscribe_message is None:
                        self._ready(self.subscribed)
                    else:
                        await ws.send_str(self.subscribe_message.decode())
                elif action == "ack":
                    self._ready(self.subscribed)
                elif action == "lagged":
                    self.stats.lagged += int(doc.get("dropped", 0))
                    self.stats.lagged_notices += 1
                elif action == "error":
                    self.stats.error(str(doc.get("code")))
            elif msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                break
            elif msg.type is aiohttp.WSMsgType.ERROR:
                self.stats.error(f"receive: {type(msg.data).__name__}")
                break
        # Only the server ends the loop (the bench cancels the task instead), so this is its close code.
        self.close_code = ws.close_code
        self.stats.closed[self.close_code] = self.stats.closed.get(self.close_code, 0) + 1
        self._fail(ConnectionError(f"closed by the server (close code {self.close_code})"))

    def _event(self, envelope: dict[str, Any]) -> None:
        self.stats.delivered += 1
        if self.probe:
            self.stats.latencies_us.append(time.time_ns() // 1000 - int(envelope["payload"]["tsUs"]))

    @staticmethod
    def _ready(*futures: asyncio.Future[float]) -> None:
        now = time.monotonic()
        for future in futures:
            if not future.done():
                future.set_result(now)

    def _fail(self, failure: Exception) -> None:
        for future in (self.welcomed, self.subscribed):
            if not future.done():
                future.set_exception(failure)
                future.exception()  # retrieved: a failed connection is counted, not raised later

    def close(self) -> None:
        """Stop reading; the socket itself is closed with the session (:func:`close_session`)."""
        self._task.cancel()


class ThrottledWebSocket(BenchWebSocket):
    """The fast client, reading at most ``read_rate`` events/s: after each read it pauses for what it read."""

    def __init__(self, *args: Any, read_rate: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_rate = read_rate
        self._resume: asyncio.TimerHandle | None = None
        self._read_until = 0.0  # loop time by which what was read so far "has been processed"
        self._pending = 0  # events read but still "being processed": counted when the pause ends

    def data_received(self, data: bytes) -> None:
        before = self.delivered
        super().data_received(data)
        got = self.delivered - before
        transport = self.transport
        if got:
            # Counted when processed, not when read: a read is ~20 events, and counting them at once would let
            # any window see up to one read more than read_rate allows (more for servers with smaller frames).
            self.delivered -= got
            self.stats.delivered -= got
            self._pending += got
        if got and transport is not None and not transport.is_closing():
            # An absolute deadline, not call_later: the loop's clock is read once per iteration, so relative
            # pauses end early by however long the iteration has run and the reader would outpace read_rate.
            loop = asyncio.get_running_loop()
            self._read_until = max(self._read_until, loop.time()) + got / self.read_rate
            transport.pause_reading()
            self._resume = loop.call_at(self._read_until, self._resume_reading)

    def _resume_reading(self) -> None:
        self._resume = None
        self.delivered += self._pending
        self.stats.delivered += self._pending
        self._pending = 0
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        super().close()


def new_session() -> aiohttp.ClientSession:
    """One session for every reader: no connection limit, no per-read timeout."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=None, connect=30),
    )


async def close_session(session: aiohttp.ClientSession, readers: list[Any]) -> None:
    """Cancel every reader and drop its socket without a closing handshake (a backlog could take seconds to drain)."""
    for reader in readers:
        reader.close()
    await asyncio.sleep(0)
    await session.close()  # the connector aborts the connections it handed out


async def open_throttled(
    host: str,
    port: int,
    path: str,
    stats: Stats,
    *,
    read_rate: float,
    nchan: bool = False,
    subscribe: bytes | None = None,
    probe: bool = False,
) -> ThrottledWebSocket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, THROTTLED_RCVBUF)  # before connect: sets the window
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        _, protocol = await loop.create_connection(
            lambda: ThrottledWebSocket(
                host, port, path, stats, nchan=nchan, subscribe=subscribe, probe=probe, read_rate=read_rate
            ),
            sock=sock,
        )
    except BaseException:
        sock.close()
        raise
    return protocol
