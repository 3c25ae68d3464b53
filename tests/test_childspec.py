"""SPEC section A: child-spec and supervisor-flag validation, defaults, init returns."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import trellis
from _helpers import idle, settle

# ---------------------------------------------------------------------------
# helpers


async def start_idle(*args: Any, **kwargs: Any) -> trellis.Pid:
    """A valid child start function: spawns and links an idle process."""
    return trellis.spawn(idle, link=True)


def val(x: Any) -> Any:
    """An enum member's value, or x itself (enums accept their string values)."""
    return getattr(x, "value", x)


async def check(specs: Any) -> None:
    """Supervisor.check_childspecs, whether it is sync or async."""
    res = trellis.Supervisor.check_childspecs(specs)
    if inspect.isawaitable(res):
        await res


def good(id: str = "a", **extra: Any) -> dict[str, Any]:
    return {"id": id, "start": start_idle, **extra}


async def assert_no_processes() -> None:
    await settle()
    assert trellis.testing.live_processes() == []


async def expect_spec_error(
    make_spec: Callable[[], Any], cls: type[Exception], field: str | None, value: Any
) -> None:
    """The spec error surfaces identically from check_childspecs, start_link and start_child.

    ``make_spec`` is called inside each ``pytest.raises`` so a ChildSpec constructor that
    validates eagerly is also accepted.
    """
    with pytest.raises(cls) as ei:
        await check([make_spec()])
    _assert_fields(ei.value, field, value)

    with pytest.raises(cls) as ei:
        await trellis.Supervisor.start_link([make_spec()])
    _assert_fields(ei.value, field, value)
    await assert_no_processes()

    sup = await trellis.Supervisor.start_link([good("ok")])
    try:
        before = await sup.which_children()
        with pytest.raises(cls) as ei:
            await sup.start_child(make_spec())
        _assert_fields(ei.value, field, value)
        assert sup.alive
        assert await sup.which_children() == before
    finally:
        await sup.stop()


def _assert_fields(exc: BaseException, field: str | None, value: Any) -> None:
    assert isinstance(exc, trellis.ChildSpecError)
    assert isinstance(exc, ValueError)
    if field is not None:
        assert exc.field == field
        assert field in str(exc)
    if value is not _ANY:
        assert exc.value == value
        assert repr(value) in str(exc) or str(value) in str(exc)


_ANY = object()


# ---------------------------------------------------------------------------
# SPEC 1-10: child spec validation


async def test_missing_id_and_missing_start() -> None:
    """SPEC 1: a spec needs id and start; id is checked first, so {} is MissingId."""
    await expect_spec_error(lambda: {}, trellis.MissingId, "id", _ANY)
    await expect_spec_error(lambda: {"start": start_idle}, trellis.MissingId, "id", _ANY)
    await expect_spec_error(lambda: {"id": "a"}, trellis.MissingStart, "start", _ANY)


async def test_start_link_validates_every_spec_before_starting_any_child() -> None:
    """SPEC 2: a spec error fails start_link itself; no child, not even earlier ones, runs."""
    started: list[str] = []

    async def start_logged() -> trellis.Pid:
        started.append("a")
        return trellis.spawn(idle, link=True)

    with pytest.raises(trellis.InvalidRestartType):
        await trellis.Supervisor.start_link(
            [{"id": "a", "start": start_logged}, good("b", restart="sometimes")]
        )
    assert started == []
    await assert_no_processes()


async def test_rejected_start_child_leaves_supervisor_unaffected() -> None:
    """SPEC 2: start_child with a bad spec raises the spec error; the supervisor is unchanged."""
    sup = await trellis.Supervisor.start_link([good("a")])
    try:
        before = await sup.which_children()
        counts = await sup.count_children()
        with pytest.raises(trellis.InvalidStart):
            await sup.start_child({"id": "b", "start": 42})
        assert sup.alive
        assert await sup.which_children() == before
        assert await sup.count_children() == counts
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("b")
        pid = await sup.start_child(good("b"))
        assert isinstance(pid, trellis.Pid)
        assert [c.id for c in await sup.which_children()] == ["b", "a"]
    finally:
        await sup.stop()


@pytest.mark.parametrize("bad", [42, "start_idle", None], ids=["int", "str", "none"])
async def test_start_must_be_callable(bad: Any) -> None:
    """SPEC 3: a start that is not callable is InvalidStart naming the value."""
    if bad is None:
        # None is what "absent" looks like in a dataclass: MissingStart is also acceptable
        with pytest.raises((trellis.InvalidStart, trellis.MissingStart)):
            await check([{"id": "a", "start": None}])
        return
    await expect_spec_error(lambda: {"id": "a", "start": bad}, trellis.InvalidStart, "start", bad)
    await expect_spec_error(lambda: trellis.ChildSpec("a", bad), trellis.InvalidStart, "start", bad)


async def test_restart_type_validation() -> None:
    """SPEC 4: restart must be permanent, transient or temporary (else InvalidRestartType)."""
    await expect_spec_error(
        lambda: good(restart="sometimes"), trellis.InvalidRestartType, "restart", "sometimes"
    )
    await expect_spec_error(
        lambda: trellis.ChildSpec("a", start_idle, restart="always"),
        trellis.InvalidRestartType,
        "restart",
        "always",
    )
    for ok in ("permanent", "transient", "temporary"):
        await check([good(restart=ok)])
        await check([trellis.ChildSpec("a", start_idle, restart=ok)])


@pytest.mark.parametrize("bad", [-1, -0.5, "soon", "Infinity"])
async def test_invalid_shutdown(bad: Any) -> None:
    """SPEC 5: shutdown other than brutal_kill, infinity or a number >= 0 is InvalidShutdown."""
    await expect_spec_error(lambda: good(shutdown=bad), trellis.InvalidShutdown, "shutdown", bad)


@pytest.mark.parametrize("ok", ["brutal_kill", "infinity", 0, 0.0, 2.5, 10])
async def test_valid_shutdown_values_including_zero(ok: Any) -> None:
    """SPEC 5: brutal_kill, infinity and any number >= 0 (0 included) are legal shutdowns."""
    await check([good(shutdown=ok)])
    sup = await trellis.Supervisor.start_link([good("a", shutdown=ok)])
    try:
        spec = await sup.get_childspec("a")
        assert val(spec.shutdown) == ok
    finally:
        await sup.stop()


async def test_invalid_child_type() -> None:
    """SPEC 6: type other than worker or supervisor is InvalidChildType."""
    await expect_spec_error(
        lambda: good(type="process"), trellis.InvalidChildType, "type", "process"
    )
    await check([good(type="worker")])
    await check([good(type="supervisor")])


async def test_invalid_modules_and_invalid_module() -> None:
    """SPEC 7: modules is "dynamic" or a sequence of str; else InvalidModules / InvalidModule."""
    await expect_spec_error(lambda: good(modules=42), trellis.InvalidModules, "modules", 42)
    await expect_spec_error(lambda: good(modules=["ok", 42]), trellis.InvalidModule, None, 42)
    for ok in ("dynamic", ["a", "b"], ("a",), []):
        await check([good(modules=ok)])


async def test_invalid_significant() -> None:
    """SPEC 8: significant must be a boolean, else InvalidSignificant."""
    await expect_spec_error(
        lambda: good(restart="transient", significant="yes"),
        trellis.InvalidSignificant,
        "significant",
        "yes",
    )
    await check([good(significant=False)])


async def test_checks_run_in_order_and_report_the_first_failure() -> None:
    """SPEC 9: checks run id, start, restart, significant, type, shutdown, modules."""
    spec: dict[str, Any] = {
        "start": 42,
        "restart": "sometimes",
        "significant": "yes",
        "type": "process",
        "shutdown": -1,
        "modules": 42,
    }
    expected = [
        ("id", "a", trellis.MissingId),
        ("start", start_idle, trellis.InvalidStart),
        ("restart", "temporary", trellis.InvalidRestartType),
        ("significant", False, trellis.InvalidSignificant),
        ("type", "worker", trellis.InvalidChildType),
        ("shutdown", 1.0, trellis.InvalidShutdown),
        ("modules", "dynamic", trellis.InvalidModules),
    ]
    for key, fix, cls in expected:
        with pytest.raises(cls):
            await check([dict(spec)])
        spec[key] = fix
    await check([spec])


@pytest.mark.parametrize("bad", [42, "a", ("a", start_idle), [good("a")]], ids=str)
async def test_spec_neither_childspec_nor_dict_is_invalid_child_spec(bad: Any) -> None:
    """SPEC 10: a spec that is neither a ChildSpec nor a dict is InvalidChildSpec."""
    await expect_spec_error(lambda: bad, trellis.InvalidChildSpec, None, bad)


async def test_unknown_dict_keys_are_ignored() -> None:
    """SPEC 10: unknown keys in a dict spec are ignored."""
    await check([good(colour="blue")])
    sup = await trellis.Supervisor.start_link([good("a", colour="blue")])
    try:
        (child,) = await sup.which_children()
        assert child.id == "a"
        assert isinstance(child.pid, trellis.Pid)
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 11-12: defaults, get_childspec, duplicates


async def test_child_spec_defaults_via_get_childspec() -> None:
    """SPEC 11: defaults are permanent, worker, shutdown 5.0, modules (start.__module__,),
    significant False; get_childspec returns the fully defaulted ChildSpec."""
    sup = await trellis.Supervisor.start_link([good("w")])
    try:
        spec = await sup.get_childspec("w")
        assert isinstance(spec, trellis.ChildSpec)
        assert spec.id == "w"
        assert spec.start is start_idle
        assert tuple(spec.args) == ()
        assert dict(spec.kwargs) == {}
        assert val(spec.restart) == "permanent"
        assert val(spec.type) == "worker"
        assert val(spec.shutdown) == 5.0
        assert tuple(spec.modules) == (start_idle.__module__,)
        assert spec.significant is False
    finally:
        await sup.stop()


async def test_supervisor_type_defaults_to_infinity_shutdown() -> None:
    """SPEC 11: a child of type supervisor defaults to shutdown infinity."""
    sup = await trellis.Supervisor.start_link(
        [trellis.ChildSpec("s", start_idle, type="supervisor")]
    )
    try:
        spec = await sup.get_childspec("s")
        assert val(spec.type) == "supervisor"
        assert val(spec.shutdown) == "infinity"
        assert val(spec.restart) == "permanent"
    finally:
        await sup.stop()


async def test_explicit_values_are_kept_by_get_childspec() -> None:
    """SPEC 11: explicitly given fields are returned unchanged by get_childspec."""
    spec_in = trellis.ChildSpec(
        "t",
        start_idle,
        args=(1, 2),
        kwargs={"k": 3},
        restart="transient",
        shutdown="brutal_kill",
        modules=["m1", "m2"],
    )
    sup = await trellis.Supervisor.start_link([spec_in])
    try:
        spec = await sup.get_childspec("t")
        assert tuple(spec.args) == (1, 2)
        assert dict(spec.kwargs) == {"k": 3}
        assert val(spec.restart) == "transient"
        assert val(spec.shutdown) == "brutal_kill"
        assert tuple(spec.modules) == ("m1", "m2")
    finally:
        await sup.stop()


async def test_get_childspec_unknown_id_raises_not_found() -> None:
    """SPEC 11: get_childspec for an unknown id raises NotFound."""
    sup = await trellis.Supervisor.start_link([good("a")])
    try:
        with pytest.raises(trellis.NotFound):
            await sup.get_childspec("nope")
    finally:
        await sup.stop()


async def test_duplicate_ids_in_init_list() -> None:
    """SPEC 12: duplicate ids in the init list raise DuplicateChildName naming the id."""
    with pytest.raises(trellis.DuplicateChildName) as ei:
        await check([good("a"), good("b"), good("a")])
    assert ei.value.value == "a"
    assert isinstance(ei.value, trellis.ChildSpecError)
    with pytest.raises(trellis.DuplicateChildName) as ei:
        await trellis.Supervisor.start_link([good("a"), good("b"), good("a")])
    assert ei.value.value == "a"
    await assert_no_processes()


# ---------------------------------------------------------------------------
# SPEC 13-15: supervisor flags


def test_supervisor_spec_flag_defaults() -> None:
    """SPEC 13: flag defaults are one_for_one, intensity 3, period 5.0, auto_shutdown never."""
    spec = trellis.SupervisorSpec([])
    assert val(spec.strategy) == "one_for_one"
    assert spec.intensity == 3
    assert spec.period == 5.0
    assert val(spec.auto_shutdown) == "never"


async def _crash(sup: trellis.Pid, child_id: str, pid: trellis.Pid) -> trellis.Pid:
    trellis.exit(pid, RuntimeError(f"crash {child_id}"))
    async with asyncio.timeout(5):
        return await trellis.testing.wait_restarted(sup, child_id, pid)


async def _child_pid(sup: Any, child_id: str) -> trellis.Pid:
    for c in await sup.which_children():
        if c.id == child_id:
            assert isinstance(c.pid, trellis.Pid)
            return c.pid
    raise AssertionError(f"no child {child_id}")


async def test_default_strategy_is_one_for_one(clock: trellis.testing.VirtualClock) -> None:
    """SPEC 13: by default only the failed child is restarted; the sibling's pid is unchanged."""
    sup = await trellis.Supervisor.start_link([good("a"), good("b")])
    try:
        a, b = await _child_pid(sup, "a"), await _child_pid(sup, "b")
        new_a = await _crash(sup, "a", a)
        assert new_a != a
        assert await _child_pid(sup, "b") == b
        assert b.alive
    finally:
        await sup.stop()


async def test_default_intensity_allows_three_restarts(clock: trellis.testing.VirtualClock) -> None:
    """SPEC 13/43: default intensity 3: three restarts are made, the fourth failure gives up."""
    sup = await trellis.Supervisor.start_link([good("a")])
    pid = await _child_pid(sup, "a")
    for _ in range(3):
        pid = await _crash(sup, "a", pid)
    assert sup.alive
    trellis.exit(pid, RuntimeError("fourth"))
    async with asyncio.timeout(5):
        assert await sup.join() == trellis.SHUTDOWN
    await assert_no_processes()


async def test_default_period_is_five_seconds(clock: trellis.testing.VirtualClock) -> None:
    """SPEC 13/44: default period 5: restarts 4 s apart accumulate, 6+ s apart do not."""
    sup = await trellis.Supervisor.start_link([good("a")])
    try:
        pid = await _child_pid(sup, "a")
        for _ in range(3):
            pid = await _crash(sup, "a", pid)
        await clock.advance(6.5)
        for _ in range(3):  # the old three have left the window
            pid = await _crash(sup, "a", pid)
        assert sup.alive
        await clock.advance(4.0)  # still inside the window of the last three
        trellis.exit(pid, RuntimeError("one too many"))
        async with asyncio.timeout(5):
            assert await sup.join() == trellis.SHUTDOWN
    finally:
        if sup.alive:
            await sup.stop()
    await assert_no_processes()


async def test_default_auto_shutdown_is_never() -> None:
    """SPEC 13/78: with the default auto_shutdown (never) a significant child is rejected."""
    with pytest.raises(trellis.BadCombination):
        await trellis.Supervisor.start_link([good("a", restart="transient", significant=True)])
    await assert_no_processes()


@pytest.mark.parametrize(
    ("flags", "cls", "field", "value"),
    [
        ({"strategy": "one_for_some"}, trellis.InvalidStrategy, "strategy", "one_for_some"),
        ({"intensity": -1}, trellis.InvalidIntensity, "intensity", -1),
        ({"intensity": 1.5}, trellis.InvalidIntensity, "intensity", 1.5),
        ({"intensity": "infinity"}, trellis.InvalidIntensity, "intensity", "infinity"),
        ({"intensity": float("inf")}, trellis.InvalidIntensity, "intensity", float("inf")),
        ({"period": 0}, trellis.InvalidPeriod, "period", 0),
        ({"period": -1.0}, trellis.InvalidPeriod, "period", -1.0),
        ({"period": "5"}, trellis.InvalidPeriod, "period", "5"),
        ({"auto_shutdown": "sometimes"}, trellis.InvalidAutoShutdown, "auto_shutdown", "sometimes"),
    ],
    ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__,
)
async def test_bad_supervisor_flags(
    flags: dict[str, Any], cls: type[Exception], field: str, value: Any
) -> None:
    """SPEC 14: bad flags raise the specific SupervisorFlagsError naming field and value."""
    with pytest.raises(cls) as ei:
        await trellis.Supervisor.start_link([good("a")], **flags)
    err = ei.value
    assert isinstance(err, trellis.SupervisorFlagsError)
    assert isinstance(err, ValueError)
    assert err.field == field
    assert err.value == value
    assert field in str(err)
    assert repr(value) in str(err) or str(value) in str(err)
    await assert_no_processes()


async def test_boundary_flags_are_accepted() -> None:
    """SPEC 14: intensity 0 and any period > 0 (floats too) are legal."""
    sup = await trellis.Supervisor.start_link([good("a")], intensity=0, period=0.5)
    await sup.stop()
    sup = await trellis.Supervisor.start_link(
        [good("a")], strategy="rest_for_one", auto_shutdown="any_significant", period=10
    )
    await sup.stop()


@pytest.mark.parametrize("n", [0, 2])
async def test_simple_one_for_one_needs_exactly_one_spec(n: int) -> None:
    """SPEC 15: simple_one_for_one with other than one child spec raises BadStartSpec."""
    specs = [good(f"c{i}") for i in range(n)]
    with pytest.raises(trellis.BadStartSpec) as ei:
        await trellis.Supervisor.start_link(specs, strategy="simple_one_for_one")
    assert isinstance(ei.value, trellis.SupervisorFlagsError)
    await assert_no_processes()


async def test_simple_one_for_one_with_one_spec_starts_children_from_it() -> None:
    """SPEC 15: with exactly one spec, simple_one_for_one starts (and accepts) dynamic children."""
    got: list[tuple[Any, ...]] = []

    async def start_with(*args: Any) -> trellis.Pid:
        got.append(args)
        return trellis.spawn(idle, link=True)

    sup = await trellis.Supervisor.start_link(
        [{"id": "ignored-id", "start": start_with, "args": ("base",)}],
        strategy="simple_one_for_one",
    )
    try:
        assert got == []
        pid = await sup.start_child(["extra"])
        assert isinstance(pid, trellis.Pid)
        assert got == [("base", "extra")]
    finally:
        await sup.stop()


# ---------------------------------------------------------------------------
# SPEC 16-17: init returns


class IgnoringSup(trellis.Supervisor):
    pids: list[trellis.Pid] = []

    async def init(self) -> Any:
        IgnoringSup.pids.append(trellis.self())
        return trellis.IGNORE


class BadReturnSup(trellis.Supervisor):
    async def init(self, value: Any = 42) -> Any:
        return value


class RaisingSup(trellis.Supervisor):
    error = LookupError("init failed")

    async def init(self) -> Any:
        raise RaisingSup.error


class FlagsSup(trellis.Supervisor):
    async def init(self, specs: list[Any], **flags: Any) -> Any:
        return trellis.SupervisorSpec(specs, **flags)


async def test_subclass_init_spec_and_flag_errors_surface_as_such() -> None:
    """SPEC 2/14: the subclass form reports bad child specs and bad flags with the same
    ChildSpecError / SupervisorFlagsError as the function form."""
    with pytest.raises(trellis.InvalidShutdown):
        await FlagsSup.start_link([good("a", shutdown="soon")])
    with pytest.raises(trellis.DuplicateChildName):
        await FlagsSup.start_link([good("a"), good("a")])
    with pytest.raises(trellis.InvalidStrategy):
        await FlagsSup.start_link([good("a")], strategy="one_for_some")
    with pytest.raises(trellis.InvalidIntensity):
        await FlagsSup.start_link([good("a")], intensity=-1)
    await assert_no_processes()


class GoodSup(trellis.Supervisor):
    async def init(self, n: int) -> Any:
        return trellis.SupervisorSpec([good(f"c{i}") for i in range(n)], strategy="one_for_all")


async def test_subclass_init_returning_spec_starts_children() -> None:
    """SPEC 16 (baseline): a Supervisor subclass whose init returns a SupervisorSpec runs it."""
    sup = await GoodSup.start_link(2)
    try:
        assert [c.id for c in await sup.which_children()] == ["c1", "c0"]
    finally:
        await sup.stop()


async def test_init_ignore_returns_ignore_and_process_exits_normal() -> None:
    """SPEC 16: init returning IGNORE makes start_link return IGNORE; the process exits NORMAL."""
    IgnoringSup.pids.clear()
    result = await IgnoringSup.start_link(name="childspec-ignoring")
    assert result is trellis.IGNORE
    (pid,) = IgnoringSup.pids
    async with asyncio.timeout(5):
        assert await pid.join() == trellis.NORMAL
    assert trellis.whereis("childspec-ignoring") is None
    await assert_no_processes()


@pytest.mark.parametrize("value", [42, None, "spec"], ids=["int", "none", "str"])
async def test_init_bad_return_raises_bad_return_value(value: Any) -> None:
    """SPEC 16: init returning neither a SupervisorSpec nor IGNORE raises BadReturnValue."""
    with pytest.raises(trellis.BadReturnValue) as ei:
        await BadReturnSup.start_link(value)
    assert ei.value.value == value
    assert isinstance(ei.value, trellis.StartError)
    await assert_no_processes()


async def test_init_exception_raises_start_error_with_the_exception() -> None:
    """SPEC 16: an exception in init raises StartError whose reason is that exception."""
    with pytest.raises(trellis.StartError) as ei:
        await RaisingSup.start_link()
    assert ei.value.reason is RaisingSup.error
    assert not isinstance(ei.value, trellis.FailedToStartChild)
    await assert_no_processes()


async def _assert_mailbox_empty() -> None:
    await settle()
    marker = object()
    trellis.self().send(marker)
    msg = await trellis.receive()
    assert msg is marker, f"unexpected message: {msg!r}"


async def _in_trapping_process(body: Callable[[], Awaitable[None]]) -> None:
    pid = trellis.spawn(body, trap_exits=True)
    async with asyncio.timeout(5):
        reason = await pid.join()
    if isinstance(reason, BaseException):
        raise reason
    assert reason == trellis.NORMAL


async def test_failed_or_ignored_start_link_sends_no_exit_to_trapping_caller() -> None:
    """SPEC 17: a failed or ignored start_link sends no Exit to a trap-exiting caller."""

    async def failing_child() -> trellis.Pid:
        raise RuntimeError("child cannot start")

    async def body() -> None:
        assert await IgnoringSup.start_link() is trellis.IGNORE
        await _assert_mailbox_empty()
        with pytest.raises(trellis.BadReturnValue):
            await BadReturnSup.start_link()
        await _assert_mailbox_empty()
        with pytest.raises(trellis.StartError):
            await RaisingSup.start_link()
        await _assert_mailbox_empty()
        with pytest.raises(trellis.FailedToStartChild):
            await trellis.Supervisor.start_link([{"id": "x", "start": failing_child}])
        await _assert_mailbox_empty()
        with pytest.raises(trellis.InvalidShutdown):
            await trellis.Supervisor.start_link([good("x", shutdown=-1)])
        await _assert_mailbox_empty()
        with pytest.raises(trellis.InvalidStrategy):
            await trellis.Supervisor.start_link([good("x")], strategy="nope")
        await _assert_mailbox_empty()

    IgnoringSup.pids.clear()
    await _in_trapping_process(body)
    await assert_no_processes()


async def test_started_supervisor_is_linked_to_its_trapping_caller() -> None:
    """SPEC 17 (contrast): a successful start_link links, so its later exit is an Exit."""

    async def body() -> None:
        sup = await trellis.Supervisor.start_link([good("a")])
        await _assert_mailbox_empty()
        trellis.exit(sup, trellis.KILL)
        async with asyncio.timeout(5):
            msg = await trellis.receive()
        assert msg == trellis.Exit(sup, trellis.KILLED)

    await _in_trapping_process(body)
    await assert_no_processes()


# ---------------------------------------------------------------------------
# What a spec accepts, a supervisor can run


@pytest.mark.parametrize("bad", ["a/b", "../x", "/", "x\x00y", ("grp", "a/b")])
def test_child_id_cannot_hold_a_slash_or_nul(bad: Any) -> None:
    """An id is one segment of the child's path (root/parent/child, resolved by the
    control API) and of its log file names: '/' (or NUL) in it is refused at once."""
    with pytest.raises(trellis.InvalidChildSpec) as err:
        trellis.ChildSpec(bad, start_idle)
    assert err.value.field == "id"
    assert err.value.value == bad
    with pytest.raises(trellis.InvalidChildSpec):
        trellis.worker(bad, idle)
    with pytest.raises(trellis.InvalidChildSpec):
        trellis.Supervisor.child_spec([], id=bad)


@pytest.mark.parametrize("ok", ["a.b", "a-b", "a b", 7, ("grp", 1), "ünïcode"])
def test_other_child_ids_are_fine(ok: Any) -> None:
    assert trellis.ChildSpec(ok, start_idle).id == ok


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"argv": ["sh", "-c", "echo \x00"]}, "argv"),
        ({"argv": ["/bin/s\x00h"]}, "argv"),
        ({"argv": ["sh"], "env": {"A=B": "x"}}, "env"),
        ({"argv": ["sh"], "env": {"": "x"}}, "env"),
        ({"argv": ["sh"], "env": {"A\x00": "x"}}, "env"),
        ({"argv": ["sh"], "env": {"A": "x\x00"}}, "env"),
        ({"argv": ["sh"], "watchdog": float("inf")}, "watchdog"),
        ({"argv": ["sh"], "watchdog": float("nan")}, "watchdog"),
        ({"argv": ["sh"], "id": "web/1"}, "id"),
        ({"argv": ["sh"], "shutdown": float("inf")}, "shutdown"),
    ],
)
def test_command_refuses_what_execve_cannot_take(kwargs: dict[str, Any], field: str) -> None:
    """NUL bytes in arguments or the environment, '=' or nothing as an environment name,
    a non-finite watchdog: refused when the spec is made, not when the child starts."""
    argv = kwargs.pop("argv")
    with pytest.raises(trellis.ChildSpecError) as err:
        trellis.Command(argv, **kwargs)
    assert err.value.field == field


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: trellis.Limits(memory=4096), "limits.memory"),
        (lambda: trellis.Limits(memory=2**60), "limits.memory"),
        (lambda: trellis.Limits(open_files=2**63), "limits.open_files"),
        (lambda: trellis.Limits(cpu=2**64), "limits.cpu"),
        (lambda: trellis.Logs(dir="/tmp", backups=5_000_000), "logs.backups"),
    ],
)
def test_absurd_limits_and_backups_are_refused(make: Callable[[], Any], field: str) -> None:
    with pytest.raises(trellis.ChildSpecError) as err:
        make()
    assert err.value.field == field


def test_sane_limits_and_backups_are_kept() -> None:
    limits = trellis.Limits(memory=2**20, open_files=1024, cpu=3600)
    assert (limits.memory, limits.open_files, limits.cpu) == (2**20, 1024, 3600)
    assert trellis.Logs(dir="/tmp", backups=1000).backups == 1000


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
async def test_non_finite_period_is_refused(bad: float) -> None:
    with pytest.raises(trellis.InvalidPeriod):
        trellis.SupervisorSpec([], period=bad)
    with pytest.raises(trellis.InvalidPeriod):
        await trellis.DynamicSupervisor.start_link(period=bad)
