"""The OpenAPI 3.1 description of the control API (served at ``/openapi.json``)."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["openapi"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


_AUTH = {
    "401": {
        **_json("Error", "TCP only: no or malformed `Authorization: Bearer` header."),
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    "403": _json(
        "Error", "Unix socket: a uid other than the tree's own or root; TCP: an unknown token."
    ),
}

_PATH_PARAM = {
    "name": "path",
    "in": "path",
    "required": True,
    "description": "The child's tree path, e.g. `shop/infra/db` (the root's name may be left "
    "out). Slashes may be sent as-is or as %2F.",
    "schema": {"type": "string"},
}

_ACTION_BODY = {
    "required": False,
    "description": "Optional; an empty body is fine.",
    "content": {"application/json": {"schema": _ref("ActionRequest")}},
}


def _action(summary: str, description: str, op_id: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": op_id,
            "summary": summary,
            "description": description
            + " Recorded as an `operator.action` telemetry event (journaled) with the caller.",
            "parameters": [_PATH_PARAM],
            "requestBody": _ACTION_BODY,
            "responses": {
                "200": _json("ActionResult", "Done."),
                "400": _json("Error", "The body is not JSON."),
                "404": _json("Error", "No child at this path."),
                "409": _json("Error", "The supervisor refused, or the action does not apply."),
                "413": _json("Error", "The body is too large."),
                "422": _json("Error", "The body is JSON but not a valid request."),
                "500": _json("Error", "Unexpected failure (the tree keeps running)."),
                "503": _json("Error", "The tree has not started yet."),
                **_AUTH,
            },
        }
    }


_NODE = {
    "type": "object",
    "required": [
        "path",
        "id",
        "type",
        "state",
        "restart",
        "pid",
        "os_pid",
        "uptime_s",
        "restarts",
        "last_exit",
        "last_class",
        "children",
    ],
    "properties": {
        "path": {"type": "string", "description": "Tree path, e.g. `shop/infra/db`."},
        "id": {"description": "The child id (non-JSON ids as their repr)."},
        "type": {"type": ["string", "null"], "enum": ["supervisor", "worker", None]},
        "state": {
            "type": "string",
            "enum": ["running", "starting", "restarting", "stopped"],
            "description": "As telemetry showed it: answered at once, whatever the "
            "supervisors are doing. starting: an OS process spawned, not ready yet; "
            "restarting: exited and about to start again (also in backoff, a failed start "
            "being retried, or stopped for a sibling's or its supervisor's restart).",
        },
        "since": {
            "type": ["string", "null"],
            "description": "When the state began (ISO 8601, UTC).",
        },
        "retry_in_s": {
            "type": ["number", "null"],
            "description": "Seconds to a backoff's next attempt.",
        },
        "last_output": {
            "type": "array",
            "description": "The last lines of an OS child whose last exit was abnormal.",
            "items": {
                "type": "object",
                "properties": {"stream": {"type": "string"}, "line": {"type": "string"}},
            },
        },
        "restart": {
            "type": ["string", "null"],
            "enum": ["permanent", "transient", "temporary", None],
            "description": "Null for the root.",
        },
        "pid": {"type": ["string", "null"], "description": "The Trellis pid's repr."},
        "os_pid": {"type": ["integer", "null"], "description": "OS process id of a Command child."},
        "uptime_s": {"type": ["number", "null"], "description": "Seconds since its last start."},
        "restarts": {"type": "integer", "description": "Restarts by its supervisor seen so far."},
        "last_exit": {"type": ["string", "null"], "description": "Its last exit reason."},
        "last_class": {
            "type": ["string", "null"],
            "description": "normal, shutdown, crash, hung, killed, oom or timeout.",
        },
        "children": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
    },
}

_SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Trellis control API",
        "version": "1",
        "description": (
            "Operate a running Trellis tree. Served on a Unix socket (mode 0600; callers are "
            "identified by their peer uid, and only the tree's own uid and root are allowed) "
            "and optionally on TCP, where every request needs `Authorization: Bearer <token>`."
        ),
    },
    "servers": [{"url": "/"}],
    "security": [{"bearer": []}],
    "paths": {
        "/v1/tree": {
            "get": {
                "operationId": "getTree",
                "summary": "The running tree",
                "responses": {
                    "200": _json("Tree", "Every node with its state, pids, uptime and restarts."),
                    "503": _json("Error", "The tree has not started yet."),
                    **_AUTH,
                },
            }
        },
        "/v1/events": {
            "get": {
                "operationId": "getEvents",
                "summary": "Telemetry events as Server-Sent Events",
                "description": (
                    "Each event is `id: <n>`, `event: <name>` and `data: <JSON>`; send "
                    "`Last-Event-ID: <n>` (or `last_event_id=<n>`) to resume after event n "
                    "(what fell out of the history meanwhile is counted in a "
                    "`control.dropped` event first). A client that reads too slowly loses "
                    "the oldest events and gets a `control.dropped` event with the count; "
                    "the tree never waits for it. A `: keepalive` comment is sent when idle."
                ),
                "parameters": [
                    {
                        "name": "history",
                        "in": "query",
                        "description": "First replay up to this many recent events that pass "
                        "the filters (child output is kept apart, with its own budget).",
                        "schema": {"type": "integer", "minimum": 0, "maximum": 999999999},
                    },
                    {
                        "name": "filter",
                        "in": "query",
                        "description": "Comma-separated globs on the event name (`child.*`).",
                        "schema": {"type": "string", "minLength": 1},
                    },
                    {
                        "name": "path",
                        "in": "query",
                        "description": "Comma-separated globs on the event's tree path.",
                        "schema": {"type": "string", "minLength": 1},
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "description": "false: end the stream after the history.",
                        "schema": {"type": "boolean", "default": True},
                    },
                    {
                        "name": "last_event_id",
                        "in": "query",
                        "description": "Resume after this event id (as `Last-Event-ID`).",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "description": "Resume after this event id (replays what is kept).",
                        "schema": {"type": "integer", "minimum": 0},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "An event stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "422": _json("Error", "A bad query parameter."),
                    **_AUTH,
                },
            }
        },
        "/v1/children/{path}/restart": _action(
            "Restart a child",
            "terminate_child then restart_child on its supervisor. Not available for "
            "children of a dynamic supervisor or temporary children (409).",
            "restartChild",
        ),
        "/v1/children/{path}/stop": _action(
            "Stop a child", "terminate_child on its supervisor.", "stopChild"
        ),
        "/v1/children/{path}/start": _action(
            "Start a stopped child",
            "restart_child on its supervisor (static supervisors only).",
            "startChild",
        ),
        "/v1/children/{path}/signal": {
            "post": {
                "operationId": "signalChild",
                "summary": "Send a signal to an OS-process child (operator action)",
                "description": "Body `{signal: 'HUP' or 1, group?: false, reason?}`; "
                "`group` signals its whole process group. Journaled as `operator.action`.",
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}}
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {
                        "description": "`{action, signal, group, path, os_pid, result}`.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "404": _json("Error", "No child at this path."),
                    "409": _json("Error", "Not an OS-process child, or not running."),
                    "422": _json("Error", "Not a signal, or a bad field."),
                    **_AUTH,
                },
            }
        },
        "/v1/logs/{path}": {
            "get": {
                "operationId": "childLogs",
                "summary": "A child's recent output lines (read-only)",
                "parameters": [
                    {"name": "path", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "n",
                        "in": "query",
                        "description": "How many of the last lines (default 100), or `all`.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "since",
                        "in": "query",
                        "description": "Only lines since this unix time or ISO 8601 time.",
                        "schema": {"type": "string"},
                    },
                    {
                        "name": "stream",
                        "in": "query",
                        "schema": {"type": "string", "enum": ["stdout", "stderr"]},
                    },
                    {
                        "name": "follow",
                        "in": "query",
                        "description": "true: stream NDJSON, the backlog then new lines.",
                        "schema": {"type": "boolean", "default": False},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "`{path, lines: [{time, utc, stream, os_pid, line}]}`, "
                        "or with follow one line object per NDJSON line.",
                        "content": {
                            "application/json": {"schema": {"type": "object"}},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                        },
                    },
                    "404": _json("Error", "No child at this path."),
                    "422": _json("Error", "A bad query parameter."),
                    **_AUTH,
                },
            }
        },
        "/v1/stop": {
            "post": {
                "operationId": "stopTree",
                "summary": "Stop the whole tree (as SIGTERM would)",
                "requestBody": _ACTION_BODY,
                "responses": {
                    "202": _json("Stopping", "The tree is stopping."),
                    "400": _json("Error", "The body is not JSON."),
                    "413": _json("Error", "The body is too large."),
                    "422": _json("Error", "The body is JSON but not a valid request."),
                    "503": _json("Error", "The tree has not started yet."),
                    **_AUTH,
                },
            }
        },
        "/v1/reload": {
            "post": {
                "operationId": "reloadTree",
                "summary": "Re-read the tree file and apply only what changed (operator action)",
                "requestBody": _ACTION_BODY,
                "responses": {
                    "200": _json("Reloaded", "Applied: the changes made (maybe none)."),
                    "400": _json("Error", "The body is not JSON."),
                    "404": _json("Error", "The tree was not started from a tree file."),
                    "409": _json(
                        "Error", "Some changes failed, or the tree is starting or stopping."
                    ),
                    "413": _json("Error", "The body is too large."),
                    "422": _json(
                        "Error",
                        "The tree file is invalid (or changes the root's name, strategy or "
                        "auto_shutdown): nothing changed; `error` lists every problem.",
                    ),
                    **_AUTH,
                },
            }
        },
        "/v1/plugins": {
            "get": {
                "operationId": "listPlugins",
                "summary": "Every plugin host's plugins: state, version, sha256, restarts, "
                "crashes, calls, errors by kind, memory high-water mark, fuel",
                "responses": {
                    "200": {
                        "description": "`{hosts: {path: [plugin, ...]}, time}`.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_AUTH,
                },
            }
        },
        "/v1/plugins/{id}/{action}": {
            "post": {
                "operationId": "pluginAction",
                "summary": "load, upgrade, unload, release or call a plugin (operator action)",
                "description": "`load`: `{module_b64, sha256?, version?, memory?, timeout?, "
                "fuel?, config?, instances?, host?, reason?}`; `upgrade`: the same and "
                "`check_function?, check_data?`; `call`: `{function, data | "
                "data_b64, timeout?, host?}` answers `{output_b64, output?}`; `unload`, "
                "`release`: `{host?, reason?}`.",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["load", "upgrade", "unload", "release", "call"]},
                    },
                ],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": {"type": "object"}}},
                },
                "responses": {
                    "200": {
                        "description": "Done.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "404": _json("Error", "No such plugin, host or action."),
                    "409": _json("Error", "It cannot start, or the plugin went down."),
                    "413": _json("Error", "The body is too large."),
                    "422": _json("Error", "A bad body, a bad module, or the call's PluginError."),
                    "504": _json("Error", "The call's timeout passed."),
                    **_AUTH,
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "getMetrics",
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Prometheus text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": _json("Error", "Metrics are not enabled on this tree."),
                    **_AUTH,
                },
            }
        },
        "/v1/stats": {
            "get": {
                "operationId": "getStats",
                "summary": "RED per server, USE per OS child and event-loop lag, as JSON",
                "description": "The numbers behind the `trellis_server_*`, "
                "`trellis_process_*` and `trellis_event_loop_*` series, for dashboards "
                "(rates are for the reader to compute from two reads).",
                "responses": {
                    "200": {
                        "description": '`{node, time, children: {"sup/child": {calls, '
                        "errors, duration_sum, duration_count, cpu_seconds, rss_bytes, "
                        "open_fds, threads}}, loop: {lag_count, lag_sum, lag_last, blocked} "
                        "| null}`",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "404": _json("Error", "Metrics are not enabled on this tree."),
                    **_AUTH,
                },
            }
        },
        "/": {
            "get": {
                "operationId": "getDashboard",
                "summary": "The dashboard page (HTML; no data, served without a token)",
                "responses": {
                    "200": {
                        "description": "The page; it reads the API with the caller's token.",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/v1/slo": {
            "get": {
                "operationId": "getSloBudgets",
                "summary": "Availability and error budget left per SLO of the tree file",
                "description": "From the journal (the figures of `trellis slo report` over "
                "each SLO window up to now), recomputed at most every 10 s. 404 without a "
                "journal.",
                "responses": {
                    "200": {
                        "description": "`{until, slos: [{node, path, kind, objective, window, "
                        "availability, budget_remaining_ratio, budget_remaining_seconds, "
                        "burn_1h, owner, runbook}]}`",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "404": {"description": "No journal to compute budgets from."},
                    **_AUTH,
                },
            }
        },
        "/v1/cluster": {
            "get": {
                "operationId": "getCluster",
                "summary": "This node's view of its cluster: nodes, their age, leases held",
                "responses": {
                    "200": _json("Cluster", "The cluster as this node sees it."),
                    "404": _json("Error", "This node is in no cluster."),
                    **_AUTH,
                },
            }
        },
        "/healthz": {
            "get": {
                "operationId": "getHealth",
                "summary": "The process is alive",
                "responses": {"200": _json("Health", "Alive."), **_AUTH},
            }
        },
        "/readyz": {
            "get": {
                "operationId": "getReady",
                "summary": "The root runs and every permanent child is up",
                "responses": {
                    "200": _json("Ready", "Ready."),
                    "503": _json("Ready", "Not ready; `not_ready` lists what is down."),
                    **_AUTH,
                },
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "getOpenAPI",
                "summary": "This description",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    **_AUTH,
                },
            }
        },
    },
    "components": {
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "TCP only; the Unix socket uses the caller's peer uid.",
            }
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}, "path": {"type": "string"}},
            },
            "Node": _NODE,
            "Tree": {
                "type": "object",
                "required": ["node", "time", "root"],
                "properties": {
                    "node": {"type": ["string", "null"]},
                    "time": {"type": "string", "format": "date-time"},
                    "root": _ref("Node"),
                },
            },
            "ActionRequest": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "reason": {
                        "type": "string",
                        "maxLength": 500,
                        "description": "Why (recorded as the action's detail).",
                    }
                },
            },
            "ActionResult": {
                "type": "object",
                "required": ["action", "path", "result", "state"],
                "properties": {
                    "action": {"type": "string", "enum": ["restart", "stop", "start"]},
                    "path": {"type": "string"},
                    "result": {"type": "string", "const": "ok"},
                    "state": {"type": "string", "enum": ["running", "stopped", "ignored"]},
                    "pid": {"type": ["string", "null"]},
                    "os_pid": {"type": ["integer", "null"]},
                },
            },
            "Stopping": {
                "type": "object",
                "required": ["action", "result"],
                "properties": {
                    "action": {"type": "string", "const": "stop_tree"},
                    "result": {"type": "string", "const": "stopping"},
                },
            },
            "Reloaded": {
                "type": "object",
                "required": ["action", "file", "result", "changes", "errors", "notes"],
                "properties": {
                    "action": {"type": "string", "const": "reload"},
                    "file": {"type": "string"},
                    "result": {"type": "string", "enum": ["ok", "invalid", "refused", "failed"]},
                    "changes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["change", "path"],
                            "properties": {
                                "change": {
                                    "type": "string",
                                    "enum": [
                                        "added",
                                        "removed",
                                        "restarted",
                                        "updated",
                                        "reordered",
                                    ],
                                },
                                "path": {"type": "string"},
                                "keys": {"type": "array", "items": {"type": "string"}},
                            },
                        },
                    },
                    "errors": {"type": "array", "items": {"type": "string"}},
                    "notes": {"type": "array", "items": {"type": "string"}},
                },
            },
            "Cluster": {
                "type": "object",
                "required": ["cluster", "node", "connected", "nodes", "leases"],
                "properties": {
                    "cluster": {"type": "string"},
                    "node": {"type": "string"},
                    "url": {"type": "string"},
                    "connected": {"type": "boolean"},
                    "lease_ttl": {"type": "number"},
                    "nodes": {"type": "array", "items": {"type": "object"}},
                    "leases": {"type": "array", "items": {"type": "object"}},
                },
            },
            "Health": {
                "type": "object",
                "required": ["status"],
                "properties": {
                    "status": {"type": "string", "const": "ok"},
                    "node": {"type": ["string", "null"]},
                    "os_pid": {"type": "integer"},
                },
            },
            "Ready": {
                "type": "object",
                "required": ["ready", "not_ready"],
                "properties": {
                    "ready": {"type": "boolean"},
                    "reason": {"type": "string"},
                    "not_ready": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "path": {"type": "string"},
                                "state": {"type": "string"},
                                "restart": {"type": ["string", "null"]},
                            },
                        },
                    },
                },
            },
        },
    },
}


def openapi() -> dict[str, Any]:
    """A fresh copy of the OpenAPI 3.1 description of the control API.

    Example::

        assert "/v1/tree" in openapi()["paths"]
    """
    return copy.deepcopy(_SPEC)
