"""Run the market-data pipeline for a while and print its integrity report.

python -m examples.market_data --seconds 10 --symbols 50 [--redis URL] [--json]
python -m examples.market_data --write-tree     # regenerate tree.toml from Settings()
python -m examples.market_data chaos [--seconds 60 --seed N --redis URL --json FILE]
                                                # the main job (main_job.py)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from examples.market_data.pipeline import Pipeline
from examples.market_data.tree import Settings, render_toml


async def _run(args: argparse.Namespace) -> int:
    async with Pipeline(
        symbols=args.symbols,
        seed=args.seed,
        redis_url=args.redis,
        workdir=args.workdir,
        groups=args.groups,
        rate=args.rate,
    ) as p:
        loop = asyncio.get_running_loop()
        end = loop.time() + args.seconds
        while loop.time() < end:
            await asyncio.sleep(min(1.0, max(0.0, end - loop.time())))
            stats = await p.exchange_stats()
            print(f"  {stats['ticks_total']} ticks generated", file=sys.stderr, flush=True)
        settled = await p.settle(timeout=args.settle)
        figures = await p.figures()
        report = await p.integrity()
    if args.json:
        print(json.dumps({**figures, "settled": settled}, indent=2, default=str))
    else:
        print(report.summary())
    return 0 if report.ok and settled else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chaos"]:
        from examples.market_data.main_job import main as main_job

        return main_job(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m examples.market_data",
        epilog="python -m examples.market_data chaos --help: the main job (under chaos)",
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--symbols", type=int, default=50)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--redis",
        default=os.environ.get("MARKET_DATA_REDIS_URL"),
        help="a Redis URL for the tick buffer and the gatekeeper (env MARKET_DATA_REDIS_URL)",
    )
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--settle", type=float, default=30.0)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--write-tree", action="store_true", help="regenerate tree.toml and exit")
    args = ap.parse_args(argv)
    if args.write_tree:
        path = Path(__file__).resolve().parent / "tree.toml"
        path.write_text(render_toml(Settings()), encoding="utf-8")
        print(f"wrote {path}")
        return 0
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
