"""What the journal, metrics and control API add to `trellis run`'s cold start.

`trellis run` of a tree of 50 OS-process children (`sleep`), launched from the shell
each time, timed from the launch to the 50th `child.started` event (read from its JSON
log). Rounds alternate: with the defaults (journal, metrics, control API) and with
`--no-journal --no-control --no-metrics`. Medians; the ratio is what counts.

    python bench/bench_startup.py            # 7 rounds
    python bench/bench_startup.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OFF = ["--no-journal", "--no-control", "--no-metrics"]


def tree(dir: Path, n: int) -> Path:
    lines = ["[supervisor]", 'name = "startup"']
    for i in range(n):
        lines += ["[[supervisor.children]]", f'id = "p{i}"', 'command = ["sleep", "600"]']
    path = dir / "tree.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def once(path: Path, flags: list[str], n: int, env: dict[str, str]) -> float:
    """Seconds from launch to the n-th child.started."""
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "trellis", "run", str(path), "--log-format", "json", *flags],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert proc.stderr is not None
    seen, last = 0, None
    for line in proc.stderr:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "child.started":
            seen += 1
            if seen == n:
                last = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))
                break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    if last is None:
        raise RuntimeError(f"trellis run {' '.join(flags)} did not start {n} children")
    return last.timestamp() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("-n", "--children", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trl-start-", dir="/tmp") as d:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT / "src"),
            "TRELLIS_STATE_DIR": f"{d}/state",
            "XDG_RUNTIME_DIR": d,
        }
        path = tree(Path(d), args.children)
        on: list[float] = []
        off: list[float] = []
        for r in range(args.rounds):
            for flags in ([], OFF) if r % 2 == 0 else (OFF, []):
                (off if flags else on).append(once(path, flags, args.children, env))
            print(f"round {r + 1}: defaults {on[-1]:.3f} s, all off {off[-1]:.3f} s", flush=True)
    a, b = statistics.median(on), statistics.median(off)
    print(f"\nlaunch -> {args.children} children started, median of {args.rounds}:")
    print(f"  journal + metrics + control API   {a:.3f} s")
    print(f"  --no-journal --no-control --no-metrics  {b:.3f} s")
    print(f"  added {a - b:+.3f} s ({a / b:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
