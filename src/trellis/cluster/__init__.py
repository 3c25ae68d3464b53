"""Cluster mode on NATS JetStream: membership, fenced singletons, global names, pubsub.

A subscriber layer: behaviours never import it, and importing it does not import
nats-py (that happens when a :class:`Cluster` starts). Install with
``pip install 'trellis-otp[cluster]'``.

Example::

    import trellis, trellis.cluster as tc
    spec = tc.singleton(trellis.Command(["./leader"], id="leader"))
    cluster = tc.Cluster(tc.ClusterSettings("nats://127.0.0.1:4222", node="a", lease_ttl=1))
    trellis.run(lambda: trellis.Supervisor.start_link([spec]), extensions=[cluster])
"""

from . import pubsub
from ._distributed import (
    DistributedSupervisor,
    owner_of,
    start_child,
    terminate_child,
    which_children,
)
from ._events import replay
from ._global import Global, RemoteExit
from ._node import Cluster, Lease, current
from ._settings import DEFAULT_LEASE_TTL, ClusterError, ClusterSettings
from ._singleton import FENCING_TOKEN_ENV, LeaseLost, fencing_token, singleton

__all__ = [
    "DEFAULT_LEASE_TTL",
    "FENCING_TOKEN_ENV",
    "Cluster",
    "ClusterError",
    "ClusterSettings",
    "DistributedSupervisor",
    "Global",
    "Lease",
    "LeaseLost",
    "RemoteExit",
    "current",
    "fencing_token",
    "owner_of",
    "pubsub",
    "replay",
    "singleton",
    "start_child",
    "terminate_child",
    "which_children",
]
