"""core.heap.keep_freed_memory: the same large buffers allocated and freed over and over stop costing page
faults (what the features and training steps set for their processes). Runs in a child process: the
setting cannot be undone."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

CHILD = r"""
import json, resource
import numpy as np
from rvc_pipeline.core.heap import keep_freed_memory

def faults(rounds=20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        a = np.ones(3 << 20, dtype=np.float32)  # 12 MB: mmapped, then handed back, by glibc's defaults
        b = np.ones(3 << 20, dtype=np.float32)
        del a, b
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
ok = keep_freed_memory()
faults(1)
print(json.dumps({"default": default, "kept": faults(), "ok": ok}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_freed_buffers_are_reused_without_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout)
    assert r["ok"] is True
    # by default freed memory goes back to the kernel: the 12 MB buffers (3072 pages) fault in again and again
    assert r["default"] > 3 * 3072, r
    assert r["kept"] < 1000, r  # kept: reused as they are
