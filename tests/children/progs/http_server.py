"""usage: http_server.py PORT [--delay S] [--fail-first N] [--marker PATH]

Serves HTTP on 127.0.0.1:PORT after S seconds: the first N requests get 503, later ones
200 (PATH is written before the first 200 is sent). Prints ``served <status>`` per request.
"""

import http.server
import os
import sys
import time

port = int(sys.argv[1])
delay = float(sys.argv[sys.argv.index("--delay") + 1]) if "--delay" in sys.argv else 0.0
fail_first = int(sys.argv[sys.argv.index("--fail-first") + 1]) if "--fail-first" in sys.argv else 0
marker = sys.argv[sys.argv.index("--marker") + 1] if "--marker" in sys.argv else None
served = 0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global served
        status = 503 if served < fail_first else 200
        served += 1
        body = b"ok\n" if status == 200 else b"not yet\n"
        if status == 200 and marker:
            with open(marker, "w") as f:
                f.write("200")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        print(f"served {status}", flush=True)

    def log_message(self, format, *args):
        pass


print(f"pid {os.getpid()}", flush=True)
time.sleep(delay)
http.server.HTTPServer.allow_reuse_address = True
with http.server.HTTPServer(("127.0.0.1", port), Handler) as httpd:
    print("listening", flush=True)
    httpd.serve_forever()
