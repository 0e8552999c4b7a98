"""A real HTTP server on localhost (Python's own) serving a folder of shards, with faults on demand: a response cut
off mid-body (the connection dropped), or one that stalls after part of the body."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, *args: Any) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # http.server's naming
        name = self.path.lstrip("/").split("?", 1)[0]
        self.server.owner.requests[name] += 1
        fault = self.server.owner.faults.get(name)
        if fault is None or fault["times"] == 0:
            super().do_GET()
            return
        fault["times"] -= 1
        data = (self.server.owner.root / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: int(len(data) * fault["at"])])
        self.wfile.flush()
        if fault["stall"]:
            time.sleep(fault["stall"])
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: ShardServer


class ShardServer:
    """``with ShardServer(folder) as server: server.url("shard-000000.tar")``; ``server.fault(name, ...)`` cuts the
    next ``times`` responses of ``name`` (-1: all) at fraction ``at`` of the body, after ``stall`` seconds of
    silence; ``server.requests[name]`` counts GET requests."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: Counter[str] = Counter()
        self.faults: dict[str, dict[str, Any]] = {}
        self.httpd = _Server(("127.0.0.1", 0), partial(_Handler, directory=str(self.root)))
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def fault(self, name: str, times: int = 1, at: float = 0.5, stall: float = 0.0) -> None:
        self.faults[name] = {"times": times, "at": at, "stall": stall}

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
