"""``lychee-rerank serve`` start-up failures: one ``lychee-rerank: ...`` line on stderr that says
what is wrong and which flag to look at, exit status 1, no traceback.

Each case runs the real CLI in a subprocess (loopback, CPU). A port "in use" is held by a
listening socket of the test itself, so the cases do not depend on what else runs here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

harness = pytest.importorskip("harness")


def _serve(*args: str, model: str | Path = "/nonexistent-model") -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lychee_server.cli",
            "serve",
            "--model",
            str(model),
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--http-port",
            "0",
            "--metrics-port",
            "0",
            "--no-warmup",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
        cwd=harness.REPO_ROOT,
    )


def _the_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one plain ``lychee-rerank:`` line of a failed start (JSON log lines aside)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert '"event": "serving"' not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("lychee-rerank:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port some other process listens on (here: this test)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("flag", "what"),
    [("--port", "gRPC"), ("--http-port", "HTTP"), ("--metrics-port", "metrics")],
)
def test_port_in_use(taken_port: int, flag: str, what: str) -> None:
    line = _the_line(_serve(flag, str(taken_port)))
    assert line == (
        f"lychee-rerank: cannot listen for {what} on 127.0.0.1:{taken_port}: "
        f"the address is already in use (another process listens there) ({flag})"
    )


def test_unreadable_tls_file(tmp_path: Path) -> None:
    tls = harness.make_tls_files(tmp_path)
    missing = tmp_path / "missing.key"
    line = _the_line(_serve("--tls-cert", str(tls.server_cert), "--tls-key", str(missing)))
    assert line == f"lychee-rerank: cannot read the TLS file --tls-key {missing}: No such file or directory"

    line = _the_line(_serve("--tls-cert", str(tls.server_cert), "--tls-key", str(tmp_path)))
    assert line == f"lychee-rerank: cannot read the TLS file --tls-key {tmp_path}: Is a directory"


def test_tls_files_that_are_not_a_certificate_and_key(tmp_path: Path) -> None:
    tls = harness.make_tls_files(tmp_path)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    line = _the_line(_serve("--tls-cert", str(junk), "--tls-key", str(tls.server_key)))
    assert line.startswith(
        f"lychee-rerank: --tls-cert {junk} / --tls-key {tls.server_key}: "
        "not a PEM certificate and its matching private key"
    )
    # a valid pair, but the client CA bundle holds no certificate
    line = _the_line(
        _serve(
            "--tls-cert",
            str(tls.server_cert),
            "--tls-key",
            str(tls.server_key),
            "--tls-client-ca",
            str(junk),
        )
    )
    assert line.startswith(f"lychee-rerank: --tls-client-ca {junk}: no PEM CA certificate in it")


def test_unreadable_api_keys_file(tmp_path: Path) -> None:
    missing = tmp_path / "keys"
    line = _the_line(_serve("--api-keys-file", str(missing)))
    assert line == f"lychee-rerank: cannot read --api-keys-file {missing}: No such file or directory"


def test_model_dir_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    line = _the_line(_serve(model=tmp_path))
    assert line.startswith(f"lychee-rerank: could not load '{tmp_path}': pass a local checkpoint directory")


def test_cuda_asked_for_but_absent() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = _the_line(_serve("--device", "cuda"))
    assert line == "lychee-rerank: device 'cuda' requested but CUDA is not available; use --device cpu"


def test_metrics_port_zero_is_reported_in_the_serving_line(tiny_checkpoint: Path) -> None:
    with harness.subprocess_server(tiny_checkpoint, env={"LYCHEE_METRICS_PORT": "0"}) as server:
        # the stdout line (the JSON log record of the same event may be read first)
        deadline = time.monotonic() + 30
        while not (found := [line for line in server.lines if line.startswith('{"event": "serving"')]):
            assert time.monotonic() < deadline, server.lines[-20:]
            time.sleep(0.05)
        record = json.loads(found[0])
        assert isinstance(record["metrics_port"], int) and record["metrics_port"] > 0
        assert record["metrics_port"] not in (record["port"], record["http_port"])
        text = harness.fetch_metrics(f"http://127.0.0.1:{record['metrics_port']}/metrics")
        assert "lychee_inflight_pairs" in text
        with contextlib.suppress(ProcessLookupError):
            server.proc.terminate()
        assert server.proc.wait(timeout=60) == 0
