"""scripts/gpu_check.sh (issue 12): the one prepared GPU check, run here on the CPU with the tiny
checkpoint, from a clean environment in which the repo is not installed (the editable install's
paths are hidden from the interpreter), so the script's own PYTHONPATH is what finds the code.

Also: a failing, a timed-out and an over-budget step are recorded without stopping the later steps;
the preflight turns a missing runtime module into a problem line instead of a traceback; the bench's
peak-FLOP/s detection."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest

from lychee_server import gpu_check
from lychee_server.bench import (
    UNKNOWN_GPU_PEAK_FLOPS,
    add_bench_arguments,
    detect_peak_flops,
    resolve_peak_flops,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
ALL_STEPS = ["wheels", "preflight", "checkpoint", "check-bf16", "check-fp32", "bench", "profile", "variants"]

# A sitecustomize for the child interpreters: drop the editable install's paths into the repo (they
# come after site-packages; the script's PYTHONPATH entries come first), and hide the modules named in
# GPU_CHECK_TEST_HIDE as a GPU image without them would.
_SITECUSTOMIZE = """
import os, sys
repo = {repo!r}
cut = next((i for i, p in enumerate(sys.path) if p.endswith("site-packages")), len(sys.path))
sys.path[:] = sys.path[:cut + 1] + [p for p in sys.path[cut + 1:] if not p.startswith(repo)]
hide = set(filter(None, os.environ.get("GPU_CHECK_TEST_HIDE", "").split(",")))

class _Hide:
    def __init__(self, inner):
        self.inner = inner
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in hide:
            return None
        return self.inner.find_spec(name, path, target)
    def __getattr__(self, attr):
        return getattr(self.inner, attr)

if hide:
    sys.meta_path[:] = [_Hide(f) if getattr(f, "__name__", "") == "PathFinder" else f for f in sys.meta_path]
"""


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    site = tmp_path / "sim-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(repo=str(REPO)))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "TMPDIR": str(tmp_path),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(site),
    }
    env.update(extra)
    return env


def _run(
    tmp_path: Path, out: Path, *args: str, timeout: float = 280, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), str(out), *args],
        cwd=tmp_path,
        env=_clean_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _steps(out: Path) -> list[list[str]]:
    return [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]


def _assert_summary_last(proc: subprocess.CompletedProcess[str], out: Path) -> list[str]:
    summary = (out / "summary.txt").read_text().strip().splitlines()
    printed = proc.stdout.strip().splitlines()
    assert printed[-len(summary) :] == summary, proc.stdout[-3000:]
    assert summary[-1].startswith("== gpu_check:")
    return summary


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else ""


@pytest.mark.timeout(600)  # about 80 s on two idle cores; loaded CI machines run slower
def test_cpu_run_end_to_end(tmp_path: Path) -> None:
    docs_before = _sha(REPO / "docs" / "benchmarks.md")
    out = tmp_path / "out"
    t0 = time.perf_counter()
    proc = _run(tmp_path, out, "--device", "cpu", timeout=560)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    steps = _steps(out)
    assert [s[0] for s in steps] == ALL_STEPS
    assert all(s[1] == "0" for s in steps), steps
    for name in ALL_STEPS:
        assert (out / f"{name}.log").is_file()

    pre = json.loads((out / "preflight.json").read_text())
    assert pre["ok"] is True and pre["problems"] == []
    assert pre["device"] == "cpu" and pre["modules"]["torch"]["importable"]
    assert set(pre["engine_import"].values()) == {"ok"}
    for probe in ("varlen_attn", "torch_compile", "float8"):
        assert "seconds" in pre[probe]

    for name in ("check-bf16", "check-fp32"):
        rep = json.loads((out / f"{name}.json").read_text())
        assert rep["ok"] is True and rep["pairs"] >= 19
    assert json.loads((out / "check-bf16.json").read_text())["dtype"] == "bfloat16"
    fp32 = json.loads((out / "check-fp32.json").read_text())
    assert fp32["dtype"] == "float32" and fp32["bf16_ranking"]["documents_per_query"] == 8

    bench = json.loads((out / "bench.json").read_text())
    assert [r["workload"] for r in bench["rows"]] == ["a", "b", "c", "d"]
    assert all(r["peak_memory_mib"] > 0 and r["mfu"] is None for r in bench["rows"])
    assert bench["peak_flops"] is None and bench["repeats"] == 1
    md = (out / "benchmarks-gpu.md").read_text()
    assert md.count("| (a)") == 1 and "| (d)" in md
    assert _sha(REPO / "docs" / "benchmarks.md") == docs_before, "the script must not touch the repo's docs"

    prof = json.loads((out / "profile.json").read_text())
    assert set(prof["workloads"]) == {"a", "b"}
    pre = prof["preemption"]  # a light batch at a pause of a heavy one; stepped == score()
    assert pre.get("error") is None and pre["stepped_scores_equal_score"] is True, pre
    assert pre["pauses"] > 10 and pre["light_at_first_pause_ms"] > 0
    for row in prof["workloads"].values():
        assert row["top"] and row["top"][0]["self_us"] > 0
    text = (out / "profile.txt").read_text()
    assert "workload (a): top 25" in text and "workload (b): top 25" in text and "aten::" in text
    sync = (out / "syncdebug.txt").read_text()
    assert "workload (a)" in sync and "workload (b)" in sync and "CUDA only" in sync

    variants = {v["variant"]: v for v in json.loads((out / "variants.json").read_text())["variants"]}
    assert set(variants) == {f"{f}={v}" for f, v in gpu_check.VARIANTS}
    for name in ("attention-backend=sdpa", "attention-backend=varlen", "fused-kernels=off"):
        assert variants[name]["status"] == "ok", variants[name]
        assert variants[name]["dtype"] == "float32" and variants[name]["max_abs_diff_p"] <= 1e-5
    assert variants["quantization=fp8"]["status"] == "skipped"

    summary = _assert_summary_last(proc, out)
    assert summary[-1].startswith(f"== gpu_check: {len(ALL_STEPS)}/{len(ALL_STEPS)} steps ok")
    top = [line.split() for line in summary[2:-1] if not line.startswith(" ")]
    assert [(r[0], r[1]) for r in top] == [(name, "ok") for name in ALL_STEPS]
    bench_rows = [line for line in summary if line.startswith("  bench ")]
    assert len(bench_rows) == 4 and all("pairs/s" in line and "peak" in line for line in bench_rows)

    with tarfile.open(out / "gpu_check-bundle.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"bench.json", "summary.txt", "preflight.json", "profile.txt", "variants.json"} <= names
    print(f"gpu_check --device cpu: {elapsed:.1f} s")


def test_failed_timed_out_and_skipped_steps_are_recorded(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _run(
        tmp_path,
        out,
        "--device",
        "cpu",
        "--steps",
        "wheels,preflight,checkpoint,check-bf16",
        GPU_CHECK_FAIL_STEP="wheels,check",  # "check" = every check-* step
        GPU_CHECK_LIMIT_PREFLIGHT="1",  # importing torch alone takes longer
        timeout=200,
    )
    assert proc.returncode == 1, proc.stdout[-3000:]
    steps = {s[0]: s for s in _steps(out)}
    assert list(steps) == ["wheels", "preflight", "checkpoint", "check-bf16"]
    assert steps["wheels"][1] == "97" and steps["check-bf16"][1] == "97"
    assert steps["preflight"][1] in ("124", "137")
    assert steps["checkpoint"][1] == "0", (out / "checkpoint.log").read_text()[-2000:]
    assert (out / "checkpoint.log").is_file()
    assert "simulated failure of check-bf16" in (out / "check-bf16.log").read_text()
    summary = _assert_summary_last(proc, out)
    status = {line.split()[0]: line.split()[1] for line in summary[2:-1]}
    assert status == {
        "wheels": "FAIL(sim)",
        "preflight": "TIMEOUT",
        "checkpoint": "ok",
        "check-bf16": "FAIL(sim)",
    }
    assert summary[-1].startswith("== gpu_check: 1/4 steps ok")

    # A spent budget skips steps (recorded, not silently dropped) and still ends with the table.
    out2 = tmp_path / "out2"
    proc = _run(tmp_path, out2, "--device", "cpu", "--budget", "5", "--steps", "preflight,bench", timeout=60)
    assert proc.returncode == 1
    assert [(s[0], s[1]) for s in _steps(out2)] == [("preflight", "skip"), ("bench", "skip")]
    summary = _assert_summary_last(proc, out2)
    assert [line.split()[1] for line in summary[2:-1]] == ["SKIPPED", "SKIPPED"]


def test_preflight_reports_missing_runtime_modules(tmp_path: Path) -> None:
    """A GPU image without pydantic / pydantic-settings / simplejpeg: preflight.json says so, with the
    way out, and the wheels step fails with the same hint instead of installing nothing silently."""
    env = _clean_env(tmp_path, GPU_CHECK_TEST_HIDE="pydantic,pydantic_settings,pydantic_core,simplejpeg")
    env["PYTHONPATH"] = f"{REPO / 'server'}:{REPO / 'client'}:{env['PYTHONPATH']}"
    out = tmp_path / "pre.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lychee_server.gpu_check", "preflight", "--device", "cpu", "--json", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    rep = json.loads(out.read_text())
    assert rep["ok"] is False
    assert rep["modules"]["pydantic"] == {"present": False}
    assert rep["modules"]["torch"]["importable"] is True
    assert "pydantic" in rep["engine_import"]["lychee_server.settings"]
    joined = "\n".join(rep["problems"])
    assert "pydantic-settings" in joined and "simplejpeg" in joined and "fetch-wheels" in joined

    wheels = subprocess.run(
        [sys.executable, "-m", "lychee_server.gpu_check", "wheels", "--dir", str(tmp_path / "none"),
         "--target", str(tmp_path / "site"), "--json", str(tmp_path / "w.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert wheels.returncode == 2
    report = json.loads((tmp_path / "w.json").read_text())
    assert {"pydantic", "pydantic_settings", "simplejpeg"} <= set(report["missing_before"])
    assert "fetch-wheels" in report["error"]


def test_wheels_step_installs_nothing_when_nothing_is_missing(tmp_path: Path) -> None:
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "pydantic-0.0.1-py3-none-any.whl").write_bytes(b"not a wheel")
    ns = types.SimpleNamespace(
        dir=str(tmp_path / "whl"), target=str(tmp_path / "site"), json=tmp_path / "w.json"
    )
    assert gpu_check._wheels(ns) == 0
    report = json.loads((tmp_path / "w.json").read_text())
    assert report["missing_before"] == [] and report["installed"] == [] and report["error"] is None


def test_wheels_step_reports_a_failed_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "_absent", lambda module: module == "simplejpeg")
    (tmp_path / "whl").mkdir()
    (tmp_path / "whl" / "simplejpeg-1.9.0-py3-none-any.whl").write_bytes(b"not a wheel")
    ns = types.SimpleNamespace(
        dir=str(tmp_path / "whl"), target=str(tmp_path / "site"), json=tmp_path / "w.json"
    )
    assert gpu_check._wheels(ns) == 2
    report = json.loads((tmp_path / "w.json").read_text())
    assert report["missing_before"] == ["simplejpeg"] and "pip install failed" in report["error"]


def test_summary_table_from_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "steps.tsv").write_text(
        "bench\t0\t61.2\t240\nprofile\t124\t180.0\t180\nvariants\t1\t90.5\t240\n"
        "check-fp32\tskip\t0\tskipped: budget\n"
    )
    row = {
        "workload": "a", "latency_p50_s": 2.5, "pairs_per_s": 20.0, "mfu": 0.4321,
        "peak_memory_mib": 17.5 * 1024, "speedup": 12.0,
    }  # fmt: skip
    (tmp_path / "bench.json").write_text(
        json.dumps(
            {
                "machine": "NVIDIA H200",
                "dtype": "bfloat16",
                "peak_flops": 989e12,
                "peak_flops_source": "detected: 'NVIDIA H200' = H200 (dense bf16 datasheet)",
                "rows": [row],
            }
        )
    )
    (tmp_path / "variants.json").write_text(
        json.dumps(
            {
                "variants": [
                    {"variant": "attention-backend=varlen", "status": "ok", "max_abs_diff_p": 3e-3,
                     "engine_seconds": 1.25},
                    {"variant": "quantization=fp8", "status": "error", "error": "ModelLoadError: no fp8"},
                ]
            }
        )
    )  # fmt: skip
    (tmp_path / "profile.log").write_text("loading\n")
    assert gpu_check.main(["summary", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    text = "\n".join(lines)
    assert "p50 2.500s 20.0 pairs/s MFU 43.2% peak 17.50GiB" in text
    assert "NVIDIA H200 bfloat16; MFU vs 989 TFLOP/s (detected)" in text
    assert "TIMEOUT" in text and "FAIL(1)" in text and "SKIPPED" in text
    assert "1/2 ok" in text and "quantization=fp8" in text and "no fp8" in text
    assert lines[-1].startswith("== gpu_check: 1/4 steps ok")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in saved["steps"]] == ["ok", "TIMEOUT", "FAIL(1)", "SKIPPED"]


@pytest.mark.parametrize(
    ("name", "flops"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("Tesla T4", None),
    ],
)
def test_detect_peak_flops(name: str, flops: float | None) -> None:
    assert detect_peak_flops(name)[0] == flops


def test_resolve_peak_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    cpu, cuda = torch.device("cpu"), types.SimpleNamespace(type="cuda")
    assert resolve_peak_flops(None, cpu)[0] is None
    assert resolve_peak_flops(5e14, cpu)[0] is None  # no MFU on a CPU, whatever the flag
    assert resolve_peak_flops(5e14, cuda) == (5e14, "--peak-flops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    flops, source = resolve_peak_flops(None, cuda)
    assert flops == 756e12 and source.startswith("detected")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    flops, source = resolve_peak_flops(None, cuda)
    assert flops == UNKNOWN_GPU_PEAK_FLOPS and source.startswith("assumed") and "T4" in source

    import argparse

    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert parser.parse_args([]).peak_flops is None
    assert parser.parse_args(["--peak-flops", "756e12"]).peak_flops == 756e12
