"""What ``tree.toml`` names (``server = "md_parts:Collector"``).

``trellis run`` puts the tree file's directory on ``sys.path``; this module adds
the repository root too, so the parts import as ``examples.market_data.*``
whichever way they are reached.
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from examples.market_data.collector import Collector  # noqa: E402
from examples.market_data.gatekeeper import Gatekeeper  # noqa: E402
from examples.market_data.recovery import Recovery  # noqa: E402
from examples.market_data.sentinel import Sentinel  # noqa: E402
from examples.market_data.store import TickStore  # noqa: E402

__all__ = ["Collector", "Gatekeeper", "Recovery", "Sentinel", "TickStore"]
