"""Tree files: every error names its key path and line, all at once; valid trees build and run."""

from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import trellis
from trellis._config import _tree
from trellis._config._locate import Locator, format_path
from trellis._config._models import parse_size
from trellis.config import ConfigError, ConfigIssue, TreeSpec, load, loads

ROOT = Path(__file__).resolve().parents[1]
TREES = ROOT / "examples" / "trees"
PY = sys.executable


@pytest.fixture(autouse=True)
def _parts_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tree_parts`` (the example servers and workers) is importable by ``loads``."""
    monkeypatch.syspath_prepend(str(TREES))


def toml(text: str) -> str:
    """Dedent; line 1 is the first line after the opening quotes."""
    return textwrap.dedent(text).lstrip("\n")


def errors(text: str) -> list[tuple[int | None, str, str]]:
    """The (line, path, message) of every issue ``loads`` reports for ``text``."""
    with pytest.raises(ConfigError) as info:
        loads(toml(text))
    return [(i.line, i.path, i.message) for i in info.value.errors]


def one_error(text: str) -> tuple[int | None, str, str]:
    [issue] = errors(text)
    return issue


HEAD = """
[supervisor]
name = "t"

[[supervisor.children]]
"""  # children[0] starts on line 4; its first key is on line 5


# ---------------------------------------------------------------------------
# Valid trees
# ---------------------------------------------------------------------------


def test_nested_tree_maps_to_child_specs_in_file_order() -> None:
    """The example tree: root flags, children in file order, a nested supervisor, defaults."""
    tree = load(TREES / "services.toml")
    assert tree.name == "shop"
    assert dict(tree.flags) == {"strategy": "rest_for_one", "intensity": 3, "period": 5.0}
    db, cache, web = tree.children
    assert [db.id, cache.id, web.id] == ["db", "cache", "web"]
    assert db.args == ("db",)
    assert db.shutdown == 2.0
    assert db.restart == "permanent"
    assert web.restart == "transient"
    assert web.shutdown == 5.0
    assert cache.type == "supervisor"
    assert cache.shutdown == "infinity"
    store, warmer = cache.args[0]
    assert cache.kwargs == {"strategy": "one_for_one"}
    assert (store.id, warmer.id) == ("store", "warmer")
    assert warmer.backoff == trellis.Backoff(min=0.1, max=5.0)
    root = tree.child_spec()
    assert root.id == "shop"
    assert root.type == "supervisor"
    assert root.kwargs["name"] == "shop"
    assert tree.describe() == toml(
        """
        shop: supervisor rest_for_one
          db: server tree_parts:Part
          cache: supervisor one_for_one
            store: server tree_parts:Part
            warmer: worker tree_parts:ticker
          web: server tree_parts:Part
        """
    ).rstrip("\n")


async def test_loaded_tree_starts_and_stops(capfd: pytest.CaptureFixture[str]) -> None:
    """A loaded tree starts every child in order and stops them in reverse order."""
    tree = load(TREES / "services.toml")
    sup = await tree.start()
    assert trellis.whereis("shop") == sup
    assert await trellis.call((await sup.which_child("db")).pid, "label") == "db"
    await sup.stop()
    out = capfd.readouterr().out.split()
    starts = [w for i, w in enumerate(out) if i and out[i - 1] == "start"]
    stops = [w for i, w in enumerate(out) if i and out[i - 1] == "stop"]
    assert starts == ["db", "store", "warmer", "web"]
    assert stops == ["web", "warmer", "store", "db"]


def test_defaults_and_worker_options() -> None:
    """Ids default to the class / function name; the root's name defaults to "root"."""
    tree = loads(
        toml(
            """
            [supervisor]
            auto_shutdown = "all_significant"
            [[supervisor.children]]
            server = "tree_parts:Part"
            args = ["x"]
            name = "part"
            [[supervisor.children]]
            worker = "tree_parts:ticker"
            kwargs = { label = "t", interval = 2 }
            trap_exits = true
            significant = true
            restart = "temporary"
            shutdown = "brutal_kill"
            """
        )
    )
    part, tick = tree.children
    assert tree.name == "root"
    assert dict(tree.flags) == {"auto_shutdown": "all_significant"}
    assert part.id == "Part"
    assert part.kwargs == {"name": "part"}
    assert tick.id == "ticker"
    assert tick.significant
    assert tick.restart == "temporary"
    assert tick.shutdown == "brutal_kill"
    fn, args, kwargs, name, trap = tick.args
    assert (fn.__name__, args, kwargs, name, trap) == (
        "ticker",
        (),
        {"label": "t", "interval": 2},
        None,
        True,
    )


def test_significant_child_needs_auto_shutdown() -> None:
    """significant is accepted when the supervisor's auto_shutdown uses it."""
    tree = loads(
        toml(
            """
            [supervisor]
            auto_shutdown = "any_significant"
            [[supervisor.children]]
            server = "tree_parts:Part"
            args = ["x"]
            restart = "transient"
            significant = true
            """
        )
    )
    assert tree.children[0].significant
    assert tree.flags["auto_shutdown"] == "any_significant"


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def __call__(self, argv: Any, **kwargs: Any) -> trellis.ChildSpec:
        self.calls.append((argv, kwargs))
        return trellis.Command(argv, **kwargs)


def test_command_child_maps_every_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of a command child reaches trellis.Command; relative paths start at the file."""
    record = _Recorder()
    monkeypatch.setattr(_tree, "Command", record)
    (tmp_path / "work").mkdir()
    path = tmp_path / "tree.toml"
    path.write_text(
        toml(
            f"""
            [supervisor]
            [[supervisor.children]]
            id = "ex"
            command = ["{PY}", "-c", "pass"]
            env = {{ LOG_LEVEL = "info", WORKERS = 4 }}
            inherit_env = ["PATH"]
            cwd = "work"
            shell = false
            stop_signal = "INT"
            ready = {{ tcp = "localhost:9000", timeout = 10 }}
            watchdog = 5.0
            health = {{ http = "http://127.0.0.1:9000/health", interval = 5, failures = 2 }}
            limits = {{ memory = "512MiB", open_files = 1024, cpu = 3600 }}
            logs = {{ dir = "logs", max_bytes = "10MB", backups = 2 }}
            restart = "transient"
            shutdown = 2.5
            backoff = {{ min = 0.5, max = 30.0, factor = 3.0, jitter = 0.1, reset_after = 60 }}
            [[supervisor.children]]
            command = ["{PY}"]
            ready = "started"
            """
        )
    )
    tree = load(path)
    (argv, kw), (argv2, kw2) = record.calls
    assert argv == [PY, "-c", "pass"]
    assert kw == {
        "id": "ex",
        "env": {"LOG_LEVEL": "info", "WORKERS": "4"},
        "inherit_env": ("PATH",),
        "cwd": str(tmp_path / "work"),
        "shell": False,
        "stop_signal": "SIGINT",
        "ready": trellis.Ready.tcp(9000, host="localhost", timeout=10),
        "watchdog": 5.0,
        "health": trellis.Health.http("http://127.0.0.1:9000/health", interval=5, failures=2),
        "limits": trellis.Limits(memory=512 * 2**20, open_files=1024, cpu=3600),
        "logs": trellis.Logs(dir=str(tmp_path / "logs"), max_bytes=10_000_000, backups=2),
        "restart": "transient",
        "shutdown": 2.5,
        "backoff": trellis.Backoff(min=0.5, max=30.0, factor=3.0, jitter=0.1, reset_after=60),
    }
    assert argv2 == [PY]
    assert kw2 == {"id": os.path.basename(PY), "ready": trellis.Ready.started()}
    ex = tree.children[0]
    assert (ex.id, ex.restart, ex.shutdown) == ("ex", "transient", 2.5)


@pytest.mark.parametrize(
    ("ready", "expected"),
    [
        ('"started"', trellis.Ready.started()),
        ("{ notify = true }", trellis.Ready.notify()),
        ("{ notify = true, timeout = 3 }", trellis.Ready.notify(timeout=3)),
        ("{ tcp = 9000 }", trellis.Ready.tcp(9000)),
        ('{ http = "http://127.0.0.1:1/x" }', trellis.Ready.http("http://127.0.0.1:1/x")),
        (
            '{ log = "listening on \\\\d+", timeout = 1.5 }',
            trellis.Ready.log(r"listening on \d+", 1.5),
        ),
    ],
)
def test_ready_forms(ready: str, expected: trellis.Ready, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every readiness form of the file becomes the matching trellis.Ready."""
    record = _Recorder()
    monkeypatch.setattr(_tree, "Command", record)
    loads(toml(f'{HEAD}command = ["{PY}"]\nready = {ready}\n'))
    assert record.calls[0][1]["ready"] == expected


@pytest.mark.parametrize(
    ("health", "expected"),
    [
        ('{ command = ["true"], failures = 1 }', trellis.Health.command(["true"], failures=1)),
        ('{ command = "true --x" }', trellis.Health.command(["true", "--x"])),
        (
            '{ tcp = "10.0.0.1:80", interval = 2 }',
            trellis.Health.tcp(80, host="10.0.0.1", interval=2),
        ),
        (
            '{ http = "http://h/health", timeout = 0.5 }',
            trellis.Health.http("http://h/health", timeout=0.5),
        ),
    ],
)
def test_health_forms(
    health: str, expected: trellis.Health, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every health-check form becomes the matching trellis.Health."""
    record = _Recorder()
    monkeypatch.setattr(_tree, "Command", record)
    loads(toml(f'{HEAD}command = ["{PY}"]\nhealth = {health}\n'))
    assert record.calls[0][1]["health"] == expected


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (1024, 1024),
        ("512MiB", 512 * 2**20),
        ("10MB", 10_000_000),
        ("1.5 GiB", 3 * 2**29),
        ("64k", 65536),
        ("2kb", 2000),
        ("7", 7),
        ("1TiB", 2**40),
    ],
)
def test_sizes(text: object, size: int) -> None:
    """Sizes are bytes, or strings with binary (KiB, K) or decimal (KB, MB) units."""
    assert parse_size(text) == size


async def test_command_child_runs_from_a_tree_file(tmp_path: Path) -> None:
    """A command child (ready on a log line) and a server after it start and stop."""
    script = "import time; print('ready', flush=True); time.sleep(60)"
    tree = loads(
        toml(
            f"""
            [supervisor]
            name = "with-os"
            strategy = "rest_for_one"
            [[supervisor.children]]
            id = "sleeper"
            command = ["{PY}", "-c", "{script}"]
            ready = {{ log = "^ready$", timeout = 10 }}
            shutdown = 2
            [[supervisor.children]]
            id = "after"
            server = "tree_parts:Part"
            args = ["after"]
            """
        )
    )
    sup = await tree.start()
    sleeper = (await sup.which_child("sleeper")).pid
    os_pid = sleeper.os_pid
    os.kill(os_pid, 0)  # alive
    await sup.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(os_pid, 0)


# ---------------------------------------------------------------------------
# Errors: one per kind, with its exact line
# ---------------------------------------------------------------------------

CASES: list[tuple[str, str, tuple[int, str, str]]] = [
    (
        "toml syntax",
        '[supervisor]\nname = "x"\nintensity = = 3\n',
        (3, "", "invalid TOML: Invalid value (column 13)"),
    ),
    ("no supervisor table", "# nothing\n", (1, "", "missing key 'supervisor'")),
    (
        "unknown key with suggestion",
        HEAD + 'server = "tree_parts:Part"\nargs = ["a"]\nrestrat = "permanent"\n',
        (
            7,
            "supervisor.children[0].restrat",
            "unknown key 'restrat' for a server child (did you mean 'restart'?)",
        ),
    ),
    (
        "unknown key of another kind",
        HEAD + 'worker = "tree_parts:ticker"\nargs = ["a"]\nenv = { A = "1" }\n',
        (7, "supervisor.children[0].env", "unknown key 'env' for a worker child"),
    ),
    (
        "unknown nested key",
        HEAD + f'command = ["{PY}"]\nlimits = {{ memroy = 5 }}\n',
        (
            6,
            "supervisor.children[0].limits.memroy",
            "unknown key 'memroy' in limits (did you mean 'memory'?)",
        ),
    ),
    (
        "root unknown key",
        "[supervisor]\nstrategy = 'one_for_one'\nperod = 3\n",
        (
            3,
            "supervisor.perod",
            "unknown key 'perod' for the root supervisor (did you mean 'period'?)",
        ),
    ),
    (
        "bad restart",
        HEAD + 'server = "tree_parts:Part"\nargs = ["a"]\nrestart = "sometimes"\n',
        (
            7,
            "supervisor.children[0].restart",
            "invalid restart: 'sometimes' (expected one of permanent, transient, temporary)",
        ),
    ),
    (
        "bad shutdown",
        HEAD + 'server = "tree_parts:Part"\nargs = ["a"]\nshutdown = "5s"\n',
        (
            7,
            "supervisor.children[0].shutdown",
            "invalid shutdown: '5s' (use seconds, 'brutal_kill' or 'infinity')",
        ),
    ),
    (
        "negative shutdown",
        HEAD + 'server = "tree_parts:Part"\nargs = ["a"]\nshutdown = -1\n',
        (
            7,
            "supervisor.children[0].shutdown",
            "invalid shutdown: -1 (use seconds >= 0, 'brutal_kill' or 'infinity')",
        ),
    ),
    (
        "bad strategy",
        '[supervisor]\nname = "x"\nstrategy = "one_for_al"\n',
        (
            3,
            "supervisor.strategy",
            "invalid strategy: 'one_for_al' (expected one of one_for_one, one_for_all, "
            "rest_for_one, "
            "simple_one_for_one; did you mean 'one_for_all'?)",
        ),
    ),
    (
        "bad intensity",
        "[supervisor]\nintensity = 1.5\n",
        (2, "supervisor.intensity", "invalid intensity: 1.5 (must be an int >= 0)"),
    ),
    (
        "bad period",
        "[supervisor]\n\nperiod = 0\n",
        (3, "supervisor.period", "invalid period: 0 (must be a number of seconds > 0)"),
    ),
    (
        "bad auto_shutdown in a nested supervisor",
        HEAD + 'id = "sub"\nauto_shutdown = "sometimes"\n',
        (
            6,
            "supervisor.children[0].auto_shutdown",
            "invalid auto_shutdown: 'sometimes' (expected one of never, any_significant, "
            "all_significant)",
        ),
    ),
    (
        "two kinds",
        HEAD + f'server = "tree_parts:Part"\n\ncommand = ["{PY}"]\n',
        (
            7,
            "supervisor.children[0].command",
            "conflicting kinds: 'server' and 'command'; a child is exactly one of command, server, "
            "isolated, worker or children (a supervisor)",
        ),
    ),
    (
        "a worker with supervisor flags",
        HEAD + 'worker = "tree_parts:ticker"\nstrategy = "one_for_all"\n',
        (
            6,
            "supervisor.children[0].strategy",
            "conflicting kinds: 'worker' and 'strategy'; a child is exactly one of command, "
            "server, isolated, worker or children (a supervisor)",
        ),
    ),
    (
        "no kind",
        HEAD + 'id = "x"\n',
        (
            4,
            "supervisor.children[0]",
            "a child needs one of command, server, isolated, worker or children (a supervisor)",
        ),
    ),
    (
        "no module",
        HEAD + 'id = "x"\nserver = "no_such_module_xyz.sub:Thing"\n',
        (
            6,
            "supervisor.children[0].server",
            "cannot import 'no_such_module_xyz.sub:Thing': no module named 'no_such_module_xyz'",
        ),
    ),
    (
        "no attribute",
        HEAD + 'worker = "tree_parts:tickr"\n',
        (
            5,
            "supervisor.children[0].worker",
            "cannot import 'tree_parts:tickr': 'tree_parts' has no attribute 'tickr' (did you "
            "mean 'ticker'?)",
        ),
    ),
    (
        "malformed reference",
        HEAD + 'server = "tree_parts.Part"\n',
        (
            5,
            "supervisor.children[0].server",
            "expected 'package.module:Name', got 'tree_parts.Part'",
        ),
    ),
    (
        "not a Server",
        HEAD + 'server = "tree_parts:ticker"\n',
        (
            5,
            "supervisor.children[0].server",
            "'tree_parts:ticker' is not a trellis.Server subclass (got function)",
        ),
    ),
    (
        "not a coroutine function",
        HEAD + 'worker = "tree_parts:Part"\n',
        (
            5,
            "supervisor.children[0].worker",
            "'tree_parts:Part' is not a coroutine function (use async def; got class "
            "tree_parts.Part)",
        ),
    ),
    (
        "arguments do not match",
        HEAD + 'server = "tree_parts:Part"\nargs = ["a", true, 3]\n',
        (
            6,
            "supervisor.children[0].args",
            "arguments do not match Part.init(label, crash=False): too many positional arguments",
        ),
    ),
    (
        "worker arguments do not match",
        HEAD + 'worker = "tree_parts:ticker"\nkwargs = { labl = "x" }\n',
        (
            6,
            "supervisor.children[0].kwargs",
            "arguments do not match ticker(label, interval=1.0): missing a required argument: "
            "'label'",
        ),
    ),
    (
        "child option in kwargs",
        HEAD + 'server = "tree_parts:Part"\nkwargs = { label = "x", name = "n" }\n',
        (
            6,
            "supervisor.children[0].kwargs.name",
            "'name' is a child option; set it on the child, not in kwargs",
        ),
    ),
    (
        "executable not found",
        HEAD + 'id = "x"\ncommand = ["no-such-binary-xyz", "--flag"]\n',
        (
            6,
            "supervisor.children[0].command",
            "executable not found: 'no-such-binary-xyz' (not on PATH)",
        ),
    ),
    (
        "executable path not found",
        HEAD + 'command = ["/no/such/bin"]\n',
        (5, "supervisor.children[0].command", "executable not found: '/no/such/bin'"),
    ),
    (
        "executable is a directory",
        HEAD + 'command = ["/"]\n',
        (5, "supervisor.children[0].command", "not an executable: '/' is a directory"),
    ),
    (
        "cwd missing",
        HEAD + f'command = ["{PY}"]\ncwd = "/no/such/dir"\n',
        (6, "supervisor.children[0].cwd", "cwd does not exist: '/no/such/dir'"),
    ),
    (
        "unknown user",
        HEAD + f'command = ["{PY}"]\nuser = "no-such-user-xyz"\n',
        (6, "supervisor.children[0].user", "unknown user 'no-such-user-xyz'"),
    ),
    (
        "string command without shell",
        HEAD + 'command = "ls -l | wc"\n',
        (
            5,
            "supervisor.children[0].command",
            "command is a string only with shell = true; otherwise use a list, such as ['ls', "
            "'-l', '|', 'wc']",
        ),
    ),
    (
        "empty command",
        HEAD + "command = []\n",
        (
            5,
            "supervisor.children[0].command",
            "command is a non-empty list of strings, such as ['python3', '-m', 'app'], got []",
        ),
    ),
    (
        "bad size",
        HEAD + f'command = ["{PY}"]\nlimits = {{ memory = "5 parsecs" }}\n',
        (
            6,
            "supervisor.children[0].limits.memory",
            "invalid size '5 parsecs': use a number of bytes > 0 or a string such as '512MiB' or "
            "'10MB'",
        ),
    ),
    (
        "bad signal",
        HEAD + f'command = ["{PY}"]\nstop_signal = "SIGTREM"\n',
        (
            6,
            "supervisor.children[0].stop_signal",
            "unknown signal 'SIGTREM' (did you mean 'SIGTERM'?)",
        ),
    ),
    (
        "bad readiness string",
        HEAD + f'command = ["{PY}"]\nready = "ready"\n',
        (
            6,
            "supervisor.children[0].ready",
            "unknown readiness 'ready': use 'started' or a table such as { tcp = 9000 }",
        ),
    ),
    (
        "two readiness kinds",
        HEAD + f'command = ["{PY}"]\nready = {{ tcp = 1, log = "x" }}\n',
        (
            6,
            "supervisor.children[0].ready",
            "ready needs exactly one of notify, tcp, http, log (or the string 'started'); got "
            "tcp, log",
        ),
    ),
    (
        "bad port",
        HEAD + f'command = ["{PY}"]\nready = {{ tcp = 70000 }}\n',
        (6, "supervisor.children[0].ready.tcp", "invalid port 70000: use 1-65535"),
    ),
    (
        "bad url",
        HEAD + f'command = ["{PY}"]\nhealth = {{ http = "localhost:80" }}\n',
        (
            6,
            "supervisor.children[0].health.http",
            "invalid URL 'localhost:80': use http://host[:port]/path or https://...",
        ),
    ),
    (
        "bad regex",
        HEAD + f'command = ["{PY}"]\n\nready = {{ log = "(" }}\n',
        (
            7,
            "supervisor.children[0].ready.log",
            "invalid regular expression '(': missing ), unterminated subpattern at position 0",
        ),
    ),
    (
        "https readiness refused by trellis.Command",
        HEAD + f'command = ["{PY}"]\nready = {{ http = "https://h/" }}\n',
        (
            6,
            "supervisor.children[0].ready.http",
            "invalid ready.http: 'https://h/' (must be an http:// URL)",
        ),
    ),
    (
        "negative timeout",
        HEAD + f'command = ["{PY}"]\nready = {{ notify = true, timeout = -1 }}\n',
        (6, "supervisor.children[0].ready.timeout", "input should be greater than 0, got -1"),
    ),
    (
        "wrong type",
        HEAD + f'command = ["{PY}"]\nwatchdog = "5"\n',
        (6, "supervisor.children[0].watchdog", "input should be a valid number, got '5'"),
    ),
    (
        "backoff max below min",
        HEAD + 'server = "tree_parts:Part"\nargs = ["a"]\nbackoff = { min = 5, max = 1 }\n',
        (
            7,
            "supervisor.children[0].backoff.max",
            "invalid backoff.max: 1.0 (Backoff.max must be >= min)",
        ),
    ),
    (
        "significant and permanent",
        "[supervisor]\nauto_shutdown = 'any_significant'\n[[supervisor.children]]\n"
        'server = "tree_parts:Part"\nargs = ["a"]\nsignificant = true\n',
        (
            6,
            "supervisor.children[0].significant",
            "invalid significant: {'restart': 'permanent', 'significant': True} "
            "(a permanent child cannot be significant)",
        ),
    ),
    (
        "significant without auto_shutdown",
        HEAD
        + 'server = "tree_parts:Part"\nargs = ["a"]\nrestart = "transient"\nsignificant = true\n',
        (
            8,
            "supervisor.children[0].significant",
            "child 'Part' is significant but its supervisor's auto_shutdown is 'never' "
            "(set auto_shutdown to 'any_significant' or 'all_significant')",
        ),
    ),
    (
        "significant child under an invalid auto_shutdown: only the flag is reported",
        '[supervisor]\nauto_shutdown = "some"\n[[supervisor.children]]\n'
        'server = "tree_parts:Part"\nargs = ["a"]\nrestart = "transient"\nsignificant = true\n',
        (
            2,
            "supervisor.auto_shutdown",
            "invalid auto_shutdown: 'some' (expected one of never, any_significant, "
            "all_significant)",
        ),
    ),
    (
        "simple_one_for_one needs one child",
        '[supervisor]\nstrategy = "simple_one_for_one"\nchildren = []\n',
        (
            3,
            "supervisor.children",
            "invalid children: [] (simple_one_for_one needs exactly one child spec)",
        ),
    ),
    (
        "supervisor without id",
        HEAD + 'strategy = "one_for_all"\n[[supervisor.children.children]]\n'
        'worker = "tree_parts:ticker"\nargs = ["a"]\n',
        (
            4,
            "supervisor.children[0]",
            "missing key 'id' (a supervisor child needs an id or a name)",
        ),
    ),
    (
        "children written as a single table",
        '[supervisor]\n[supervisor.children]\nid = "x"\n',
        (2, "supervisor.children", "children is an array of tables: write [[supervisor.children]]"),
    ),
    (
        "a child that is not a table",
        "[supervisor]\nchildren = [\n  1,\n]\n",
        (3, "supervisor.children[0]", "a child is a table, got 1"),
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_error_names_key_path_and_line(text: str, expected: tuple[int, str, str]) -> None:
    """Each kind of mistake is one issue with its key path, exact line and message."""
    assert one_error(text) == expected


def test_unknown_top_level_key() -> None:
    """Only [supervisor] and the operating tables (node, journal, control, metrics, chaos)
    may be at the top level."""
    assert errors('name = "x"\n[supervisor]\n') == [
        (1, "name", "unknown key 'name' for the tree file")
    ]


def test_duplicate_ids_among_siblings_only() -> None:
    """The same id twice under one supervisor is an error; in different subtrees it is not."""
    text = """
        [supervisor]
        [[supervisor.children]]
        id = "a"
        server = "tree_parts:Part"
        args = ["a"]
        [[supervisor.children]]
        id = "sub"
        [[supervisor.children.children]]
        id = "a"
        worker = "tree_parts:ticker"
        args = ["a"]
        [[supervisor.children]]
        worker = "tree_parts:ticker"
        id = "a"
        args = ["a"]
        """
    assert errors(text) == [
        (
            14,
            "supervisor.children[2].id",
            "duplicate child id 'a' (also used by supervisor.children[0])",
        )
    ]


def test_default_ids_count_as_duplicates() -> None:
    """Two servers of one class without ids clash on the default id (the class name)."""
    text = (
        HEAD + 'server = "tree_parts:Part"\nargs = ["a"]\n[[supervisor.children]]\n'
        'server = "tree_parts:Part"\nargs = ["b"]\n'
    )
    assert errors(text) == [
        (
            7,
            "supervisor.children[1]",
            "duplicate child id 'Part' (also used by supervisor.children[0])",
        )
    ]


def test_all_errors_at_once() -> None:
    """A file with three mistakes in different places gives three issues, in file order."""
    text = """
        [supervisor]
        name = "three"
        intensity = -1

        [[supervisor.children]]
        id = "web"
        server = "tree_parts:Part"
        args = ["web"]
        restart = "always"

        [[supervisor.children]]
        id = "sub"
        [[supervisor.children.children]]
        id = "exchange"
        command = ["no-such-binary-xyz"]
        """
    assert errors(text) == [
        (3, "supervisor.intensity", "invalid intensity: -1 (must be an int >= 0)"),
        (
            9,
            "supervisor.children[0].restart",
            "invalid restart: 'always' (expected one of permanent, transient, temporary)",
        ),
        (
            15,
            "supervisor.children[1].children[0].command",
            "executable not found: 'no-such-binary-xyz' (not on PATH)",
        ),
    ]


def test_invalid_child_still_gets_environment_checks() -> None:
    """A child with a type error still has its executable and cwd checked."""
    text = HEAD + 'command = ["no-such-binary-xyz"]\nrestart = 3\ncwd = "/no/such/dir"\n'
    assert [(line, path) for line, path, _ in errors(text)] == [
        (5, "supervisor.children[0].command"),
        (6, "supervisor.children[0].restart"),
        (7, "supervisor.children[0].cwd"),
    ]


def test_unknown_key_in_a_child_without_kind() -> None:
    """A misspelt kind key: the missing kind and the suggestion are both reported."""
    assert errors(HEAD + f'id = "x"\ncomand = ["{PY}"]\n') == [
        (
            4,
            "supervisor.children[0]",
            "a child needs one of command, server, isolated, worker or children (a supervisor)",
        ),
        (6, "supervisor.children[0].comand", "unknown key 'comand' (did you mean 'command'?)"),
    ]


def test_children_as_inline_array() -> None:
    """Children written as an inline array of tables get lines too."""
    text = """
        [supervisor]
        children = [
          { id = "a", server = "tree_parts:Part", args = ["a"] },
          { id = "b", server = "tree_parts:Part", args = ["b"],
            restart = "never" },
        ]
        """
    # TOML 1.0 inline tables are one line; tomllib rejects the newline inside one.
    assert errors(text)[0][:2] == (4, "")
    text = """
        [supervisor]
        children = [
          { id = "a", server = "tree_parts:Part", args = ["a"] },
          { id = "b", server = "tree_parts:Part", args = ["b"], restart = "never" },
        ]
        """
    assert errors(text) == [
        (
            4,
            "supervisor.children[1].restart",
            "invalid restart: 'never' (expected one of permanent, transient, temporary)",
        )
    ]


def test_file_paths_are_checked(tmp_path: Path) -> None:
    """Not executable, cwd that is a file, a logs dir that cannot be created: each reported."""
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(stat.S_IRUSR | stat.S_IWUSR)
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = tmp_path / "tree.toml"
    path.write_text(
        toml(
            f"""
            [supervisor]
            [[supervisor.children]]
            id = "a"
            command = ["./run.sh"]
            cwd = "."
            [[supervisor.children]]
            id = "b"
            command = ["{PY}"]
            cwd = "file"
            [[supervisor.children]]
            id = "c"
            command = ["{PY}"]
            logs = {{ dir = "file/logs" }}
            """
        )
    )
    with pytest.raises(ConfigError) as info:
        load(path)
    got = [(i.line, i.path, i.message) for i in info.value.errors]
    assert got == [
        (4, "supervisor.children[0].command", "permission denied: './run.sh' is not executable"),
        (9, "supervisor.children[1].cwd", f"cwd is not a directory: '{blocker}'"),
        (
            13,
            "supervisor.children[2].logs.dir",
            f"cannot create logs dir '{blocker}/logs': '{blocker}' is a file",
        ),
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may run children as any user")
def test_other_user_needs_root() -> None:
    """Running a child as another user is a permission error unless Trellis runs as root."""
    line, path, message = one_error(HEAD + f'command = ["{PY}"]\nuser = "root"\n')
    assert (line, path) == (6, "supervisor.children[0].user")
    assert message.startswith("permission denied: running as user 'root' needs root")


def test_load_puts_the_file_directory_on_sys_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Modules next to the tree file are importable by server/worker references."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "local_mod_for_tree.py").write_text("async def job():\n    pass\n")
    path = tmp_path / "t.toml"
    path.write_text('[supervisor]\n[[supervisor.children]]\nworker = "local_mod_for_tree:job"\n')
    assert load(path).children[0].id == "job"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file or a directory is reported as a ConfigError without a line."""
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "missing.toml")
    assert info.value.errors == [ConfigIssue("", None, "cannot read: No such file or directory")]
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert info.value.errors[0].message == "cannot read: Is a directory"


def test_issue_and_error_text() -> None:
    """ConfigIssue formats like the CLI; ConfigError lists every issue."""
    issue = ConfigIssue("supervisor.children[2].command", 17, "executable not found: 'foo'")
    assert str(issue) == "executable not found: 'foo' (supervisor.children[2].command, line 17)"
    assert (
        issue.format("t.toml")
        == "t.toml:17: supervisor.children[2].command: executable not found: 'foo'"
    )
    assert ConfigIssue("", 3, "bad").format("t.toml") == "t.toml:3: bad"
    err = ConfigError([issue, ConfigIssue("", None, "x")], "t.toml")
    assert str(err) == (
        "2 errors in t.toml:\n"
        "t.toml:17: supervisor.children[2].command: executable not found: 'foo'\n"
        "t.toml: x"
    )
    assert isinstance(err, trellis.TrellisError)
    assert isinstance(err, ValueError)
    assert isinstance(loads("[supervisor]\n"), TreeSpec)


# ---------------------------------------------------------------------------
# The line locator
# ---------------------------------------------------------------------------


def test_locator_finds_headers_keys_and_elements() -> None:
    """Headers, array-of-tables indexes, dotted and quoted keys, arrays and inline tables."""
    text = toml(
        '''
        # comment
        [supervisor]
        name = "p"  # trailing
        "quoted key" = 1
        env.PATH = "/bin"

        [[supervisor.children]]
        doc = """
        multi "line" \\"""
        """
        args = [
          1,  # one
          { a = 'x' },
        ]
        [[supervisor.children]]
        [[supervisor.children.children]]
        [supervisor.children.children.limits]
        memory = 1
        [[supervisor.children]]
        id = 3
        '''
    )
    loc = Locator(text)
    assert loc.exact(("supervisor",)) == 2
    assert loc.exact(("supervisor", "name")) == 3
    assert loc.exact(("supervisor", "quoted key")) == 4
    assert loc.exact(("supervisor", "env")) == 5
    assert loc.exact(("supervisor", "env", "PATH")) == 5
    assert loc.exact(("supervisor", "children", 0)) == 7
    assert loc.exact(("supervisor", "children", 0, "doc")) == 8
    assert loc.exact(("supervisor", "children", 0, "args", 0)) == 12
    assert loc.exact(("supervisor", "children", 0, "args", 1, "a")) == 13
    assert loc.exact(("supervisor", "children", 1, "children", 0)) == 16
    assert loc.exact(("supervisor", "children", 1, "children", 0, "limits", "memory")) == 18
    assert loc.exact(("supervisor", "children", 2, "id")) == 20
    assert loc.exact(("supervisor", "children", 2, "nope")) is None
    assert loc.line(("supervisor", "children", 2, "nope")) == 19
    assert loc.line(("elsewhere",)) is None


def test_format_path() -> None:
    """Key paths print as TOML-like dotted paths with indexes."""
    assert format_path(("supervisor", "children", 1, "restart")) == "supervisor.children[1].restart"
    assert format_path(("env", "A.B")) == 'env."A.B"'
    assert format_path(()) == ""


# ---------------------------------------------------------------------------
# How to operate a tree: node, [journal], [control], [metrics], [[chaos]]
# ---------------------------------------------------------------------------


def test_operating_settings_are_kept_with_paths_from_the_tree_file(tmp_path: Path) -> None:
    """Relative journal and socket paths are taken from the tree file's directory."""
    path = tmp_path / "tree.toml"
    path.write_text(
        toml(
            """
            node = "edge-1"
            [journal]
            url = "sqlite:///state/journal.db"
            flush_interval = 0.005
            [control]
            socket = "ctl.sock"
            tcp = "127.0.0.1:9100"
            token_env = "MY_TOKEN"
            [metrics]
            enabled = false
            [[chaos]]
            fault = "kill"
            target = "t/*"
            [supervisor]
            name = "t"
            """
        )
    )
    tree = load(path)
    assert tree.settings == {
        "node": "edge-1",
        "journal": {"url": f"sqlite:///{tmp_path}/state/journal.db", "flush_interval": 0.005},
        "control": {
            "socket": str(tmp_path / "ctl.sock"),
            "tcp": ("127.0.0.1", 9100),
            "token_env": "MY_TOKEN",
        },
        "metrics": {"enabled": False},
        "chaos": [{"fault": "kill", "target": "t/*"}],
    }


def test_operating_settings_absent_by_default() -> None:
    assert loads("[supervisor]\n").settings == {}


def test_absolute_and_postgres_journal_urls_are_kept() -> None:
    tree = loads('[journal]\nurl = "sqlite:////var/j.db"\n[supervisor]\n')
    assert tree.settings["journal"]["url"] == "sqlite:////var/j.db"
    tree = loads('[journal]\nurl = "postgresql://u@127.0.0.1/db"\n[supervisor]\n')
    assert tree.settings["journal"]["url"] == "postgresql://u@127.0.0.1/db"


def test_operating_settings_errors_name_key_and_line() -> None:
    text = """
    [journal]
    url = "mysql://x"
    batch_size = 0
    [control]
    tcp = "nohost"
    token_env = "1BAD"
    colour = "red"
    [metrics]
    enabled = "yes"
    [supervisor]
    """
    assert errors(text) == [
        (2, "journal.url", errors(text)[0][2]),
        (3, "journal.batch_size", "input should be greater than 0, got 0"),
        (5, "control.tcp", "invalid address 'nohost': use a port number or 'host:port'"),
        (6, "control.token_env", "invalid environment variable name '1BAD'"),
        (7, "control.colour", "unknown key 'colour' in control"),
        (9, "metrics.enabled", errors(text)[5][2]),
    ]
    assert "invalid journal URL 'mysql://x'" in errors(text)[0][2]
    assert "bool" in errors(text)[5][2]


# ---------------------------------------------------------------------------
# What `trellis check` accepts, `trellis run` can run
# ---------------------------------------------------------------------------

CMD = f'command = ["{PY}"]\n'

RUNNABLE_CASES = [
    (
        "infinite watchdog",
        HEAD + CMD + "watchdog = inf\n",
        (6, "supervisor.children[0].watchdog", "input should be a finite number, got inf"),
    ),
    (
        "NaN ready timeout",
        HEAD + CMD + "ready = { notify = true, timeout = nan }\n",
        (6, "supervisor.children[0].ready.timeout", "input should be a finite number, got nan"),
    ),
    (
        "a timeout over a year",
        HEAD + CMD + "health = { tcp = 9000, interval = 1e300 }\n",
        (
            6,
            "supervisor.children[0].health.interval",
            "input should be less than or equal to 31536000, got 1e+300",
        ),
    ),
    (
        "NaN period",
        '[supervisor]\nname = "t"\nperiod = nan\n',
        (3, "supervisor.period", "invalid period: nan (must be a finite number of seconds)"),
    ),
    (
        "infinite period of a nested supervisor",
        HEAD + 'id = "inner"\nperiod = inf\nchildren = []\n',
        (
            6,
            "supervisor.children[0].period",
            "invalid period: inf (must be a finite number of seconds)",
        ),
    ),
    (
        "a period over a year",
        "[supervisor]\nperiod = 1e12\n",
        (
            2,
            "supervisor.period",
            "1000000000000.0 seconds is more than a year (31536000): use a shorter time",
        ),
    ),
    (
        "infinite shutdown",
        HEAD + CMD + "shutdown = inf\n",
        (
            6,
            "supervisor.children[0].shutdown",
            "invalid shutdown: inf (use 'infinity' to wait without a limit)",
        ),
    ),
    (
        "NaN shutdown",
        HEAD + CMD + "shutdown = nan\n",
        (
            6,
            "supervisor.children[0].shutdown",
            "invalid shutdown: nan (use seconds >= 0, 'brutal_kill' or 'infinity')",
        ),
    ),
    (
        "infinite backoff max",
        HEAD + CMD + "backoff = { max = inf }\n",
        (
            6,
            "supervisor.children[0].backoff.max",
            "input should be a finite number, got inf",
        ),
    ),
    (
        "NaN backoff factor",
        HEAD + CMD + "backoff = { factor = nan }\n",
        (
            6,
            "supervisor.children[0].backoff.factor",
            "invalid backoff.factor: nan (Backoff.factor must be a finite number)",
        ),
    ),
    (
        "NUL in an argument",
        HEAD + f'command = ["{PY}", "-c", "print(1)\\u0000"]\n',
        (
            5,
            "supervisor.children[0].command",
            "command argument 'print(1)\\x00' contains a NUL byte (\\u0000)",
        ),
    ),
    (
        "NUL in the program",
        HEAD + 'command = ["/bin/s\\u0000h"]\n',
        (
            5,
            "supervisor.children[0].command",
            "command argument '/bin/s\\x00h' contains a NUL byte (\\u0000)",
        ),
    ),
    (
        "NUL in a shell command",
        HEAD + 'command = "echo \\u0000"\nshell = true\n',
        (
            5,
            "supervisor.children[0].command",
            "command argument 'echo \\x00' contains a NUL byte (\\u0000)",
        ),
    ),
    (
        "NUL in an environment value",
        HEAD + CMD + 'env = { A = "x\\u0000y" }\n',
        (
            6,
            "supervisor.children[0].env.A",
            "environment value 'x\\x00y' contains a NUL byte (\\u0000)",
        ),
    ),
    (
        "= in an environment name",
        HEAD + CMD + 'env = { "A=B" = "x" }\n',
        (
            6,
            'supervisor.children[0].env."A=B"',
            "invalid environment variable name 'A=B': a name cannot contain '='",
        ),
    ),
    (
        "an empty environment name",
        HEAD + CMD + 'env = { "" = "x" }\n',
        (
            6,
            'supervisor.children[0].env.""',
            "an environment variable name is a non-empty string, got ''",
        ),
    ),
    (
        "NUL in an environment name",
        HEAD + CMD + 'env = { "A\\u0000" = "x" }\n',
        (
            6,
            'supervisor.children[0].env."A\\u0000"',
            "'A\\x00' contains a NUL byte (\\u0000): no path or name can hold one",
        ),
    ),
    (
        "= in an inherited name",
        HEAD + CMD + 'inherit_env = ["PATH", "A=B"]\n',
        (
            6,
            "supervisor.children[0].inherit_env",
            "invalid environment variable name 'A=B': a name cannot contain '='",
        ),
    ),
    (
        "NUL in cwd",
        HEAD + CMD + 'cwd = "/tmp\\u0000"\n',
        (
            6,
            "supervisor.children[0].cwd",
            "'/tmp\\x00' contains a NUL byte (\\u0000): no path or name can hold one",
        ),
    ),
    (
        "NUL in logs.dir",
        HEAD + CMD + 'logs = { dir = "lo\\u0000gs" }\n',
        (
            6,
            "supervisor.children[0].logs.dir",
            "'lo\\x00gs' contains a NUL byte (\\u0000): no path or name can hold one",
        ),
    ),
    (
        "NUL in a user name",
        HEAD + CMD + 'user = "ro\\u0000ot"\n',
        (
            6,
            "supervisor.children[0].user",
            "'ro\\x00ot' contains a NUL byte (\\u0000): no path or name can hold one",
        ),
    ),
    (
        "a memory limit too small to exec anything",
        HEAD + CMD + "limits = { memory = 4096 }\n",
        (
            6,
            "supervisor.children[0].limits.memory",
            "limits.memory 4096 is out of range: use 1MiB to 1PiB (it limits the child's "
            "address space)",
        ),
    ),
    (
        "an absurd memory limit",
        HEAD + CMD + 'limits = { memory = "4096TiB" }\n',
        (
            6,
            "supervisor.children[0].limits.memory",
            "limits.memory 4503599627370496 is out of range: use 1MiB to 1PiB (it limits the "
            "child's address space)",
        ),
    ),
    (
        "more open files than the kernel allows",
        HEAD + CMD + "limits = { open_files = 4294967296 }\n",
        (
            6,
            "supervisor.children[0].limits.open_files",
            f"open_files 4294967296 is above the kernel's maximum (fs.nr_open = "
            f"{Path('/proc/sys/fs/nr_open').read_text().strip()})",
        ),
    ),
    (
        "backups in the millions",
        HEAD + CMD + "logs = { backups = 5000000 }\n",
        (
            6,
            "supervisor.children[0].logs.backups",
            "input should be less than or equal to 1000, got 5000000",
        ),
    ),
    (
        "a child id with a slash",
        HEAD + 'id = "a/b"\n' + CMD,
        (
            5,
            "supervisor.children[0].id",
            "child id 'a/b' contains '/': an id is one segment of a child's path "
            "(root/parent/child) and of its log file names; use '-', '_' or '.' instead",
        ),
    ),
    (
        "a supervisor id that climbs out of the logs dir",
        HEAD + 'id = "../x"\nchildren = []\n',
        (
            5,
            "supervisor.children[0].id",
            "child id '../x' contains '/': an id is one segment of a child's path "
            "(root/parent/child) and of its log file names; use '-', '_' or '.' instead",
        ),
    ),
    (
        "a supervisor named with a slash (its name is its id)",
        HEAD + 'name = "a/b"\nchildren = []\n',
        (
            4,
            "supervisor.children[0].id",
            "invalid id: 'a/b' (a child id cannot contain '/': it is one segment of the "
            "child's path (root/parent/child) and of its log file names)",
        ),
    ),
]


RUNNABLE_CASES += [
    (
        "a NaN backoff reset_after",
        HEAD + CMD + "backoff = { reset_after = nan }\n",
        (
            6,
            "supervisor.children[0].backoff.reset_after",
            "input should be a finite number, got nan",
        ),
    ),
    (
        "a backoff max over a year",
        HEAD + CMD + "backoff = { max = 1e9 }\n",
        (
            6,
            "supervisor.children[0].backoff.max",
            "input should be less than or equal to 31536000, got 1000000000.0",
        ),
    ),
    (
        "a tree name with a slash",
        '[supervisor]\nname = "shop/eu"\n',
        (
            2,
            "supervisor.name",
            "tree name 'shop/eu' contains '/': it is the first segment of every child's path "
            "(root/parent/child) and names the socket and journal; use '-', '_' or '.' instead",
        ),
    ),
    (
        "NUL in the journal URL",
        '[journal]\nurl = "sqlite:///j\\u0000.db"\n[supervisor]\n',
        (
            2,
            "journal.url",
            "'sqlite:///j\\x00.db' contains a NUL byte (\\u0000): no path or name can hold one",
        ),
    ),
    (
        "NUL in the control socket",
        '[control]\nsocket = "s\\u0000.sock"\n[supervisor]\n',
        (
            2,
            "control.socket",
            "'s\\x00.sock' contains a NUL byte (\\u0000): no path or name can hold one",
        ),
    ),
    (
        "a control socket path too long for a Unix socket",
        '[control]\nsocket = "/tmp/' + "s" * 100 + '.sock"\n[supervisor]\n',
        (
            2,
            "control.socket",
            "socket path '/tmp/" + "s" * 51 + "... is 110 "
            "bytes: a Unix socket path has at most 107; choose a shorter one",
        ),
    ),
    (
        "an infinite SLO window",
        HEAD + CMD + "slo = { objective = 0.999, window = inf }\n",
        (
            6,
            "supervisor.children[0].slo.window",
            "invalid duration inf: use seconds > 0 or a string such as '30d', '6h', '90m'",
        ),
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in RUNNABLE_CASES], ids=[c[0] for c in RUNNABLE_CASES]
)
def test_check_rejects_what_run_cannot_run(text: str, expected: tuple[int, str, str]) -> None:
    """Non-finite or absurd durations, NUL bytes, bad environment names, absurd limits and
    ids with '/': each is one issue with its key path and line, never a traceback."""
    assert one_error(text) == expected


@pytest.mark.parametrize("depth", [65, 500, 5000])
@pytest.mark.parametrize("bracket", ["[", "{a="])
def test_deeply_nested_values_are_an_error_with_a_line(depth: int, bracket: str) -> None:
    """5,000 nested brackets made tomllib raise RecursionError (a traceback): now the
    file is refused with the line where the nesting goes too deep."""
    closing = "]" if bracket == "[" else "}"
    value = bracket * depth + ("" if bracket == "[" else "1") + closing * depth
    text = f'{HEAD}worker = "tree_parts:ticker"\n\nargs = [{value}]\n'
    assert errors(text) == [
        (
            7,
            "",
            "arrays and inline tables nested more than 64 levels deep (a tree file never needs "
            "that many)",
        )
    ]


def test_nesting_within_the_limit_and_brackets_in_strings_are_fine() -> None:
    """Brackets in strings and comments do not count; 60 levels of arrays load."""
    text = toml(
        f'''
        [supervisor]
        name = "t"  # [[[[ {"[" * 100}
        [[supervisor.children]]
        worker = "tree_parts:ticker"
        args = [{"[" * 60}"{"[" * 100}", """{"{" * 100}""", '{"[" * 100}'{"]" * 60}]
        '''
    )
    tree = loads(text)
    assert tree.name == "t"


def test_trellis_check_reports_deep_nesting_with_the_file_and_line(tmp_path: Path) -> None:
    """The CLI: exit 2, FILE:LINE: message, no traceback."""
    import subprocess

    path = tmp_path / "deep.toml"
    path.write_text(
        '[supervisor]\n[[supervisor.children]]\nworker = "x:y"\nargs = '
        + "[" * 5000
        + "]" * 5000
        + "\n"
    )
    done = subprocess.run(
        [PY, "-m", "trellis", "check", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert f"{path}:4: " in done.stderr
    assert "nested more than 64 levels" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_registered_name_used_twice_is_an_error() -> None:
    """Two children registered under one name (or a child under the root's name): the
    second could never start (AlreadyStarted at run time), so check refuses the file."""
    text = toml(
        """
        [supervisor]
        name = "shop"
        [[supervisor.children]]
        id = "a"
        server = "tree_parts:Part"
        args = ["a"]
        name = "cache"
        [[supervisor.children]]
        id = "inner"
        [[supervisor.children.children]]
        id = "b"
        server = "tree_parts:Part"
        args = ["b"]
        name = "cache"
        [[supervisor.children.children]]
        id = "c"
        server = "tree_parts:Part"
        args = ["c"]
        name = "shop"
        """
    )
    assert errors(text) == [
        (
            14,
            "supervisor.children[1].children[0].name",
            "name 'cache' is already registered by supervisor.children[0] (names are unique "
            "in a running tree: the second could never start)",
        ),
        (
            19,
            "supervisor.children[1].children[1].name",
            "name 'shop' is already registered by supervisor (names are unique in a running "
            "tree: the second could never start)",
        ),
    ]


def test_a_child_named_root_clashes_with_the_default_root_name() -> None:
    text = (
        HEAD.replace('name = "t"\n', "")
        + 'server = "tree_parts:Part"\nargs = ["a"]\nname = "root"\n'
    )
    [(line, path, message)] = errors(text)
    assert (line, path) == (6, "supervisor.children[0].name")
    assert "already registered by supervisor" in message


def test_a_health_command_that_does_not_exist_is_an_error() -> None:
    """A health check whose program is missing would fail every probe and restart a
    healthy child forever: check resolves it like the command itself."""
    text = HEAD + CMD + 'health = { command = ["no-such-health-probe-xyz"], interval = 5 }\n'
    assert errors(text) == [
        (
            6,
            "supervisor.children[0].health.command",
            "executable not found: 'no-such-health-probe-xyz' (not on PATH)",
        )
    ]
    ok = HEAD + CMD + f'health = {{ command = "{PY} -c pass", interval = 5 }}\n'
    assert loads(toml(ok)).children[0].id


_ID_TAIL = (
    ": an id is one segment of a child's path (root/parent/child) and of its log file "
    "names; use '-', '_' or '.' instead"
)
SEGMENT_CASES = [
    ("dot", ".", "child id '.' is '.', which a path resolves to the parent or itself"),
    ("dot dot", "..", "child id '..' is '..', which a path resolves to the parent or itself"),
    (
        "newline",
        "a\\nb",
        "child id 'a\\nb' contains a control character (a newline, tab or escape sequence)",
    ),
    (
        "escape",
        "a\\u001b]0;x\\u0007",
        "child id 'a\\x1b]0;x\\x07' contains a control character (a newline, tab or escape "
        "sequence)",
    ),
    ("300 bytes", "x" * 300, "child id 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx..."
     " is longer than 200 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("toml_id", "message"), [c[1:] for c in SEGMENT_CASES], ids=[c[0] for c in SEGMENT_CASES]
)
def test_ids_that_cannot_be_a_path_segment_are_errors(toml_id: str, message: str) -> None:
    """'.' and '..' made `trellis stop tree/sub/.` act on the supervisor; a control
    character reached the terminal raw through `trellis check`; a 300-byte id passed check
    and failed run with "File name too long" once it named a log file."""
    text = HEAD + f'id = "{toml_id}"\n' + CMD
    assert one_error(text) == (5, "supervisor.children[0].id", message + _ID_TAIL)


@pytest.mark.parametrize("bad", [".", "..", "a\nb", "\x1b[31m", "y" * 201])
def test_childspec_refuses_ids_that_cannot_be_a_path_segment(bad: str) -> None:
    with pytest.raises(trellis.InvalidChildSpec, match="it is one segment of the child's path"):
        trellis.ChildSpec(bad, trellis.spawn)
    trellis.ChildSpec("y" * 200, trellis.spawn)  # 200 bytes is the limit, not beyond
