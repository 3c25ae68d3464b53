"""SLOs, runbooks and owners in the tree file: validated like every other key."""

from __future__ import annotations

from typing import Any

import pytest

from trellis.config import ConfigError, loads

GOOD = """
[supervisor]
name = "app"
slo = { objective = 0.999, window = "30d" }
owner = "team-core"

[[supervisor.children]]
id = "api"
server = "trellis:Server"
slo = { objective = 0.9995, window = "7d", sli = "calls" }
runbook = "https://runbooks.example/api"
owner = "team-a"

[[supervisor.children]]
id = "job"
command = ["true"]
slo = { objective = 0.9 }
owner = "team-ops"

[[supervisor.children]]
id = "sub"
strategy = "one_for_all"
slo = { objective = 0.99, window = 3600 }

[[supervisor.children.children]]
id = "tick"
worker = "asyncio:sleep"
args = [1]
runbook = "https://runbooks.example/tick"
"""


def test_slo_keys_reach_the_settings_by_tree_path() -> None:
    tree = loads(GOOD)

    def slos(slo: dict[str, Any], name: str = "up") -> dict[str, Any]:
        # "slo": what the journal report measures; "slos": every SLO, named
        return {"slo": slo, "slos": [{"name": name, "sli": name, **slo}]}

    assert tree.settings["slo"] == {
        "app": {"owner": "team-core", **slos({"objective": 0.999, "window": 30 * 86400.0})},
        "app/api": {
            "runbook": "https://runbooks.example/api",
            "owner": "team-a",
            **slos({"objective": 0.9995, "window": 7 * 86400.0, "sli": "calls"}, "calls"),
        },
        "app/job": {"owner": "team-ops", **slos({"objective": 0.9})},
        "app/sub": slos({"objective": 0.99, "window": 3600.0}),
        "app/sub/tick": {"runbook": "https://runbooks.example/tick"},
    }
    assert tree.flags == {}  # the SRE keys are not supervisor flags
    assert tree.children[2].kwargs == {"strategy": "one_for_all"}  # no SRE keys
    assert tree.children[1].id == "job"  # a command child takes them too


def test_no_slo_no_setting() -> None:
    tree = loads('[supervisor]\n[[supervisor.children]]\nworker = "asyncio:sleep"\nargs = [1]\n')
    assert "slo" not in tree.settings


BAD = """[supervisor]
name = "app"
slo = { objectve = 0.999, window = "30x" }

[[supervisor.children]]
id = "api"
server = "trellis:Server"
slo = { objective = 99.9, sli = "cals" }
runbok = "https://x"

[[supervisor.children]]
id = "w"
worker = "asyncio:sleep"
args = [1]
slo = { objective = 0.9, sli = "calls" }

[[supervisor.children]]
id = "v"
worker = "asyncio:sleep"
args = [1]
runbook = "ftp://x"
owner = ""
"""


def test_bad_slo_keys_name_key_and_line() -> None:
    with pytest.raises(ConfigError) as info:
        loads(BAD, "bad.toml")
    got = {(i.line, i.path, i.message) for i in info.value.errors}
    assert (3, "supervisor.slo", "missing key 'objective'") in got
    assert (
        3,
        "supervisor.slo.objectve",
        "unknown key 'objectve' in slo (did you mean 'objective'?)",
    ) in got
    assert any(p == "supervisor.slo.window" and "invalid duration '30x'" in m for _, p, m in got)
    assert (
        8,
        "supervisor.children[0].slo.objective",
        "objective 99.9 is a fraction in (0, 1): write 0.999 for 99.9%",
    ) in got
    assert any(
        line == 8 and p == "supervisor.children[0].slo.sli" and "did you mean 'calls'" in m
        for line, p, m in got
    )
    assert (
        9,
        "supervisor.children[0].runbok",
        "unknown key 'runbok' for a server child (did you mean 'runbook'?)",
    ) in got
    assert any(
        line == 15 and p == "supervisor.children[1].slo.sli" and "needs a server child" in m
        for line, p, m in got
    )
    assert any(line == 21 and p == "supervisor.children[2].runbook" for line, p, _ in got)
    assert any(line == 22 and p == "supervisor.children[2].owner" for line, p, _ in got)
