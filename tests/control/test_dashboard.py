"""The dashboard at ``/``, end to end in the system Chromium driven by Playwright:
``trellis run`` with a real OS-process child, the page over TCP with a bearer token
(handed over in the URL fragment, never sent to the server), a ``kill -9`` of the
child shown within 1.5 s, a restart button that works with the operator's token, a
wrong token refused, and the same page over the Unix socket through ``trellis
dashboard``'s guarded port. Screenshots are saved and checked to be non-blank."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = "/usr/bin/chromium"
TOKEN = "dash-operator-token-0123456789"

pytestmark = [
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason="no /usr/bin/chromium: apt-get install chromium (.ci/run installs it)",
    ),
]

PARTS = """
import asyncio

async def idle():
    await asyncio.sleep(3600)
"""

TREE = """
[supervisor]
name = "shop"
intensity = 10
period = 5.0

[[supervisor.children]]
id = "svc"
command = ["{python}", "-c", "import time\\nwhile True: time.sleep(1)"]
slo = {{ objective = 0.99, window = "1h" }}
owner = "team-svc"

[[supervisor.children]]
id = "web"
worker = "parts:idle"

[[supervisor.children]]
id = "jobs"
strategy = "one_for_one"

[[supervisor.children.children]]
id = "a"
worker = "parts:idle"
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
    raw = zlib.decompress(idat)
    return len(set(raw)) > 32


def _tree(url: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/tree", headers=headers or {}, timeout=5.0)
    r.raise_for_status()
    out: dict[str, Any] = {}

    def walk(n: dict[str, Any]) -> None:
        out[n["path"]] = n
        for c in n["children"]:
            walk(c)

    walk(r.json()["root"])
    return out


@pytest.fixture
def shop(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``trellis run`` of the shop tree with the control API on TCP and a Unix socket."""
    pytest.importorskip("playwright", reason="pip install playwright (never `playwright install`)")
    (tmp_path / "parts.py").write_text(PARTS)
    (tmp_path / "tree.toml").write_text(TREE.format(python=sys.executable))
    port = _free_port()
    sockdir = Path(tempfile.mkdtemp(prefix="trellis-dash-", dir="/tmp"))
    sock = sockdir / "shop.sock"
    env = {**os.environ, "TRELLIS_CONTROL_TOKEN": TOKEN, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "trellis", "run", "tree.toml", "--journal", "sqlite:///j.db",
            "--tcp", f"127.0.0.1:{port}", "--socket", str(sock),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            with contextlib.suppress(httpx.HTTPError):
                if _tree(url, auth)["shop/svc"]["state"] == "running":
                    break
            assert time.monotonic() < deadline, "the tree did not start in 30 s"
            time.sleep(0.1)
        yield {"url": url, "auth": auth, "sock": sock, "tmp": tmp_path, "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def test_dashboard_over_tcp(shop: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    url, auth = shop["url"], shop["auth"]
    # the page itself is public and holds no data; the API is not
    page_http = httpx.get(f"{url}/", timeout=5.0)
    assert page_http.status_code == 200
    assert "text/html" in page_http.headers["content-type"]
    assert "default-src 'none'" in page_http.headers["content-security-policy"]
    assert "src=" not in page_http.text  # nothing loaded from anywhere
    assert httpx.get(f"{url}/v1/tree", timeout=5.0).status_code == 401

    requests: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{url}/#token={TOKEN}")
    svc = page.locator('.child[data-path="shop/svc"]')
    svc.wait_for(timeout=10_000)
    assert page.evaluate("location.hash") == ""  # the token left the address bar
    assert not [r for r in requests if TOKEN in r]  # and was in no URL requested
    assert svc.get_attribute("data-state") == "running"
    assert svc.get_attribute("data-restarts") == "0"
    for path in ("shop", "shop/web", "shop/jobs", "shop/jobs/a"):
        assert page.locator(f'.child[data-path="{path}"]').count() == 1
    page.wait_for_selector("#conn.live", timeout=10_000)
    shot = tmp_path / "dashboard-tree.png"
    page.screenshot(path=str(shot), full_page=True)
    assert _non_blank(shot.read_bytes())

    # kill -9 the OS child: the page shows it within 1.5 s
    os_pid = _tree(url, auth)["shop/svc"]["os_pid"]
    assert isinstance(os_pid, int)
    t0 = time.monotonic()
    os.kill(os_pid, signal.SIGKILL)
    page.wait_for_function(
        "() => { const e = document.querySelector('.child[data-path=\"shop/svc\"]');"
        " return e && Number(e.dataset.restarts) >= 1 && e.dataset.state === 'running'; }",
        timeout=1500,
    )
    shown_after = time.monotonic() - t0
    assert shown_after < 1.5
    assert page.locator("#events").inner_text().count("child.exited") >= 1
    page.screenshot(path=str(tmp_path / "dashboard-killed.png"), full_page=True)

    # the SLO budget, from the journal
    slo = httpx.get(f"{url}/v1/slo", headers=auth, timeout=10.0).json()
    (svc_slo,) = [s for s in slo["slos"] if s["path"] == "shop/svc"]
    assert svc_slo["objective"] == 0.99
    assert svc_slo["owner"] == "team-svc"
    assert 0.5 < svc_slo["budget_remaining_ratio"] <= 1.0
    assert httpx.get(f"{url}/v1/slo", timeout=5.0).status_code == 401
    page.reload()
    page.wait_for_function(
        "() => { const e = document.querySelector('.child[data-path=\"shop/svc\"]');"
        " return e && e.dataset.budget !== undefined; }",
        timeout=15_000,
    )
    assert page.locator('.child[data-path="shop/svc"] .budget').inner_text().endswith("%")

    # the restart button, with the operator's token
    before = _tree(url, auth)["shop/web"]["pid"]
    page.click('button[data-action="restart"][data-path="shop/web"]')
    page.wait_for_selector("#msg.ok", timeout=5000)
    assert "restart shop/web: ok" in page.inner_text("#msg")
    assert _tree(url, auth)["shop/web"]["pid"] != before
    shot = tmp_path / "dashboard-restarted.png"
    page.screenshot(path=str(shot), full_page=True)
    assert _non_blank(shot.read_bytes())

    # a wrong token gets nothing: the page asks for one and shows why
    other = browser.new_page()
    other.goto(f"{url}/#token=not-the-right-token-at-all")
    other.wait_for_selector("#login", state="visible", timeout=10_000)
    assert "not valid" in other.inner_text("#msg")
    assert other.locator(".child[data-path]").count() == 0
    other.screenshot(path=str(tmp_path / "dashboard-refused.png"))
    # typing the right one in connects
    other.fill("#token", TOKEN)
    other.click("#loginform button")
    other.locator('.child[data-path="shop/svc"]').wait_for(timeout=10_000)


@pytest.mark.skip(
    reason="the control API has no read-only role yet: every valid token is an operator"
)
def test_restart_refused_with_a_read_only_token() -> None:  # pragma: no cover
    raise AssertionError


def test_dashboard_over_the_unix_socket(shop: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    """``trellis dashboard`` opens a loopback port guarded by a one-time token."""
    port = _free_port()
    fwd = subprocess.Popen(
        [
            sys.executable, "-m", "trellis", "dashboard", "--socket", str(shop["sock"]),
            "--port", str(port), "--no-open",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )  # fmt: skip
    try:
        assert fwd.stdout is not None
        line = fwd.stdout.readline()
        assert f"http://127.0.0.1:{port}/#token=" in line, line
        link = line.split(": ", 1)[1].strip()
        session = link.split("#token=", 1)[1]
        base = f"http://127.0.0.1:{port}"
        # without the session token only the page is served
        assert httpx.get(f"{base}/", timeout=5.0).status_code == 200
        assert httpx.get(f"{base}/v1/tree", timeout=5.0).status_code == 403
        r = httpx.get(f"{base}/v1/tree", headers={"Authorization": f"Bearer {session}"})
        assert r.status_code == 200
        page = browser.new_page(viewport={"width": 1280, "height": 720})
        page.goto(link)
        page.locator('.child[data-path="shop/jobs/a"]').wait_for(timeout=10_000)
        page.wait_for_selector("#conn.live", timeout=10_000)
        page.click('button[data-action="restart"][data-path="shop/jobs/a"]')
        page.wait_for_selector("#msg.ok", timeout=5000)
        shot = tmp_path / "dashboard-unix.png"
        page.screenshot(path=str(shot), full_page=True)
        assert _non_blank(shot.read_bytes())
    finally:
        fwd.terminate()
        fwd.wait(timeout=10)
        if fwd.stdout is not None:
            fwd.stdout.close()
