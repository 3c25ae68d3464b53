"""What every route of the control API shares: the JSON error answer, and reading an
action's optional JSON object body (bounded, with its fields checked)."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

__all__ = ["error", "read_json_object"]


def error(status: int, message: str, **extra: Any) -> JSONResponse:
    """``{"error": message, ...extra}`` with ``status``."""
    return JSONResponse({"error": message, **extra}, status_code=status)


async def read_json_object(
    request: Request, allowed: frozenset[str], limit: int
) -> dict[str, Any] | Response:
    """The request's optional JSON object body (an empty body is ``{}``), or the 4xx
    answer for a bad one: over ``limit`` bytes (413), not JSON (400), not an object,
    a field not in ``allowed``, or a ``reason`` that is not a short string (422)."""
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            return error(413, f"the body is over the limit of {limit} bytes")
    if not raw.strip():
        return {}
    try:
        data = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as e:
        return error(400, f"the body is not valid JSON: {e}")
    if not isinstance(data, dict):
        return error(422, f"the body must be a JSON object, not {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        allowed_text = ", ".join(sorted(allowed))
        return error(422, f"unknown field(s) {', '.join(unknown)} (allowed: {allowed_text})")
    reason = data.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 500):
        return error(422, "reason must be a string of at most 500 characters")
    return data
