"""Fake ``python -m sglang.launch_server``: accepts the real flags, serves ``/health`` on --host/--port.

``FAKE_SGLANG_MODE``: ``ok`` (healthy at once), ``unhealthy`` (503 forever), ``crash`` (log an error and
exit 3). It writes its pid to ``FAKE_SGLANG_PIDFILE`` when set."""

from __future__ import annotations

import argparse
import os
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    args, _ = p.parse_known_args()
    mode = os.environ.get("FAKE_SGLANG_MODE", "ok")
    if os.environ.get("FAKE_SGLANG_PIDFILE"):
        with open(os.environ["FAKE_SGLANG_PIDFILE"], "w") as f:
            f.write(str(os.getpid()))
    print(f"fake sglang starting in mode {mode} with {sys.argv[1:]}", flush=True)
    if mode == "crash":
        print("RuntimeError: fake scheduler failed to start", flush=True)
        sys.exit(3)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if mode == "ok" else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    HTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
