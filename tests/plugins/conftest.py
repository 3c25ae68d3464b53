"""Plugins for the tests, built from source when the tests run: WAT with
``wasmtime.wat2wasm`` (always), C with clang for wasm32 (skipped when clang or wasm-ld
is missing: ``apt-get install clang lld``). No binary module is committed."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

wasmtime = pytest.importorskip("wasmtime", reason="plugins need wasmtime: pip install wasmtime")

HERE = Path(__file__).parent
WAT = HERE / "wat"
REPO = HERE.parent.parent
C_PLUGINS = REPO / "examples" / "plugin_host" / "plugins"


@pytest.fixture(autouse=True)
def _private_plugin_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test session gets its own compiled-module disk cache."""
    old = os.environ.get("TRELLIS_PLUGIN_CACHE")
    d = tmp_path_factory.getbasetemp() / "plugin-cache"
    d.mkdir(mode=0o700, exist_ok=True)
    os.environ["TRELLIS_PLUGIN_CACHE"] = str(d)
    yield
    if old is None:
        os.environ.pop("TRELLIS_PLUGIN_CACHE", None)
    else:
        os.environ["TRELLIS_PLUGIN_CACHE"] = old


@pytest.fixture(scope="session")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wasm")


def wat_module(name: str, out_dir: Path) -> Path:
    """``tests/plugins/wat/<name>.wat`` compiled to ``<out_dir>/<name>.wasm``."""
    out = out_dir / f"{name}.wasm"
    if not out.exists():
        out.write_bytes(bytes(wasmtime.wat2wasm((WAT / f"{name}.wat").read_text())))
    return out


@pytest.fixture(scope="session")
def wat(build_dir: Path) -> Callable[[str], Path]:
    return lambda name: wat_module(name, build_dir)


def c_toolchain() -> str | None:
    """Why C plugins cannot be built here, or None when they can."""
    if shutil.which("clang") is None:
        return "clang is not installed (apt-get install clang lld)"
    if shutil.which("wasm-ld") is None:
        return "wasm-ld is not installed (apt-get install lld)"
    return None


@pytest.fixture(scope="session")
def c_plugin(build_dir: Path) -> Callable[[str], Path]:
    """``examples/plugin_host/plugins/<name>.c`` built for wasm32 with the repo's Makefile
    rules (scripts/build-plugins)."""
    why = c_toolchain()
    if why:
        pytest.skip(why)

    def build(name: str) -> Path:
        out = build_dir / f"{name}.wasm"
        if not out.exists():
            subprocess.run(
                [str(C_PLUGINS / "build.sh"), str(build_dir), name],
                check=True,
                capture_output=True,
                timeout=120,
            )
        return out

    return build
