"""The one reconnect pacing (cluster/backoff.py): full jitter under a doubling, capped ceiling."""

from __future__ import annotations

from cluster.backoff import Backoff


def test_waits_stay_under_a_doubling_ceiling_that_stops_at_the_cap() -> None:
    backoff = Backoff(0.1, 1.0)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    for ceiling in ceilings:
        assert 0 <= backoff.next() <= ceiling
    assert max(backoff.next() for _ in range(2000)) > 0.9  # jitter spans the whole window


def test_reset_starts_again_from_the_first_ceiling() -> None:
    backoff = Backoff(0.1, 5.0)
    for _ in range(10):
        backoff.next()
    backoff.reset()
    assert backoff.next() <= 0.1
    assert backoff.next() <= 0.2


async def test_the_reconnect_loop_says_a_loss_once_and_knows_a_reconnect() -> None:
    import asyncio

    from cluster.backoff import Reconnection, keep_connected

    losses: list[bool] = []
    reconnects: list[bool] = []
    attempts = 0

    async def session(reconnection: Reconnection) -> None:
        nonlocal attempts
        attempts += 1
        if attempts in (1, 2, 4):
            raise ConnectionError("Redis is away")
        reconnects.append(reconnection.connected())
        if attempts == 3:
            raise ConnectionError("lost again after being up")
        await asyncio.Event().wait()  # up for good

    loop = asyncio.create_task(
        keep_connected(session, (ConnectionError,), lambda exc, first: losses.append(first), Backoff(0.001, 0.002))
    )
    while attempts < 5:
        await asyncio.sleep(0.01)
    loop.cancel()
    assert losses == [True, False, True, False]  # said once per outage
    assert reconnects == [True, True]
