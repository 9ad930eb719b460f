"""``lychee-rerank serve`` with weights it cannot find: a clear message and exit code 1, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_serve_without_weights_says_what_to_do(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", LYCHEE_LOG_JSON="false")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lychee_server.cli",
            "serve",
            "--model",
            str(tmp_path / "no-such-model"),
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert proc.returncode == 1
    assert "lychee-rerank: could not load" in proc.stderr
    assert "pass a local checkpoint directory" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
