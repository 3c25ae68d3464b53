"""``plugin = "x.wasm"`` in tree files: built into a running plugin, and a missing or
invalid module, or a bad setting, is an error with its line number (``trellis check``)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import trellis
from trellis.config import ConfigError, load

HERE = Path(__file__).parent


def write_tree(tmp_path: Path, child: str) -> Path:
    shutil.copy(HERE / "wat" / "plain.wat", tmp_path / "plain.wat")
    (tmp_path / "junk.wasm").write_bytes(b"\0asm\x01\0\0\0junk")
    tree = tmp_path / "trellis.toml"
    tree.write_text('[supervisor]\nname = "root"\n\n[[supervisor.children]]\n' + child)
    return tree


async def test_a_plugin_child_from_a_tree_file(tmp_path: Path) -> None:
    tree = write_tree(
        tmp_path,
        'plugin = "plain.wat"\nname = "calc"\nmemory = "4MiB"\ntimeout = 1.0\n'
        'fuel = 1000000\nconfig = { strict = "true" }\ninstances = 2\nversion = "1.0"\n',
    )
    spec = load(tree)
    assert "plain" in spec.describe()
    sup = await spec.start()
    try:
        assert await trellis.plugin_call("calc", "add", [20, 22]) == b"42"
        info = await trellis.plugin_info("calc")
        assert (info["instances"], info["fuel"], info["version"]) == (2, 1000000, "1.0")
    finally:
        await sup.stop()


@pytest.mark.parametrize(
    ("child", "line", "message"),
    [
        ('plugin = "missing.wasm"\nmemory = "1MiB"\ntimeout = 1.0\n', 5, "no such module file"),
        ('plugin = "junk.wasm"\nmemory = "1MiB"\ntimeout = 1.0\n', 5, "not a valid wasm module"),
        ('plugin = "plain.wat"\nmemory = "lots"\ntimeout = 1.0\n', 6, "a size like 50MiB"),
        ('plugin = "plain.wat"\nmemory = "1MiB"\ntimeout = 0\n', 7, "greater than 0"),
        ('plugin = "plain.wat"\nmemory = "1MiB"\n', 4, "timeout"),
        ('plugin = "plain.wat"\nmemory = "1MiB"\ntimeout = 1\nfuel = -5\n', 8, "greater than 0"),
        ('plugin = "plain.wat"\nmemory = "1MiB"\ntimeout = 1\nconfig = { a = 1 }\n', 8, "str"),
    ],
)
def test_bad_plugin_children_name_the_line(
    tmp_path: Path, child: str, line: int, message: str
) -> None:
    tree = write_tree(tmp_path, child)
    with pytest.raises(ConfigError) as ei:
        load(tree)
    [issue] = ei.value.errors
    assert issue.line == line, issue
    assert message in issue.message, issue
    if "module" not in message:
        return
    # `trellis check` catches a missing or invalid module before anything runs
    out = subprocess.run(
        [sys.executable, "-m", "trellis", "check", str(tree)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert f"trellis.toml:{line}:" in out.stdout + out.stderr
