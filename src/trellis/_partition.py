"""PartitionSupervisor: n copies of one child, routed to by key.

Example::

    await trellis.PartitionSupervisor.start_link(Cache.child_spec(), partitions=4, name="caches")
    await trellis.call(trellis.Via("caches", user_id), ("get", key))   # abs(user_id) % 4
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ._childspec import ChildSpec, SupervisorSpec
from ._core._exceptions import InvalidFlags
from ._supervisor import Supervisor, partition_index

__all__ = ["PartitionSupervisor", "partition_index"]


class PartitionSupervisor(Supervisor):
    """Starts ``partitions`` children (default: the number of CPUs) with ids ``0..n-1``.

    ``Via(name, key)`` reaches partition ``abs(key) % n`` for an int key and a
    stable hash of ``repr(key)`` otherwise. ``with_arguments(args, partition)``
    may rewrite each child's start args.
    """

    _partitions: int | None = None

    async def init(self, *args: Any, **kwargs: Any) -> SupervisorSpec:
        """Build ``partitions`` copies of ``child_spec`` (see the class docs for arguments)."""
        return self._partitioned(*args, **kwargs)

    def _partitioned(
        self,
        child_spec: Any,
        *,
        partitions: int | None = None,
        with_arguments: Callable[[tuple[Any, ...], int], tuple[Any, ...]] | None = None,
        strategy: Any = "one_for_one",
        intensity: int = 3,
        period: float = 5.0,
    ) -> SupervisorSpec:
        n = (os.cpu_count() or 1) if partitions is None else partitions
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InvalidFlags(n, "partitions must be an int >= 1", field="partitions")
        self._partitions = n
        base = ChildSpec.coerce(child_spec)
        children = []
        for i in range(n):
            args = with_arguments(base.args, i) if with_arguments is not None else base.args
            children.append(dataclasses.replace(base, id=i, args=tuple(args)))
        return SupervisorSpec(children, strategy=strategy, intensity=intensity, period=period)

    @staticmethod
    def partitions_of(n: int, key: Any) -> int:
        """The partition index ``key`` routes to among ``n``."""
        return partition_index(key, n)
