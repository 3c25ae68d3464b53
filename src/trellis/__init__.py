"""Trellis: Erlang/OTP supervision trees for Python services.

Example::

    import trellis

    class Counter(trellis.Server):
        async def init(self, start=0):
            self.n = start

        async def handle_call(self, request, caller):
            return self.n

    async def main():
        sup = await trellis.Supervisor.start_link([Counter.child_spec(0, id="counter")])
        [child] = await sup.which_children()
        print(await trellis.call(child.pid, "get"))
        await sup.stop()
"""

import typing as _typing

from . import telemetry as telemetry
from . import testing as testing
from ._children import Command as Command
from ._children import CommandPid as CommandPid
from ._children import ExitCode as ExitCode
from ._children import Health as Health
from ._children import Hung as Hung
from ._children import LimitExceeded as LimitExceeded
from ._children import Limits as Limits
from ._children import Logs as Logs
from ._children import ProcessExitReason as ProcessExitReason
from ._children import Ready as Ready
from ._children import ReadyTimeout as ReadyTimeout
from ._children import Signaled as Signaled
from ._childspec import AutoShutdown as AutoShutdown
from ._childspec import Backoff as Backoff
from ._childspec import ChildSpec as ChildSpec
from ._childspec import ChildType as ChildType
from ._childspec import RestartType as RestartType
from ._childspec import ShutdownMode as ShutdownMode
from ._childspec import Strategy as Strategy
from ._childspec import SupervisorSpec as SupervisorSpec
from ._core._clock import sleep as sleep
from ._core._exceptions import AlreadyPresent as AlreadyPresent
from ._core._exceptions import AlreadyRegistered as AlreadyRegistered
from ._core._exceptions import AlreadyStarted as AlreadyStarted
from ._core._exceptions import BadCombination as BadCombination
from ._core._exceptions import BadFlagCombination as BadFlagCombination
from ._core._exceptions import BadReturnValue as BadReturnValue
from ._core._exceptions import BadStartSpec as BadStartSpec
from ._core._exceptions import CallingSelf as CallingSelf
from ._core._exceptions import CallTimeout as CallTimeout
from ._core._exceptions import ChildSpecError as ChildSpecError
from ._core._exceptions import DuplicateChildName as DuplicateChildName
from ._core._exceptions import Exited as Exited
from ._core._exceptions import FailedToStartChild as FailedToStartChild
from ._core._exceptions import InvalidAutoShutdown as InvalidAutoShutdown
from ._core._exceptions import InvalidChildSpec as InvalidChildSpec
from ._core._exceptions import InvalidChildType as InvalidChildType
from ._core._exceptions import InvalidExtraArguments as InvalidExtraArguments
from ._core._exceptions import InvalidFlags as InvalidFlags
from ._core._exceptions import InvalidIntensity as InvalidIntensity
from ._core._exceptions import InvalidMaxChildren as InvalidMaxChildren
from ._core._exceptions import InvalidModule as InvalidModule
from ._core._exceptions import InvalidModules as InvalidModules
from ._core._exceptions import InvalidPeriod as InvalidPeriod
from ._core._exceptions import InvalidRestartType as InvalidRestartType
from ._core._exceptions import InvalidShutdown as InvalidShutdown
from ._core._exceptions import InvalidSignificant as InvalidSignificant
from ._core._exceptions import InvalidStart as InvalidStart
from ._core._exceptions import InvalidStrategy as InvalidStrategy
from ._core._exceptions import MailboxFull as MailboxFull
from ._core._exceptions import MaxChildren as MaxChildren
from ._core._exceptions import MissingId as MissingId
from ._core._exceptions import MissingStart as MissingStart
from ._core._exceptions import NoProc as NoProc
from ._core._exceptions import NotAProcess as NotAProcess
from ._core._exceptions import NotFound as NotFound
from ._core._exceptions import ReceiveTimeout as ReceiveTimeout
from ._core._exceptions import Restarting as Restarting
from ._core._exceptions import Running as Running
from ._core._exceptions import SimpleOneForOne as SimpleOneForOne
from ._core._exceptions import StartError as StartError
from ._core._exceptions import SupervisorFlagsError as SupervisorFlagsError
from ._core._exceptions import TrellisError as TrellisError
from ._core._process import Pid as Pid
from ._core._process import Ref as Ref
from ._core._process import Via as Via
from ._core._process import demonitor as demonitor
from ._core._process import exit as exit
from ._core._process import link as link
from ._core._process import monitor as monitor
from ._core._process import receive as receive
from ._core._process import register as register
from ._core._process import self as self
from ._core._process import spawn as spawn
from ._core._process import unlink as unlink
from ._core._process import unregister as unregister
from ._core._process import whereis as whereis
from ._core._reasons import IGNORE as IGNORE
from ._core._reasons import KILL as KILL
from ._core._reasons import KILLED as KILLED
from ._core._reasons import NOPROC as NOPROC
from ._core._reasons import NORMAL as NORMAL
from ._core._reasons import RESTARTING as RESTARTING
from ._core._reasons import SHUTDOWN as SHUTDOWN
from ._core._reasons import Down as Down
from ._core._reasons import Exit as Exit
from ._core._reasons import ExitReason as ExitReason
from ._core._reasons import Shutdown as Shutdown
from ._core._reasons import is_clean as is_clean
from ._partition import PartitionSupervisor as PartitionSupervisor
from ._plugins._errors import PluginError as PluginError
from ._registry import Registry as Registry
from ._registry import RegistryPid as RegistryPid
from ._run import run as run
from ._run import run_async as run_async
from ._server import Caller as Caller
from ._server import Continue as Continue
from ._server import NoReply as NoReply
from ._server import Reply as Reply
from ._server import Server as Server
from ._server import Stop as Stop
from ._server import call as call
from ._server import cast as cast
from ._server import send as send
from ._server import stop as stop
from ._supervisor import ChildInfo as ChildInfo
from ._supervisor import Counts as Counts
from ._supervisor import DynamicSupervisor as DynamicSupervisor
from ._supervisor import DynamicSupervisorPid as DynamicSupervisorPid
from ._supervisor import Supervisor as Supervisor
from ._supervisor import SupervisorPid as SupervisorPid
from ._tasks import TaskHandle as TaskHandle
from ._tasks import TaskSupervisor as TaskSupervisor
from ._tasks import TaskSupervisorPid as TaskSupervisorPid
from ._worker import worker as worker

__version__ = "0.1.0.dev0"

if _typing.TYPE_CHECKING:  # the lazy names below, for type checkers (not imported at run time)
    from ._isolated import Isolated as Isolated
    from ._isolated import IsolatedExit as IsolatedExit
    from ._isolated import UnsupportedMessage as UnsupportedMessage
    from ._isolated import message_type as message_type
    from ._plugins import Plugin as Plugin
    from ._plugins import PluginHost as PluginHost
    from ._plugins import plugin_call as plugin_call
    from ._plugins import plugin_info as plugin_info
    from .cluster import pubsub as pubsub
    from .cluster._global import Global as Global
del _typing

#: Exported names whose modules are imported on first use (they pull in heavy
#: dependencies that `trellis run` does not need before the root is up).
_LAZY = {
    "Global": ".cluster._global",  # cluster-wide names (nats-py only once a cluster starts)
    "pubsub": ".cluster",
    "Isolated": "._isolated",
    "IsolatedExit": "._isolated",
    "UnsupportedMessage": "._isolated",
    "message_type": "._isolated",
    "Plugin": "._plugins",
    "PluginHost": "._plugins",
    "plugin_call": "._plugins",
    "plugin_info": "._plugins",
}

__all__ = sorted(
    [name for name in dir() if not name.startswith("_") and name not in {"annotations"}]
    + list(_LAZY)
)

for _name in __all__:
    if _name in _LAZY:
        continue
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("trellis._"):
        try:
            _obj.__module__ = "trellis"
        except (AttributeError, TypeError):
            pass
del _name, _obj


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'trellis' has no attribute {name!r}")
    import importlib

    obj = getattr(importlib.import_module(module, __name__), name)
    if isinstance(obj, type) and obj.__module__.startswith("trellis._"):
        obj.__module__ = "trellis"
    globals()[name] = obj
    return obj
