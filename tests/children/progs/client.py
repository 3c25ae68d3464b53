"""usage: client.py PORT

Connects to 127.0.0.1:PORT and prints ``connected``; when the server goes away it prints
``server gone`` and keeps sleeping (a dependent that does not notice on its own)."""

import os
import socket
import sys
import time

print(f"pid {os.getpid()}", flush=True)
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
while conn.recv(4096):
    pass
print("server gone", flush=True)
while True:
    time.sleep(60)
