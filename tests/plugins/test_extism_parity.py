"""The Extism plugin ABI: the same .wasm files, byte-identical results under the
official ``extism`` host SDK and under Trellis (outputs, plugin-reported errors,
config and vars)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import trellis

extism = pytest.importorskip("extism", reason="the parity tests need the extism host SDK")

RECORD = {
    "resourceType": "Patient",
    "id": "p1",
    "name": [{"family": "Lee", "given": ["Ann", "Marie"]}],
    "gender": "female",
    "birthDate": "1984-02-03",
    "telecom": [{"system": "phone", "value": "+1 (555) 123-4567"}],
    "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"}],
    "note": "call 555 987 6543 after 5",
}


def variants() -> list[bytes]:
    bad_date = {**RECORD, "birthDate": "1984-02-30"}
    no_id = {k: v for k, v in RECORD.items() if k != "id"}
    odd = {**RECORD, "gender": "robot", "resourceType": "Practitioner", "birthDate": "1850-01-01"}
    return [
        json.dumps(RECORD).encode(),
        json.dumps(RECORD, indent=2).encode(),
        json.dumps(bad_date).encode(),
        json.dumps(no_id).encode(),
        json.dumps(odd).encode(),
        b"",
        b"not json at all 5551234567",
        ("x" * 70_000).encode(),
    ]


def spec_bytes(module: Path) -> bytes:
    return module.read_bytes()


def extism_result(plugin: Any, function: str, data: bytes) -> tuple[str, bytes | str]:
    try:
        return ("ok", bytes(plugin.call(function, data)))
    except extism.Error as e:
        return ("error", str(e))


async def trellis_result(name: str, function: str, data: bytes) -> tuple[str, bytes | str]:
    try:
        return ("ok", await trellis.plugin_call(name, function, data))
    except trellis.PluginError as e:
        return ("error", e.message) if e.kind == "error" else ("broken", repr(e))


async def compare(
    module: Path, calls: list[tuple[str, bytes]], config: dict[str, str] | None = None
) -> None:
    ref = extism.Plugin(spec_bytes(module), wasi=False, config=config or {})
    spec = trellis.Plugin(
        module, id="p", name="p", memory="64MiB", timeout=5.0, config=config or {}
    )
    sup = await trellis.Supervisor.start_link([spec])
    try:
        for function, data in calls:
            want = extism_result(ref, function, data)
            got = await trellis_result("p", function, data)
            if want[0] == "error" and got[0] == "error":
                # Extism words a bare non-zero return code its own way; both carry it
                assert str(want[1]).endswith(str(got[1]).rsplit(" ", 1)[-1]), (function, want, got)
            else:
                assert got == want, (function, data[:60])
    finally:
        await sup.stop()


async def test_wat_module_parity(wat: Callable[[str], Path]) -> None:
    calls: list[tuple[str, bytes]] = []
    for data in variants():
        calls += [("echo", data), ("upper", data), ("trap_on", data[:40])]
    calls += [("config", b"region"), ("config", b"nope"), ("noop", b"")]
    calls += [("count", b"")] * 4  # vars persist across calls in both hosts
    calls += [("fail", b""), ("rc", b""), ("echo", b"after errors")]
    await compare(wat("misbehave"), calls, config={"region": "eu-west"})


async def test_c_plugins_parity(c_plugin: Callable[[str], Path]) -> None:
    await compare(
        c_plugin("fhir_validator"),
        [("validate", d) for d in variants()],
        config={"max_year": "2026"},
    )
    await compare(c_plugin("phi_redactor"), [("redact", d) for d in variants()])


async def test_c_plugins_do_their_job(c_plugin: Callable[[str], Path]) -> None:
    validator = trellis.Plugin(
        c_plugin("fhir_validator"), id="v", name="v", memory="8MiB", timeout=2.0
    )
    redactor = trellis.Plugin(
        c_plugin("phi_redactor"), id="r", name="r", memory="8MiB", timeout=2.0
    )
    sup = await trellis.Supervisor.start_link([validator, redactor])
    try:
        ok = json.loads(await trellis.plugin_call("v", "validate", json.dumps(RECORD)))
        assert ok == {"valid": True}
        bad = {**RECORD, "birthDate": "1984-13-01", "gender": "robot"}
        verdict = json.loads(await trellis.plugin_call("v", "validate", json.dumps(bad)))
        assert verdict["valid"] is False
        assert "birthDate is not a calendar date" in verdict["errors"]
        assert "gender is not a FHIR administrative gender" in verdict["errors"]
        out = json.loads(await trellis.plugin_call("r", "redact", json.dumps(RECORD)))
        assert out["name"] == [{"family": "***", "given": ["***", "***"]}]
        assert out["birthDate"] == "***"
        assert out["identifier"][0]["value"] == "***"
        assert out["note"] == "call ### ### #### after 5"
        assert out["gender"] == "female"
    finally:
        await sup.stop()
