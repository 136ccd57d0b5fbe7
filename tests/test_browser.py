"""The live event page in a real headless Chromium (issue 8), against real processes.

A real ``redis-server``, ``pushctl node`` processes and a ``pushctl router``; the
page is opened from the router as a new user would (``/?token=…``), events are
published with ``pushctl publish`` and the SDK, nodes are stopped with SIGTERM,
and what the page shows is compared with what was published. Chromium is
Debian's ``chromium`` package driven by Playwright for Python (``.ci/run``
installs it when it is missing); screenshots go to /tmp.
"""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from conftest import JWT_SECRET, PUSHCTL, ROOT, node_env, publish

from cluster.auth import issue_token

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1600, "height": 900}
PHONE = {"width": 420, "height": 860}
SHOTS = Path("/tmp")

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is missing: the browser tests need Debian's chromium (.ci/run installs it)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser: Any) -> Iterator[Any]:
    """open_page(url) -> a fresh page (its own context: no storage shared between tests)."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_(url: str, viewport: dict[str, int] = VIEWPORT) -> Any:
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


def pushctl_publish(redis_url: str, event_type: str, payload: dict[str, Any], *args: str) -> dict[str, Any]:
    """Publish one event with `pushctl publish`; returns the envelope it printed."""
    result = subprocess.run(
        [*PUSHCTL, "publish", event_type, "--payload", orjson.dumps(payload).decode(), "--redis-url", redis_url, *args],
        cwd=ROOT,
        env=node_env(),
        capture_output=True,
        timeout=30,
        check=True,
    )
    return orjson.loads(result.stdout)


def page_url(router: Any, user: str, ttl: int = 3600, channels: str = "market.ticker,order.*,risk.*") -> str:
    token = issue_token(JWT_SECRET, user, ttl_seconds=ttl)
    return f"{router.http}/?token={token}&channels={channels}"


def shown_ids(page: Any, selector: str) -> list[str]:
    """Event ids of the rows matching ``selector``, top (newest) first."""
    return page.eval_on_selector_all(selector, "rows => rows.map(r => r.dataset.eventId)")


def wait_live(page: Any, timeout: float = 10.0) -> str:
    """Wait until the page is connected and its subscriptions are acknowledged; returns the node id."""
    page.wait_for_selector('#state[data-state="connected"]', timeout=timeout * 1000)
    page.wait_for_function(
        "() => document.querySelectorAll('#subscriptions .sub').length > 0 && "
        "[...document.querySelectorAll('#subscriptions .sub')].every(s => !s.classList.contains('sub-pending'))",
        timeout=timeout * 1000,
    )
    return page.inner_text("#node")


def test_page_served_by_the_router_connects_and_shows_published_events(
    start_node, start_router, open_page, private_redis
):
    # a Redis of its own: "market.ticker" would first show every ticker other tests left (their latest values)
    node = start_node("web-1", redis=private_redis)
    router = start_router(redis=private_redis)
    page = open_page(router.http + "/")  # a new user: the page, a token to paste, Connect
    assert page.get_attribute("#state", "data-state") == "idle"
    page.fill("#token", issue_token(JWT_SECRET, "alice", ttl_seconds=3600))
    page.click("#connect")
    assert wait_live(page) == "web-1"
    assert page.inner_text("#user") == "alice"

    ticker = pushctl_publish(node.redis_url, "market.ticker", {"price": 64210.5, "changePct": 1.2}, "--key", "BTC/USDT")
    fill = pushctl_publish(
        node.redis_url, "order.filled", {"orderId": "o-1", "symbol": "BTC/USDT", "qty": 0.25}, "--user", "alice",
        "--priority", "p1",
    )
    alert = pushctl_publish(node.redis_url, "risk.alert", {"message": "margin 92%"}, "--user", "alice", "--priority", "p0")
    other = pushctl_publish(node.redis_url, "order.filled", {"orderId": "not-yours"}, "--user", "bob")

    page.wait_for_selector(f'#orders [data-event-id="{fill["id"]}"]')
    page.wait_for_selector(f'#risk [data-event-id="{alert["id"]}"][data-priority="p0"]')
    tile = page.wait_for_selector('#tickers .tile[data-channel="market.ticker:BTC/USDT"]')
    assert tile.get_attribute("data-event-id") == ticker["id"]
    assert "64,210.5" in tile.inner_text()
    assert "o-1" in page.inner_text(f'#orders [data-event-id="{fill["id"]}"]')

    # a ticker updates its tile in place; nothing of another user's shows
    update = pushctl_publish(node.redis_url, "market.ticker", {"price": 64300}, "--key", "BTC/USDT")
    page.wait_for_selector(f'#tickers .tile[data-event-id="{update["id"]}"]')
    assert page.locator("#tickers .tile").count() == 1
    assert page.locator("#tickers .tile").get_attribute("data-updates") == "2"
    assert page.locator(f'[data-event-id="{other["id"]}"]').count() == 0
    assert page.inner_text("#count-events") == "4"
    page.screenshot(path=str(SHOTS / "delta-push-browser-live.png"))


def test_page_fits_a_phone_width_without_sideways_scroll(start_node, start_router, open_page, private_redis):
    node = start_node("web-phone", redis=private_redis)  # only this test's ticker on the page
    router = start_router(redis=private_redis)
    page = open_page(page_url(router, "frank"), viewport=PHONE)
    wait_live(page)
    fill = pushctl_publish(
        node.redis_url, "order.filled", {"orderId": "o-" + "9" * 40, "symbol": "BTC/USDT", "note": "x" * 200},
        "--user", "frank",
    )
    pushctl_publish(node.redis_url, "market.ticker", {"price": 64210.5, "changePct": -0.4}, "--key", "BTC/USDT")
    page.wait_for_selector(f'#orders [data-event-id="{fill["id"]}"]')
    page.wait_for_selector("#tickers .tile")
    widths = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert widths[0] <= widths[1] <= PHONE["width"], f"the page scrolls sideways: {widths}"
    box = page.locator(".panel.connection").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    assert page.locator("#log .entry").first.is_visible()
    page.screenshot(path=str(SHOTS / "delta-push-browser-phone.png"), full_page=True)


def test_page_follows_a_draining_node_and_shows_the_events_published_meanwhile_once(
    start_node, start_router, open_page
):
    nodes = {node.node_id: node for node in (start_node("web-a"), start_node("web-b"))}
    router = start_router()
    page = open_page(page_url(router, "carol", channels="order.*"))
    assert "token=" not in page.url, "the token is taken out of the address bar"
    first_node = wait_live(page)
    redis_url = nodes[first_node].redis_url

    published: list[str] = []
    stop = threading.Event()

    def stream() -> None:  # a steady stream across the switch-over, so some events land in the gap
        n = 0
        while not stop.is_set():
            published.append(publish(redis_url, "order.filled", {"n": n}, user_id="carol")["id"])
            n += 1
            time.sleep(0.02)

    before = pushctl_publish(redis_url, "order.filled", {"step": "before"}, "--user", "carol")
    page.wait_for_selector(f'[data-event-id="{before["id"]}"]')
    publisher = threading.Thread(target=stream, daemon=True)
    publisher.start()
    try:
        nodes[first_node].stop(signal.SIGTERM)  # drains: reconnect + 1012, then exits
        meanwhile = pushctl_publish(redis_url, "order.filled", {"step": "meanwhile"}, "--user", "carol")
        page.wait_for_function(f"() => document.getElementById('node').textContent !== {first_node!r}", timeout=10_000)
        wait_live(page)
        time.sleep(0.5)
    finally:
        stop.set()
        publisher.join(5)
    after = pushctl_publish(redis_url, "order.filled", {"step": "after"}, "--user", "carol")
    page.wait_for_selector(f'[data-event-id="{after["id"]}"]')

    expected = [before["id"], *published, after["id"]]
    shown = shown_ids(page, "#orders .row")
    assert meanwhile["id"] in shown
    shown.remove(meanwhile["id"])  # published from another process: its place among the stream is not fixed
    assert len(shown) == len(set(shown)), "an event was shown twice"
    assert list(reversed(shown)) == expected, "events missing or out of order across the switch-over"
    assert page.inner_text("#node") != first_node
    assert int(page.inner_text("#count-reconnects")) == 1
    assert int(page.inner_text("#count-recovered")) >= 1, "the new node resumed the subscription from its cursor"
    log = page.inner_text("#log")
    assert "asked to reconnect" in log and "resumed from cursor" in log
    page.screenshot(path=str(SHOTS / "delta-push-browser-reconnected.png"))


def test_page_shows_drops_and_lost_history(start_node, start_router, open_page, private_redis):
    slow = {"PUSH_QUEUE_SIZE": "5", "PUSH_EVENTS_PER_SECOND": "2", "PUSH_EVENTS_BURST": "1"}
    node = start_node("web-slow", redis=private_redis, **slow)
    router = start_router(redis=private_redis)
    page = open_page(page_url(router, "erin", channels="order.*"))
    wait_live(page)
    for n in range(30):
        publish(private_redis.url, "order.filled", {"n": n}, user_id="erin", priority="p3")
    page.wait_for_function("() => Number(document.getElementById('count-dropped').textContent) > 0")
    assert "queue_full" in page.inner_text("#log")

    # Redis loses the history while the page is away: it comes back to recovered: false
    node.stop(signal.SIGTERM)
    redis.Redis.from_url(private_redis.url).flushall()
    node.start()
    banner = page.wait_for_selector("#banner:not([hidden])", timeout=15_000)
    assert "recovered: false for order.*" in banner.inner_text()
    page.wait_for_selector('#subscriptions .sub-unrecovered[data-pattern="order.*"]')
    assert page.inner_text("#count-unrecovered") == "1"
    page.screenshot(path=str(SHOTS / "delta-push-browser-drops.png"))


@pytest.mark.parametrize("ttl", [2, -60], ids=["expires-while-connected", "already-expired"])
def test_expired_token_without_refresh_shows_the_4001_reason(start_node, start_router, open_page, ttl):
    start_node("web-exp")
    router = start_router()
    page = open_page(page_url(router, "dave", ttl=ttl))
    if ttl > 0:
        wait_live(page)
    banner = page.wait_for_selector('#banner[data-code="4001"]', timeout=(max(ttl, 0) + 8) * 1000)
    text = banner.inner_text()
    assert "close 4001" in text and "TOKEN_EXPIRED" in text, text
    assert page.get_attribute("#state", "data-state") == "closed"
    time.sleep(0.5)
    assert page.get_attribute("#state", "data-state") == "closed", "no retry with a token that cannot work"
    assert "4001" in page.inner_text("#log")
    page.screenshot(path=str(SHOTS / f"delta-push-browser-expired-{'live' if ttl > 0 else 'at-connect'}.png"))


BROWSER_BOOKS = """async (url) => {
  const { DeltaPush } = await import("/web/delta-push.js");
  window.__deltaFrames = 0;
  class CountingWebSocket extends WebSocket {  // counts the delta frames the node really sent
    constructor(...args) {
      super(...args);
      this.addEventListener("message", (e) => {
        if (typeof e.data === "string" && e.data.includes('"delta":true')) window.__deltaFrames += 1;
      });
    }
  }
  window.__books = { full: [], delta: [], gaps: [] };
  window.__clients = [];
  for (const mode of ["full", "delta"]) {
    const client = new DeltaPush({ url, WebSocket: CountingWebSocket, onGap: (gap) => window.__books.gaps.push(gap) });
    client.subscribe("market.orderbook:WEB/D", (event) => window.__books[mode].push(event),
                     mode === "delta" ? { delta: "fossil" } : {});
    client.connect();
    window.__clients.push(client);
  }
}"""


def test_browser_delta_subscriber_ends_with_the_same_payloads_as_a_full_subscriber(start_node, start_router, open_page):
    """Issue 15: web/delta-push.js on a `delta: "fossil"` subscription, in Chromium, against a real node."""
    import random

    from fossil_fixtures import next_book, order_book

    node = start_node("web-delta")
    router = start_router()
    page = open_page(router.http + "/")
    page.evaluate(BROWSER_BOOKS, node.url)
    page.wait_for_function("() => window.__clients.every((c) => c.subscriptions.every((s) => s.acked))", timeout=10_000)
    rng = random.Random(7)
    books = [order_book(rng)]
    while len(books) < 12:
        books.append(next_book(books[-1], rng))
    published = [publish(node.redis_url, "market.orderbook", b["payload"], key="WEB/D") for b in books]
    page.wait_for_function(
        "(n) => window.__books.full.length >= n && window.__books.delta.length >= n", arg=len(published), timeout=10_000
    )
    got = page.evaluate("() => window.__books")
    assert [e["data"] for e in got["full"]] == published
    assert [e["data"] for e in got["delta"]] == published  # same envelopes, rebuilt from deltas
    assert [e["seq"] for e in got["delta"]] == [e["seq"] for e in got["full"]]
    assert all("delta" not in e for e in got["delta"])
    assert got["gaps"] == []
    assert page.evaluate("() => window.__deltaFrames") == len(published) - 1  # all but the chain's first
