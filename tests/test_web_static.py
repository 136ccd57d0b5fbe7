"""The router serves the live page and the browser client (router/static.py), and nothing else of web/."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from router.static import add_static_routes


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = web.Application()
    add_static_routes(app)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_index_is_the_live_page_with_a_strict_policy(client):
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/html")
    assert "connect-src 'self'" in response.headers["Content-Security-Policy"]
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert '<script type="module" src="/web/app.js">' in await response.text()


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/web/delta-push.js", "text/javascript"),  # an ES module must be served as JavaScript
        ("/web/fossil.js", "text/javascript"),
        ("/web/app.js", "text/javascript"),
        ("/web/style.css", "text/css"),
        ("/web/events.ts", "text/plain"),
        ("/web/delta-push.d.ts", "text/plain"),
    ],
)
async def test_client_files_are_served_with_their_type(client, path, content_type):
    response = await client.get(path)
    assert response.status == 200
    assert response.headers["Content-Type"].startswith(content_type)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-cache"
    assert "ETag" in response.headers


@pytest.mark.parametrize(
    "path",
    ["/web/test/dedup.test.mjs", "/web/../pyproject.toml", "/web/%2e%2e/pyproject.toml", "/web/nope.js", "/web/"],
)
async def test_tests_other_files_and_escapes_are_not_served(client, path):
    response = await client.get(path)
    assert response.status == 404
