"""The dashboard at ``/``: one page (HTML, CSS and script inline; nothing loaded from
anywhere else) that shows the live tree and recent events and restarts or stops
children, through the same API as every other client.

The page holds no data: it is served to anyone who can reach the API (over TCP
without a token) and then asks for the tree with the caller's bearer token — typed
into the page, or handed over in the URL's ``#token=...`` fragment, which browsers
never send to a server (so it is in no access log) and which the page removes from
the address bar at once. The token lives in ``sessionStorage`` (this tab only).
Updates come over ``/v1/events`` (Server-Sent Events read with ``fetch``, which can
send the ``Authorization`` header ``EventSource`` cannot): each event re-reads
``/v1/tree`` (which the tracker answers at once), so the page follows the tree within
a few hundred milliseconds. Every child's element carries ``data-path``,
``data-state`` and ``data-restarts``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["PAGE", "PUBLIC_PATHS", "dashboard_routes"]

#: Paths served without authorisation: the page only (it carries no data).
PUBLIC_PATHS = frozenset({"/"})

_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def dashboard_routes(server: Any = None) -> list[Route]:
    """The dashboard's routes, mounted by the control server."""

    async def page(request: Request) -> Response:
        return Response(
            PAGE,
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": _CSP,
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
            },
        )

    return [Route("/", page, methods=["GET", "HEAD"])]


#: The page (``_dashboard.html`` beside this module).
PAGE = (Path(__file__).with_name("_dashboard.html")).read_text(encoding="utf-8")
