"""SIGTERM while the model is still loading ends the process at once.

A real model load takes minutes; an orchestrator that stops a pod during it must not have to wait
for the load (and then SIGKILL). The slow load is simulated by replacing ``load_engine`` in the
server process with one that blocks for a minute.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = """
import sys, time
import lychee_server.engine as engine

def slow_load(settings):
    time.sleep(60)
    raise RuntimeError("the slow load was not abandoned")

engine.load_engine = slow_load
from lychee_server.app import run_server
from lychee_server.settings import Settings
sys.exit(run_server(Settings(model="unused", port=0, metrics_port=None, device="cpu", log_json=True)))
"""


def test_sigterm_during_model_load_exits_promptly(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the server logs "listening" before it starts loading
            if '"event": "listening"' in line:
                break
        else:
            raise AssertionError("the server never reported listening")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        elapsed = time.monotonic() - t0
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, rest
    assert elapsed < 10, f"exit took {elapsed:.1f}s: the process waited for the model load"
    events = [json.loads(x).get("event") for x in rest.splitlines() if x.startswith("{")]
    assert "stopped" in events
