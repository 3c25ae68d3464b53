"""Chaos: break a running tree on a seeded schedule and measure how it heals.

Example::

    from trellis import chaos

    plan = chaos.Plan.from_spec(
        [
            {"fault": "kill", "target": "root/collectors/*", "every": 5, "jitter": 1,
             "percent": 50},
            {"fault": "hang", "target": "root/collectors/c1", "at": 10, "duration": 4},
            {"fault": "outage", "proxy": "redis", "poisson": 0.05, "duration": 3},
        ],
        seed=7, duration=60)
    print(plan.describe())                     # the whole schedule, before anything runs
    async with chaos.ChaosProxy(("127.0.0.1", 6379)) as redis_proxy:
        async with chaos.Chaos(root, plan, proxies={"redis": redis_proxy},
                               max_concurrent=2) as engine:
            report = await engine.run()
    report.render()                            # or report.to_json()

Faults: ``kill`` (KILL exit signal; SIGKILL to an OS process's group), ``raise`` (the
child crashes with ``ChaosError``; SIGABRT to an OS process), ``exit`` (ends with
``NORMAL``; SIGTERM to an OS process, whose own handling decides the reason), ``hang``
(a server stops taking messages; SIGSTOP/SIGCONT for an OS process), ``slow`` (each
message waits ``delay`` more; an OS process is stopped and resumed ``delay`` seconds
at a time), ``outage`` (a :class:`ChaosProxy` is cut). Every fault and heal is a
telemetry ``operator.action`` by ``chaos``, so the journal records it.

Nothing here runs unless asked for: the kernel has no chaos hook.
"""

from ._engine import Chaos as Chaos
from ._engine import start as start
from ._inject import ChaosError as ChaosError
from ._plan import FAULTS as FAULTS
from ._plan import KINDS as KINDS
from ._plan import ChaosSpecError as ChaosSpecError
from ._plan import Plan as Plan
from ._plan import Step as Step
from ._plan import parse_fault as parse_fault
from ._proxy import ChaosProxy as ChaosProxy
from ._proxy import ProxyStatistics as ProxyStatistics
from ._report import FaultResult as FaultResult
from ._report import Report as Report
from ._report import percentile as percentile

__all__ = [
    "FAULTS",
    "KINDS",
    "Chaos",
    "ChaosError",
    "ChaosProxy",
    "ChaosSpecError",
    "FaultResult",
    "Plan",
    "ProxyStatistics",
    "Report",
    "Step",
    "parse_fault",
    "percentile",
    "start",
]
