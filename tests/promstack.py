"""A real Prometheus + Pushgateway on loopback for tests (Debian's prometheus and prometheus-pushgateway).

`start_prom_stack(tmp)` starts both binaries on free ports, Prometheus scraping the Pushgateway (and any
extra targets) every second, and returns a PromStack with their URLs, `query()` and `stop()`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout} s")


@dataclass
class PromStack:
    pushgateway: str
    prometheus: str
    procs: list[subprocess.Popen] = field(default_factory=list)

    def query(self, promql: str) -> list[dict]:
        url = f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=5) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]["result"]

    def wait_for(self, promql: str, timeout: float = 30) -> list[dict]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            res = self.query(promql)
            if res:
                return res
            time.sleep(0.5)
        raise AssertionError(f"Prometheus never returned data for {promql!r} within {timeout} s")

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)


def available() -> bool:
    return bool(shutil.which("prometheus") and shutil.which("prometheus-pushgateway"))


def start_prom_stack(tmp: Path, extra_targets: list[str] | None = None) -> PromStack:
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    pg_port, prom_port = free_port(), free_port()
    # Debian's pushgateway persists to /var/lib/prometheus by default: keep each stack's data its own
    procs = [_spawn(["prometheus-pushgateway", f"--web.listen-address=127.0.0.1:{pg_port}",
                     f"--persistence.file={tmp / 'pushgateway.data'}"], tmp / "pushgateway.log")]
    targets = [f"127.0.0.1:{pg_port}", *(extra_targets or [])]
    (tmp / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: rvc\n    honor_labels: true\n    static_configs:\n"
        f"      - targets: {json.dumps(targets)}\n")
    procs.append(_spawn(
        ["prometheus", f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"], tmp / "prometheus.log"))
    stack = PromStack(f"http://127.0.0.1:{pg_port}", f"http://127.0.0.1:{prom_port}", procs)
    try:
        _wait_http(stack.pushgateway + "/metrics")
        _wait_http(stack.prometheus + "/-/ready")
    except Exception:
        stack.stop()
        raise
    return stack
