"""Replay recorded snapshots through `watch` on a real terminal, to look at the live view:

    tmux new-session -d -s rvcw -x 110 -y 35 '.venv/bin/python -m tests.support.watch_replay 1.5; sleep 60'
    tmux capture-pane -p -t rvcw
"""

from __future__ import annotations

import sys

from rvc_pipeline.client import commands

from tests.support import client_snapshots as snaps
from tests.support.fake_kube import FakeKube


def main(argv: list[str]) -> int:
    kube = FakeKube(events=snaps.EVENTS)
    kube.script = snaps.watch_sequence()
    ctx = commands.Ctx(kube, "voice", now=lambda: snaps.NOW)
    ctx.interval = float(argv[0]) if argv else 1.0
    code = commands.watch(ctx, "alice")
    print(f"exit code {code}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
