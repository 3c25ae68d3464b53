"""The control API's configuration error."""

from __future__ import annotations

from .._core._exceptions import TrellisError

__all__ = ["ControlError"]


class ControlError(TrellisError):
    """The control API cannot start as configured (the message names the setting)."""
