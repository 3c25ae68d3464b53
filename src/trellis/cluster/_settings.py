"""``ClusterSettings``: where the NATS backplane is, who this node is, how long a lease
lasts, and the credentials and TLS options handed to nats-py."""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from .._core._exceptions import TrellisError

__all__ = ["DEFAULT_LEASE_TTL", "ClusterError", "ClusterSettings"]

DEFAULT_LEASE_TTL = 2.0
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NODE = re.compile(r"[A-Za-z0-9_=.-]{1,128}")


class ClusterError(TrellisError, ValueError):
    """A cluster setting that cannot be used, or a singleton started without a cluster."""


@dataclass(frozen=True)
class ClusterSettings:
    """How this node joins a cluster.

    ``url``: one NATS URL or several separated by commas (``nats://a:4222,nats://b:4222``).
    ``node``: this node's name, unique in the cluster (default: the host name).
    ``name``: the cluster's name; every bucket and subject is namespaced with it, so
    two clusters on one NATS never mix. ``lease_ttl``: seconds a singleton's lease
    lasts without a renewal (a dead holder's singleton moves within ``lease_ttl +
    0.5`` s). Credentials: ``user``/``password``, ``token``, ``creds`` (a ``.creds``
    file), ``nkey`` (an nkey seed file); TLS: ``tls_ca``, ``tls_cert``, ``tls_key``
    (a URL with ``tls://`` uses the system's trust store). ``replicas``: copies of the
    cluster's buckets and event stream (3 on a three-server NATS cluster, so losing one
    server loses no lease).

    Example::

        ClusterSettings("nats://127.0.0.1:4222", node="a", name="shop", lease_ttl=1.0)
    """

    url: str
    node: str = field(default_factory=socket.gethostname)
    name: str = "trellis"
    lease_ttl: float = DEFAULT_LEASE_TTL
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds: str | None = None
    nkey: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    #: copies of each bucket and stream: 1 on one NATS server, 3 on a NATS cluster
    replicas: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url.strip():
            raise ClusterError(f"cluster url: give nats://HOST:PORT, got {self.url!r}")
        for part in self.url.split(","):
            scheme = part.strip().partition("://")[0]
            if scheme not in ("nats", "tls", "ws", "wss"):
                raise ClusterError(
                    f"cluster url {part.strip()!r}: use nats://HOST:PORT or tls://HOST:PORT"
                )
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ClusterError(
                f"cluster name {self.name!r}: use 1-64 letters, digits, '-' or '_' "
                "(it prefixes the cluster's NATS buckets and subjects)"
            )
        if not isinstance(self.node, str) or not _NODE.fullmatch(self.node):
            raise ClusterError(
                f"cluster node {self.node!r}: use 1-128 letters, digits, '-', '_', '=' or '.'"
            )
        ttl = self.lease_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0.2 <= ttl <= 3600:
            raise ClusterError(f"cluster lease_ttl {ttl!r}: give seconds between 0.2 and 3600")
        if isinstance(self.replicas, bool) or self.replicas not in (1, 2, 3, 4, 5):
            raise ClusterError(f"cluster replicas {self.replicas!r}: give 1 to 5")
        if (self.user is None) != (self.password is None):
            raise ClusterError("cluster: give user and password together")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ClusterError("cluster: give tls_cert and tls_key together")

    @property
    def renew_interval(self) -> float:
        """How often a holder renews its lease: a quarter of the TTL."""
        return self.lease_ttl / 4

    @property
    def renew_deadline(self) -> float:
        """A holder that has not renewed for this long stops its child (0.6 TTL: the
        other 0.4 TTL is the margin for killing it before anyone else may start it)."""
        return self.lease_ttl * 0.6

    @property
    def poll_interval(self) -> float:
        """How often a node that does not hold a lease looks at it."""
        return max(0.02, self.lease_ttl / 10)

    def bucket(self, what: str) -> str:
        """The KV bucket ``what`` of this cluster: ``trellis_<name>_<what>``."""
        return f"trellis_{self.name}_{what}"

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` (reconnects forever)."""
        opts: dict[str, Any] = {
            "servers": [u.strip() for u in self.url.split(",") if u.strip()],
            "name": f"trellis:{self.name}:{self.node}",
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": min(0.5, self.lease_ttl / 4),
            "connect_timeout": max(1, int(self.lease_ttl)),
            "ping_interval": max(1, int(self.lease_ttl * 2)),
            "max_outstanding_pings": 2,
        }
        if self.user is not None:
            opts["user"], opts["password"] = self.user, self.password
        if self.token is not None:
            opts["token"] = self.token
        if self.creds is not None:
            opts["user_credentials"] = self.creds
        if self.nkey is not None:
            opts["nkeys_seed"] = self.nkey
        if self.tls_ca is not None or self.tls_cert is not None:
            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = ctx
        return opts

    @classmethod
    def from_settings(
        cls, table: dict[str, Any], *, url: str | None = None, node: str | None = None
    ) -> ClusterSettings | None:
        """From a tree file's ``[cluster]`` table and command-line overrides; None when
        neither gives a URL (single-node use needs no NATS)."""
        values = dict(table)
        if url is not None:
            values["url"] = url
        if node is not None:
            values["node"] = node
        if not values.get("url"):
            if values:
                raise ClusterError("[cluster] needs url (or trellis run --cluster URL)")
            return None
        return cls(**values)
