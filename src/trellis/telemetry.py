"""The telemetry bus (public): ``attach``, ``detach``, ``subscribe``, ``emit``.

Event names: ``supervisor.started``, ``supervisor.stopped``, ``supervisor.gave_up``,
``supervisor.auto_shutdown``, ``child.started``, ``child.exited`` (``reason``,
``restart``), ``child.restarted``, ``child.start_failed``, ``child.backoff``
(``delay``), ``child.terminated``, ``mailbox.overflow``, ``process.unkillable``,
``telemetry.handler_failed``. Supervisor events carry ``supervisor`` (the tree
path), ``sup_pid``, ``child_id`` and ``pid``; every event has ``event`` and ``time``.
"""

from ._core._telemetry import Handler, Subscription, active, attach, detach, emit, subscribe

__all__ = ["Handler", "Subscription", "active", "attach", "detach", "emit", "subscribe"]
