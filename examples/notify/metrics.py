"""The service's own Prometheus metrics (prometheus_client's default registry, which the
tree's ``/metrics`` also serves), and the SLIs its tree file declares on them."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["ACCEPTED", "ATTEMPTS", "DEAD_LETTERS", "DELIVERIES", "REJECTED", "TIME_TO_SEND"]

ACCEPTED = Counter("notify_accepted", "Notifications accepted by the intake (202)", ["priority"])
REJECTED = Counter("notify_rejected", "Notifications the intake refused", ["reason"])
#: one per (notification, device token) reaching a final state; outcome is sent,
#: invalid_token (the provider refused the token: final, not a failure of ours) or failed
DELIVERIES = Counter(
    "notify_deliveries", "Deliveries that reached a final state", ["priority", "outcome"]
)
#: each (notification, token) pair put to a provider: result ok (the provider took it:
#: shown, repeat or invalid token), unavailable (5xx, 429, timeout, breaker open) or
#: error (an answer the client does not understand); the delivery success SLI is ok / all
ATTEMPTS = Counter("notify_send_attempts", "Deliveries put to a provider", ["priority", "result"])
#: accepted messages that can never be sent (undecodable), set aside in NOTIFY_DEAD
DEAD_LETTERS = Counter(
    "notify_dead_letters", "Accepted messages set aside as undecodable", ["priority"]
)
#: accepted by the intake -> accepted by the provider
TIME_TO_SEND = Histogram(
    "notify_time_to_send_seconds",
    "From intake acceptance to provider acceptance",
    ["priority"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)
