"""Isolated Python servers: a ``trellis.Server`` in an interpreter of its own."""

from ._proxy import Isolated, IsolatedExit
from ._wire import UnsupportedMessage, message_type

__all__ = ["Isolated", "IsolatedExit", "UnsupportedMessage", "message_type"]
