"""The router's web files: the live event page at ``/`` and the browser client under ``/web/``.

Serves only what a browser needs from ``web/`` (the ES module client, its type
declarations, the page's script and style sheet) with the right content types —
an ES module must be served as JavaScript — and ``Cache-Control: no-cache`` so
that a deploy is seen on the next load (ETag / Last-Modified revalidation is
aiohttp's :class:`~aiohttp.web.FileResponse`). Tests (``web/test/``) and any
file of another kind are not served. The page's Content-Security-Policy allows
scripts, styles and WebSockets of its own origin only, and ``Referrer-Policy:
no-referrer`` keeps a ``?token=`` in the page's address out of Referer headers.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".ts": "text/plain; charset=utf-8",  # events.ts and delta-push.d.ts, for reading and for editors
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
NOT_SERVED = {"test"}  # web/ subfolders that stay in the repository

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def add_static_routes(app: web.Application, root: Path = WEB_ROOT) -> None:
    """Register ``GET /`` (web/index.html) and ``GET /web/{path}`` on ``app``."""
    root = root.resolve()

    async def index(request: web.Request) -> web.StreamResponse:
        return _file(root / "index.html", {"Content-Security-Policy": PAGE_POLICY})

    async def web_file(request: web.Request) -> web.StreamResponse:
        path = _resolve(root, request.match_info["path"])
        if path is None:
            raise web.HTTPNotFound()
        headers = {"Content-Security-Policy": PAGE_POLICY} if path.suffix == ".html" else {}
        return _file(path, headers)

    app.router.add_get("/", index)
    app.router.add_get("/web/{path:.+}", web_file)


def _resolve(root: Path, name: str) -> Path | None:
    """The file ``name`` under ``root`` if it may be served, else None (no escapes, no tests)."""
    try:
        path = (root / name).resolve()
    except (OSError, ValueError):
        return None
    if not path.is_relative_to(root) or path.suffix not in CONTENT_TYPES or not path.is_file():
        return None
    if any(part in NOT_SERVED or part.startswith(".") for part in path.relative_to(root).parts):
        return None
    return path


def _file(path: Path, headers: dict[str, str]) -> web.StreamResponse:
    if not path.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[path.suffix], **SECURITY_HEADERS, **headers})
