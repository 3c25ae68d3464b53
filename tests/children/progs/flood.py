"""usage: flood.py N [--long BYTES] [--width W] [--pause S]

Writes N lines ``err <i> xxx...`` to stderr first, then N lines ``out <i> xxx...`` to
stdout (W characters of padding, default 60), as fast as it can in big writes (or, with
``--pause``, one write per line and a pause of S seconds after each); with ``--long`` one
line of BYTES characters (no newline until its end) on stdout; then prints ``done`` and
exits 0.
"""

import sys
import time

n = int(sys.argv[1])
width = int(sys.argv[sys.argv.index("--width") + 1]) if "--width" in sys.argv else 60
pad = "x" * width
err = sys.stderr.buffer
out = sys.stdout.buffer
pause = float(sys.argv[sys.argv.index("--pause") + 1]) if "--pause" in sys.argv else None
for stream, tag in ((err, "err"), (out, "out")):
    for i in range(n):
        stream.write(f"{tag} {i} {pad}\n".encode())
        if pause is not None:
            stream.flush()
            time.sleep(pause)
    stream.flush()
if "--long" in sys.argv:
    out.write(b"L" * int(sys.argv[sys.argv.index("--long") + 1]) + b"\n")
out.write(b"done\n")
out.flush()
