"""Print ``burning`` and spin the CPU forever (for the cpu rlimit)."""

print("burning", flush=True)
n = 0
while True:
    n += 1
