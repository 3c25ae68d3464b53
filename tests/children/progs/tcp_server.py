"""usage: tcp_server.py PORT [--delay S]

Listens on 127.0.0.1:PORT after S seconds and prints ``listening``; prints ``accepted``
for each connection and keeps it open until the peer closes it. SIGUSR1 closes the
listening socket (the process keeps running, now failing TCP health checks).
"""

import os
import selectors
import signal
import socket
import sys
import time

port = int(sys.argv[1])
delay = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0
print(f"pid {os.getpid()}", flush=True)
time.sleep(delay)
sel = selectors.DefaultSelector()
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", port))
server.listen(64)
sel.register(server, selectors.EVENT_READ)
closing = False


def on_usr1(signum, frame):
    global closing
    closing = True


signal.signal(signal.SIGUSR1, on_usr1)
print("listening", flush=True)
while True:
    if closing and server is not None:
        sel.unregister(server)
        server.close()
        server = None
        print("closed listener", flush=True)
    for key, _ in sel.select(timeout=0.05):
        if key.fileobj is server:
            conn, _ = server.accept()
            sel.register(conn, selectors.EVENT_READ)
            print("accepted", flush=True)
        else:
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
