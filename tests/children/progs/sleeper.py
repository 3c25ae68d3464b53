"""Print ``pid <pid>`` and ``ready``, then sleep forever."""

import os
import time

print(f"pid {os.getpid()}", flush=True)
print("ready", flush=True)
while True:
    time.sleep(60)
