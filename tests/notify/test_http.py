"""The intake's HTTP server under a flood of idle connections and bad requests."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
from examples.notify._http import HttpServer, Request, Response, json_response


async def _echo(req: Request) -> Response:
    return json_response(200, {"path": req.path, "len": len(req.body)})


async def test_a_flood_of_idle_connections_does_not_lock_clients_out() -> None:
    server = HttpServer(_echo, max_connections=20, first_timeout=30.0)
    await server.start("127.0.0.1", 0)
    idle: list[asyncio.StreamWriter] = []
    try:
        for _ in range(60):  # three times the cap, none sends a byte
            _, w = await asyncio.open_connection("127.0.0.1", server.port)
            idle.append(w)
        await asyncio.sleep(0.1)
        async with httpx.AsyncClient(timeout=5.0) as http:
            for i in range(5):
                r = await http.post(f"http://127.0.0.1:{server.port}/v1/x{i}", content=b"abc")
                assert r.status_code == 200
                assert r.json() == {"path": f"/v1/x{i}", "len": 3}
        assert len(server._conns) <= 20
    finally:
        for w in idle:
            w.close()
            with contextlib.suppress(Exception):
                await w.wait_closed()
        await server.close()


async def test_a_silent_new_connection_is_closed_after_the_first_request_timeout() -> None:
    server = HttpServer(_echo, first_timeout=0.2, idle_timeout=30.0)
    await server.start("127.0.0.1", 0)
    try:
        r, w = await asyncio.open_connection("127.0.0.1", server.port)
        assert await asyncio.wait_for(r.read(), 5.0) == b""  # closed by the server
        w.close()
        await w.wait_closed()
    finally:
        await server.close()


async def test_bad_requests_are_answered_with_what_is_wrong() -> None:
    server = HttpServer(_echo, max_body=10)
    await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(timeout=5.0) as http:
            r = await http.post(f"http://127.0.0.1:{server.port}/", content=b"x" * 11)
            assert r.status_code == 413
            assert "body over 10 bytes" in r.json()["error"]
    finally:
        await server.close()
