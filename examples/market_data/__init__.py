"""A self-healing market-data pipeline on Trellis: a simulated exchange, collectors, a tick
store, a shared rate-limit gatekeeper, a recovery worker and a hang sentinel.

See ``pipeline.Pipeline`` (drive it from Python) and ``tree.toml`` (``trellis run``).
"""
