"""The dashboard's RED / USE sparklines, end to end in the system Chromium driven by
Playwright: ``trellis run`` with a server under load (some calls crash it), a worker
calling it, and an OS child holding 48 MiB; ``GET /v1/stats`` (read role) has their
numbers, and the page draws calls/s and errors/s for the server and CPU and memory
for the OS child. A screenshot is saved and checked to be non-blank."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
TOKEN = "red-use-operator-token-0123456789"
READER = "red-use-read-token-0123456789"

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason="no /usr/bin/chromium: apt-get install chromium (.ci/run installs it)",
    ),
]

PARTS = """
import asyncio
import trellis

class Api(trellis.Server):
    async def handle_call(self, request, caller):
        if request == "boom":
            raise RuntimeError("boom")
        await asyncio.sleep(0.002)
        return request

async def load():
    n = 0
    while True:
        n += 1
        try:
            await trellis.call("api", "boom" if n % 25 == 0 else n, timeout=1.0)
        except trellis.TrellisError:
            await asyncio.sleep(0.05)  # restarting
        await asyncio.sleep(0.005)
"""

HOG = "b = bytes(range(256)) * (48 * 1024 * 1024 // 256)\\nimport time\\nwhile True: time.sleep(1)"

TREE = """
[supervisor]
name = "shop"
intensity = 1000
period = 5.0

[[supervisor.children]]
id = "api"
server = "parts:Api"
name = "api"

[[supervisor.children]]
id = "load"
worker = "parts:load"

[[supervisor.children]]
id = "hog"
command = ["{python}", "-c", "{hog}"]
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _non_blank(png: bytes) -> bool:
    """A PNG with many different byte values in its image data: not one flat colour."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    i, idat = 8, b""
    while i < len(png):
        n = int.from_bytes(png[i : i + 4], "big")
        kind = png[i + 4 : i + 8]
        if kind == b"IDAT":
            idat += png[i + 8 : i + 8 + n]
        i += 12 + n
    return len(set(zlib.decompress(idat))) > 32


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[dict[str, Any]]:
    pytest.importorskip("playwright", reason="pip install playwright (never `playwright install`)")
    (tmp_path / "parts.py").write_text(PARTS)
    (tmp_path / "tree.toml").write_text(TREE.format(python=sys.executable, hog=HOG))
    port = _free_port()
    env = {
        **os.environ,
        "TRELLIS_CONTROL_TOKEN": f"ops:{TOKEN},viewer:{READER}:read",
        "PYTHONPATH": str(tmp_path),
    }
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "trellis", "run", "tree.toml", "--no-journal",
            "--tcp", f"127.0.0.1:{port}", "--socket", str(tmp_path / "c.sock"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(f"{url}/v1/stats", headers=_auth(READER), timeout=5.0)
                if r.status_code == 200 and "shop/hog" in r.json()["children"]:
                    break
            assert time.monotonic() < deadline, "the tree did not start in 30 s"
            time.sleep(0.1)
        yield {"url": url}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_stats_and_sparklines(shop: dict[str, Any], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    url = shop["url"]
    assert httpx.get(f"{url}/v1/stats", timeout=5.0).status_code == 401
    time.sleep(0.5)
    doc = httpx.get(f"{url}/v1/stats", headers=_auth(READER), timeout=5.0).json()
    api, hog = doc["children"]["shop/api"], doc["children"]["shop/hog"]
    assert api["calls"] > 0
    assert api["duration_count"] > 0
    assert api["duration_sum"] >= 0.002 * api["duration_count"] * 0.9  # 2 ms a call
    assert hog["rss_bytes"] >= 48 * 1024 * 1024
    assert hog["threads"] == 1
    assert "shop/load" not in doc["children"]  # a coroutine worker: neither a server nor a process
    assert doc["loop"] is not None
    assert doc["loop"]["lag_count"] > 0

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 560})
            page.goto(f"{url}/#token={READER}")
            page.wait_for_function(
                "() => { const e = document.querySelector("
                "'.child[data-path=\"shop/api\"] .spark');"
                " return e && Number(e.dataset.callsRate) > 0 && e.querySelector('svg'); }",
                timeout=15_000,
            )
            page.wait_for_function(
                "() => { const e = document.querySelector("
                "'.child[data-path=\"shop/hog\"] .spark');"
                " return e && Number(e.dataset.rss) >= 48 * 1048576; }",
                timeout=15_000,
            )
            # calls crash the server now and then: errors show within a few reads
            page.wait_for_function(
                "() => { const e = document.querySelector("
                "'.child[data-path=\"shop/api\"] .spark');"
                " return e && Number(e.dataset.errorsRate) > 0 && e.querySelector('.err'); }",
                timeout=20_000,
            )
            # a few points drawn (one per read, every 2 s after the first two)
            page.wait_for_function(
                "() => { const e = document.querySelector("
                "'.child[data-path=\"shop/api\"] .spark polyline');"
                " return e && e.getAttribute('points').split(' ').length >= 3; }",
                timeout=15_000,
            )
            api_text = page.inner_text('.child[data-path="shop/api"] .spark')
            assert "/s" in api_text
            assert "ms" in api_text
            assert page.inner_text('.child[data-path="shop/hog"] .spark').endswith("MB")
            # the tree's attributes are intact
            api_row = page.locator('.child[data-path="shop/api"]')
            assert api_row.get_attribute("data-state") in ("running", "restarting")
            assert int(api_row.get_attribute("data-restarts") or "0") >= 0
            shot = tmp_path / "dashboard-red-use.png"
            page.screenshot(path=str(shot), full_page=True)
            assert _non_blank(shot.read_bytes())
        finally:
            browser.close()
