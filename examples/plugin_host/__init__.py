"""The healthcare plugin host example (see demo.py)."""
