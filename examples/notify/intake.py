"""The intake: an HTTP API that accepts notifications onto the JetStream work queue.

``POST /v1/notifications`` takes one notification or ``{"notifications": [...]}`` and
answers ``202`` only once JetStream has stored each one (``Nats-Msg-Id`` is the
idempotency key, so a retried request within the duplicate window is accepted once and
answered ``"duplicate": true``). A key names one notification: reusing it with other
tokens or another payload is answered ``duplicate`` within the window (10 min) and never
delivers the new content; after the window, its (key, token) pairs already delivered
are not delivered again. Bad input is ``400`` naming the key that is wrong; NATS
unreachable is ``503`` (nothing was accepted: retry, here or on another node).

``GET /v1/notifications/KEY`` is its delivery status, read from the read replica unless
the replica lags (then from the primary; ``source`` says which). ``POST /v1/campaigns``
registers a campaign for the scheduler. ``GET /v1/health`` is this node's view.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from typing import Any

from examples.notify import common
from examples.notify._http import HttpServer, Request, Response, json_response
from examples.notify.metrics import ACCEPTED, REJECTED

import trellis

__all__ = ["Intake"]

_log = logging.getLogger("notify.intake")
_CAMPAIGN_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Intake(trellis.Server):
    """This node's intake API (settings from the environment, see ``common``)."""

    async def init(self) -> None:
        import nats

        self.settings = common.Settings.from_env()
        self.nc = await nats.connect(
            self.settings.nats,
            name=f"notify-intake-{self.settings.node}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            connect_timeout=2,
        )
        self.js = self.nc.jetstream(timeout=5.0)
        await common.ensure_stream(self.js, self.settings.partitions)
        self.store: Any = None
        self.store_lock = asyncio.Lock()
        self.http = HttpServer(self._handle)
        await self.http.start(self.settings.http_host, self.settings.http_port)
        if self.settings.port_file:
            tmp = f"{self.settings.port_file}.tmp"
            with open(tmp, "w") as f:  # noqa: ASYNC230 - a few bytes, once, at start
                f.write(str(self.http.port))
            os.replace(tmp, self.settings.port_file)
        _log.info("intake of node %s on port %d", self.settings.node, self.http.port)

    async def handle_call(self, request: Any, caller: trellis.Caller) -> Any:
        if request == "port":
            return self.http.port
        raise ValueError(f"unknown call {request!r}")

    async def terminate(self, reason: Any) -> None:
        await self.http.close()  # stop taking work first: clients move to another node
        with contextlib.suppress(Exception):
            await self.nc.drain()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.close()

    # -- routes --------------------------------------------------------------------

    async def _handle(self, req: Request) -> Response:
        if req.path == "/v1/notifications":
            if req.method != "POST":
                return json_response(405, {"error": "use POST"})
            return await self._accept(req)
        if req.path.startswith("/v1/notifications/") and req.method == "GET":
            return await self._status(req.path.removeprefix("/v1/notifications/"))
        if req.path == "/v1/campaigns" and req.method == "POST":
            return await self._campaign(req)
        if req.path == "/v1/health":
            return json_response(
                200 if self.nc.is_connected else 503,
                {"node": self.settings.node, "nats": self.nc.is_connected},
            )
        return json_response(404, {"error": f"no route {req.method} {req.path}"})

    async def _accept(self, req: Request) -> Response:
        try:
            body = req.json()
        except ValueError as e:
            REJECTED.labels("bad_json").inc()
            return json_response(400, {"error": f"body is not JSON: {e}"})
        many = isinstance(body, dict) and "notifications" in body
        docs = body["notifications"] if many else [body]
        if not isinstance(docs, list) or not 0 < len(docs) <= 1000:
            REJECTED.labels("bad_request").inc()
            return json_response(400, {"error": "notifications: a list of 1-1000 notifications"})
        checked = []
        for i, doc in enumerate(docs):
            try:
                checked.append(common.validate(doc))
            except common.BadNotification as e:
                REJECTED.labels("invalid").inc()
                where = f"notifications[{i}].{e.field}" if many else e.field
                return json_response(400, {"error": e.message, "field": where})
        now = time.time()
        try:
            acks = await asyncio.gather(*(self._publish(doc, now) for doc in checked))
        except Exception as e:  # some may be stored: a retry with the same keys stores each once
            REJECTED.labels("unavailable").inc()
            return json_response(
                503,
                {"error": f"the queue did not acknowledge: {type(e).__name__}: {e}"},
                **{"retry-after": "1"},
            )
        results = [
            {"key": d["key"], "seq": a.seq, "duplicate": bool(a.duplicate)}
            for d, a in zip(checked, acks, strict=True)
        ]
        for d, a in zip(checked, acks, strict=True):
            if not a.duplicate:
                ACCEPTED.labels(d["priority"]).inc()
        return json_response(202, {"accepted": results} if many else results[0])

    async def _publish(self, doc: dict[str, Any], now: float) -> Any:
        part = common.partition_of(doc["key"], self.settings.partitions)
        return await self.js.publish(
            common.subject(doc["priority"], part),
            common.encode({**doc, "accepted_at": now}),
            stream=common.STREAM,
            headers={"Nats-Msg-Id": doc["key"]},
        )

    async def _db(self) -> Any:
        if self.store is None:
            from examples.notify.store import Store

            self.store = await Store.open(self.settings.pg, self.settings.pg_replica)
        return self.store

    async def _status(self, key: str) -> Response:
        try:
            async with self.store_lock:  # a Store serves one task at a time
                status = await (await self._db()).status(key)
        except Exception as e:
            return json_response(503, {"error": f"database unavailable: {type(e).__name__}"})
        if not status.get("deliveries"):
            return json_response(
                404,
                {**status, "error": f"no delivery of {key!r} recorded (still queued, or unknown)"},
            )
        return json_response(200, status)

    async def _campaign(self, req: Request) -> Response:
        """Register a campaign: checked here as the scheduler will expand it (its last
        notification must pass the same checks as one posted here), so a 202 is never
        followed by notifications that cannot be sent."""
        from examples.notify.scheduler import campaign_tokens

        try:
            doc = req.json()
        except ValueError as e:
            return json_response(400, {"error": f"body is not JSON: {e}"})
        if not isinstance(doc, dict):
            return json_response(400, {"error": "a campaign is a JSON object", "field": "body"})
        unknown = sorted(set(doc) - {"id", "total", "priority", "payload"})
        cid, total = doc.get("id"), doc.get("total")
        priority, payload = doc.get("priority", "bulk"), doc.get("payload", {})
        problem = (
            (unknown[0], "unknown key")
            if unknown
            else ("id", "1-64 of A-Z a-z 0-9 _ . -")
            if not (isinstance(cid, str) and _CAMPAIGN_ID.fullmatch(cid))
            else ("total", "a whole number from 1 to 10,000,000")
            if not (isinstance(total, int) and not isinstance(total, bool) and 0 < total <= 10**7)
            else None
        )
        if problem is None:
            cid, total = str(cid), int(str(total))  # checked above
            last = {
                "key": f"{cid}:{total - 1}",
                "priority": priority,
                "tokens": campaign_tokens(cid, total - 1),
                "campaign": cid,
                "payload": payload,
            }
            try:
                common.validate(last)
            except common.BadNotification as e:
                problem = (e.field, e.message)
        if problem is not None:
            REJECTED.labels("invalid").inc()
            return json_response(400, {"error": problem[1], "field": problem[0]})
        try:
            async with self.store_lock:
                new = await (await self._db()).add_campaign(cid, total, priority, payload)
        except Exception as e:
            return json_response(503, {"error": f"database unavailable: {type(e).__name__}"})
        return json_response(202 if new else 200, {"campaign": cid, "total": total, "new": new})
