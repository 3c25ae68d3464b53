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

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["PAGE", "PUBLIC_PATHS", "SLO_CACHE_SECONDS", "dashboard_routes", "slo_budgets"]

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

    cache: dict[str, Any] = {}
    lock = asyncio.Lock()

    async def slo(request: Request) -> Response:
        source = getattr(server, "slo_source", None)
        if source is None or source[0] is None:
            return JSONResponse(
                {"error": "no journal: SLO budgets come from the journal (trellis run with it)"},
                status_code=404,
            )
        async with lock:  # one computation at a time; the others reuse it
            now = time.monotonic()
            if cache.get("at") is None or now - cache["at"] > SLO_CACHE_SECONDS:
                try:
                    cache["body"] = await _compute_elsewhere(*source)
                except Exception as e:  # an unreadable journal: say so, do not crash
                    return JSONResponse({"error": f"cannot compute the SLOs: {e}"}, status_code=503)
                cache["at"] = now
        return JSONResponse(cache["body"])

    return [
        Route("/", page, methods=["GET", "HEAD"]),
        Route("/v1/slo", slo, methods=["GET"]),
    ]


#: How long a computed ``/v1/slo`` answer is reused (it reads the whole journal).
SLO_CACHE_SECONDS = 10.0


async def _compute_elsewhere(url: str, root: str, sre: dict[str, Any]) -> dict[str, Any]:
    """:func:`slo_budgets` in a process of its own: reading and scanning a large journal
    takes CPU seconds that must not hold the tree's GIL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "trellis.control._dashboard",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    request = json.dumps({"url": url, "root": root, "sre": sre}).encode()
    try:
        out, err = await asyncio.wait_for(proc.communicate(request), timeout=120.0)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
    body = json.loads(out)
    assert isinstance(body, dict)
    return body


def slo_budgets(url: str, root: str, sre: dict[str, Any]) -> dict[str, Any]:
    """Per child and subtree with an ``slo`` in the tree file: availability and error
    budget left, from the journal (``trellis slo report``'s figures over the SLO
    window up to now), for this tree's node(s)."""
    from ..sre import TreeInfo, read_records, report

    doc = report(read_records(url), tree=TreeInfo(root, frozenset(), sre))
    out = []
    for e in doc["entities"]:
        if e["slo"]["source"] != "tree":
            continue
        b = e["budget"]
        out.append(
            {
                "node": e["node"],
                "path": e["path"],
                "kind": e["kind"],
                "objective": e["slo"]["objective"],
                "window": e["slo"]["window"],
                "availability": e["availability"],
                "budget_remaining_ratio": b["remaining_ratio"],
                "budget_remaining_seconds": b["remaining_seconds"],
                "burn_1h": e["burn_rates"]["1h"],
                "owner": e["owner"],
                "runbook": e["runbook"],
            }
        )
    return {"until": doc["until"], "slos": out}


#: The page (``_dashboard.html`` beside this module).
PAGE = (Path(__file__).with_name("_dashboard.html")).read_text(encoding="utf-8")


if __name__ == "__main__":  # the /v1/slo computation, in its own process
    _req = json.load(sys.stdin)
    json.dump(slo_budgets(_req["url"], _req["root"], _req["sre"]), sys.stdout)
