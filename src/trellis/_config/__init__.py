"""Private helpers of :mod:`trellis.config`."""
