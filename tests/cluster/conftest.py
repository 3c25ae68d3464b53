"""Fixtures for the cluster tests: a throwaway ``nats-server -js`` per test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # _nats_nodes

from _nats_nodes import NATS, NatsServer


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    if NATS is None:
        pytest.skip(
            "needs nats-server with JetStream on PATH (Debian: apt install nats-server, "
            "or the static binary from the NATS releases)"
        )
    server = NatsServer(tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()
