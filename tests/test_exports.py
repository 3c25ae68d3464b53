"""The public surface: one sorted __all__, every name importable, public classes report
``trellis`` as their module, and the names DESIGN.md promises exist."""

from __future__ import annotations

import trellis

DESIGN_NAMES = {
    # processes
    "spawn", "self", "exit", "link", "unlink", "monitor", "demonitor", "whereis", "Pid",
    # server
    "Server", "call", "cast", "stop", "Continue", "Stop", "NoReply", "IGNORE",
    # reasons
    "NORMAL", "SHUTDOWN", "Shutdown", "KILLED", "KILL", "NOPROC", "Exit", "Down",
    # supervisors and friends
    "Supervisor", "SupervisorSpec", "ChildSpec", "ChildInfo", "Counts", "RESTARTING",
    "DynamicSupervisor", "Registry", "Via", "TaskSupervisor", "PartitionSupervisor",
    "worker", "Backoff", "run", "telemetry", "testing",
    # errors
    "TrellisError", "CallTimeout", "NoProc", "CallingSelf", "Exited", "AlreadyStarted",
    "AlreadyPresent", "StartError", "NotFound", "Running", "Restarting", "MailboxFull",
}  # fmt: skip


def test_all_is_sorted_and_importable() -> None:
    assert list(trellis.__all__) == sorted(trellis.__all__)
    for name in trellis.__all__:
        assert hasattr(trellis, name), name


def test_design_names_are_exported() -> None:
    assert set(trellis.__all__) >= DESIGN_NAMES, DESIGN_NAMES - set(trellis.__all__)


def test_public_classes_report_the_trellis_module() -> None:
    for name in trellis.__all__:
        obj = getattr(trellis, name)
        if isinstance(obj, type):
            assert obj.__module__ == "trellis", name


def test_every_error_is_a_trellis_error() -> None:
    for name in trellis.__all__:
        obj = getattr(trellis, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, trellis.TrellisError), name


def test_enums_accept_their_string_values() -> None:
    assert trellis.Strategy("rest_for_one") is trellis.Strategy.REST_FOR_ONE
    assert trellis.RestartType("transient") is trellis.RestartType.TRANSIENT
    spec = trellis.ChildSpec("x", trellis.spawn, restart="temporary", shutdown="brutal_kill")
    assert spec.restart is trellis.RestartType.TEMPORARY
    assert spec.shutdown is trellis.ShutdownMode.BRUTAL_KILL
