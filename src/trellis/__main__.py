"""The ``trellis`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import __version__

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="trellis", description="Erlang/OTP supervision trees for Python services."
    )
    parser.add_argument("--version", action="version", version=f"trellis {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run a small tree that crashes, restarts and escalates")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from ._demo import demo

        return asyncio.run(demo())
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse exits
    return 2


if __name__ == "__main__":
    sys.exit(main())
