"""The pipeline's supervision tree as a tree file, rendered from :class:`Settings`.

``tree.toml`` beside this file is ``render_toml(Settings())`` (a test keeps them
equal); :class:`~examples.market_data.pipeline.Pipeline` renders the same tree
with free ports, a work directory and an explicit epoch, and loads it with
``trellis.config.loads``: ``trellis run tree.toml`` and the Python driver run
one tree definition.

::

    market_data            one_for_one
      infra                rest_for_one: exchange, store, gatekeeper
      recovery             (isolated)
      collectors           one_for_one: collector-0 .. collector-{groups-1}
      sentinel             (isolated)

Example::

    text = render_toml(Settings(symbols=6, groups=2, feed_port=9001, http_port=9002))
    tree = trellis.config.loads(text)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from examples.market_data._common import COLLECTORS, GATEKEEPER, RECOVERY, ROOT, SENTINEL, STORE

__all__ = ["Settings", "render_toml"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the pipeline, with the defaults ``tree.toml`` uses.

    Rates are per second. The gatekeeper's limit (``gate_rate``, ``gate_burst``)
    must stay below the exchange's (``history_rate``, ``history_burst``), with
    room for the fallback share: ``gate_burst * (1 + fallback_fraction) <=
    history_burst``.
    """

    symbols: int = 50
    seed: int = 1
    groups: int = 4
    rate: float = 200.0  # ticks/s over all symbols
    skew: float = 1.0  # Zipf exponent of the symbols' volumes
    host: str = "127.0.0.1"
    feed_port: int = 7461
    http_port: int = 7462
    history_rate: float = 20.0  # the exchange's limit
    history_burst: float = 10.0
    gate_rate: float = 10.0  # ours
    gate_burst: float = 5.0
    fallback_fraction: float = 0.5
    redis_url: str | None = None
    namespace: str = "trellis:md"
    db: str = "market_data.db"
    python: str = "python3"
    exchange_script: str = "exchange.py"
    exchange_cwd: str | None = "."  # relative to the tree file
    epoch: float | None = None  # None: kept per supervisor process in state_file
    state_file: str = "/tmp/trellis-market-data-{ppid}.json"
    logs: str | None = None  # a directory for the exchange's stdout/stderr
    exchange_watchdog: float = 1.5  # seconds without WATCHDOG=1 before it is hung
    heartbeat: float = 0.2
    silence: float = 2.0
    scan_interval: float = 1.0
    parts: str = "md_parts"  # the module tree.toml's server refs name

    def __post_init__(self) -> None:
        problems = []
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                problems.append(f"{f.name} must be finite, got {v!r}")
        if self.symbols < 1:
            problems.append(f"symbols must be >= 1, got {self.symbols}")
        if not 1 <= self.groups <= self.symbols:
            problems.append(f"groups must be in 1..symbols ({self.symbols}), got {self.groups}")
        positive = (
            "rate",
            "history_rate",
            "gate_rate",
            "heartbeat",
            "silence",
            "scan_interval",
            "exchange_watchdog",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.fallback_fraction <= 1:
            problems.append(f"fallback_fraction must be in (0, 1], got {self.fallback_fraction}")
        if self.gate_rate >= self.history_rate:
            problems.append(
                f"gate_rate ({self.gate_rate}) must be below the exchange's history_rate "
                f"({self.history_rate}), or the exchange answers 429"
            )
        if (
            self.gate_burst < 1
            or self.gate_burst * (1 + self.fallback_fraction) > self.history_burst
        ):
            problems.append(
                f"gate_burst ({self.gate_burst}) must be >= 1 and gate_burst * "
                f"(1 + fallback_fraction) must not exceed history_burst ({self.history_burst})"
            )
        if self.heartbeat >= self.silence:
            problems.append(
                f"heartbeat ({self.heartbeat}) must be shorter than silence ({self.silence})"
            )
        for name in ("feed_port", "http_port"):
            if not 0 < getattr(self, name) < 65536:
                problems.append(f"{name} must be 1-65535, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid market-data settings: " + "; ".join(problems))

    @property
    def feed(self) -> str:
        """The feed's ``host:port``."""
        return f"{self.host}:{self.feed_port}"

    @property
    def exchange_url(self) -> str:
        """The history API's base URL."""
        return f"http://{self.host}:{self.http_port}"

    def collector_ids(self) -> list[str]:
        """``collector-0`` .. ``collector-{groups-1}``."""
        return [f"collector-{g}" for g in range(self.groups)]


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def _table(header: str, items: dict[str, Any], comment: str | None = None) -> str:
    lines = [f"# {line}" if line else "#" for line in (comment or "").splitlines()]
    lines.append(header)
    lines.extend(f"{k} = {_toml(v)}" for k, v in items.items() if v is not None)
    return "\n".join(lines)


def _exchange_argv(s: Settings) -> list[str]:
    argv = [s.python, "-u", s.exchange_script, "--host", s.host]
    argv += ["--port", str(s.feed_port), "--http-port", str(s.http_port)]
    argv += ["--seed", str(s.seed), "--symbols", str(s.symbols), "--rate", repr(s.rate)]
    argv += ["--skew", repr(s.skew), "--history-rate", repr(s.history_rate)]
    argv += ["--history-burst", repr(s.history_burst)]
    if s.epoch is not None:
        argv += ["--epoch", repr(s.epoch)]
    else:
        argv += ["--state-file", s.state_file]
    return argv


def render_toml(s: Settings) -> str:
    """The tree file for ``s`` (``tree.toml`` is ``render_toml(Settings())``)."""
    redis = {"redis_url": s.redis_url, "namespace": s.namespace} if s.redis_url else {}
    parts = []
    parts.append(
        _table(
            "[supervisor]",
            {"name": ROOT, "strategy": "one_for_one", "intensity": 10, "period": 10.0},
            "The market-data pipeline (examples/market_data). Generated by tree.py:\n"
            "render_toml(Settings()); edit Settings, then regenerate with\n"
            "  python -m examples.market_data --write-tree\n"
            "Run it with:  trellis run examples/market_data/tree.toml",
        )
    )
    parts.append(
        _table(
            "[[supervisor.children]]",
            {"id": "infra", "strategy": "rest_for_one", "intensity": 10, "period": 10.0},
            "Infrastructure, in dependency order: a restart of one restarts those after it.",
        )
    )
    parts.append(
        _table(
            "[[supervisor.children.children]]",
            {
                "id": "exchange",
                "command": _exchange_argv(s),
                "cwd": s.exchange_cwd,
                "ready": {"notify": True, "timeout": 10.0},
                "watchdog": s.exchange_watchdog,
                "shutdown": 2.0,
                "logs": {"dir": s.logs} if s.logs else None,
                "backoff": {"min": 0.2, "max": 2.0},
            },
            "The simulated exchange: an OS process (feed + history API), ready on sd_notify;\n"
            "a stopped or stuck one misses its watchdog and is restarted (reason: hung).",
        )
    )
    parts.append(
        _table(
            "[[supervisor.children.children]]",
            {
                "id": "store",
                "server": f"{s.parts}:TickStore",
                "name": STORE,
                "kwargs": {"db": s.db, "exchange": s.exchange_url, **redis},
            },
        )
    )
    parts.append(
        _table(
            "[[supervisor.children.children]]",
            {
                "id": "gatekeeper",
                "server": f"{s.parts}:Gatekeeper",
                "name": GATEKEEPER,
                "kwargs": {
                    "rate": s.gate_rate,
                    "burst": s.gate_burst,
                    "fallback_fraction": s.fallback_fraction,
                    **redis,
                },
            },
        )
    )
    parts.append(
        _table(
            "[[supervisor.children]]",
            {
                "id": "recovery",
                "server": f"{s.parts}:Recovery",
                "name": RECOVERY,
                "kwargs": {
                    "db": s.db,
                    "exchange": s.exchange_url,
                    "symbols": s.symbols,
                    "scan_interval": s.scan_interval,
                },
            },
            "Backfills every gap; isolated from infra and collectors (the root is one_for_one).",
        )
    )
    parts.append(
        _table(
            "[[supervisor.children]]",
            {
                "id": "collectors",
                "name": COLLECTORS,
                "strategy": "one_for_one",
                "intensity": 30,
                "period": 10.0,
            },
            "One collector per symbol group.",
        )
    )
    for g in range(s.groups):
        parts.append(
            _table(
                "[[supervisor.children.children]]",
                {
                    "id": f"collector-{g}",
                    "server": f"{s.parts}:Collector",
                    "kwargs": {
                        "group": g,
                        "groups": s.groups,
                        "symbols": s.symbols,
                        "feed": s.feed,
                        "heartbeat": s.heartbeat,
                        **redis,
                    },
                },
            )
        )
    parts.append(
        _table(
            "[[supervisor.children]]",
            {
                "id": "sentinel",
                "server": f"{s.parts}:Sentinel",
                "name": SENTINEL,
                "kwargs": {"silence": s.silence},
            },
            "Kills a collector that is alive but silent (reason: hung).",
        )
    )
    return "\n\n".join(parts) + "\n"
