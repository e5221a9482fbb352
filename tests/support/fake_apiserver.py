"""A tiny HTTP stand-in for the Kubernetes API server, on a free loopback port: each request is recorded
(method, path, query, content type, JSON body) and answered from `routes` ((method, path) -> (status, body);
a str body is sent as text, anything else as JSON). `kubeconfig()` writes a kubeconfig that points at it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    content_type: str
    body: Any


@dataclass
class FakeAPIServer:
    url: str = ""
    routes: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def kubeconfig(self, path: Path, namespace: str = "voice") -> Path:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "main",
            "clusters": [{"name": "c", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "main", "context": {"cluster": "c", "user": "u", "namespace": namespace}},
                         {"name": "other", "context": {"cluster": "c", "user": "u"}}],
        }
        path.write_text(yaml.safe_dump(cfg))
        return path


def _handler(server: FakeAPIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            parts = urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            server.seen.append(Seen(self.command, parts.path, parse_qs(parts.query),
                                    self.headers.get("Content-Type", ""), json.loads(raw) if raw else None))
            status, body = server.routes.get((self.command, parts.path),
                                             (404, {"kind": "Status", "message": "not found", "code": 404}))
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if isinstance(body, str) else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@contextmanager
def fake_apiserver() -> Iterator[FakeAPIServer]:
    fake = FakeAPIServer()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
