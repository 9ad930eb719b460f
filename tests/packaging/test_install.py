"""The wheel and sdist build (``python -m build``), and the wheel installs into clean virtual
environments with each audience's extras (issue 13):

* no extras — the client only: grpcio + protobuf, no torch, no pydantic; ``info`` and
  ``rank --target`` work against a running server, server commands print one line naming
  the extra to install;
* ``[langchain]`` — the README's LangChain snippet's imports run;
* ``[server]`` — torch from this machine's disk (as ``scripts/install.sh`` installs it), the
  rest from the package index with ``scripts/constraints.txt``; the installed
  ``lychee-rerank`` makes the tiny checkpoint, serves it and answers a call.

The venvs live in a temporary directory and every command runs outside the checkout, so
nothing of the source tree is importable: what runs is what the wheel installed. Slow (the
``[server]`` venv is several GB: torch with its CUDA libraries); ``.ci/run`` runs them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

harness = pytest.importorskip("harness")

REPO = harness.REPO_ROOT
TORCH = ("torch==2.14.1", "torchvision==0.29.1")  # scripts/install.sh's default pin (on this disk)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run(
    cmd: list[str], cwd: Path, timeout: float = 900, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], cwd=out, timeout=600)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return {"wheel": wheels[0], "sdist": sdists[0]}


def _venv(where: Path) -> Path:
    _run([sys.executable, "-m", "venv", str(where)], cwd=where.parent, timeout=300)
    return where / "bin"


def _installed(bin_dir: Path) -> set[str]:
    out = _run([str(bin_dir / "python"), "-m", "pip", "list", "--format=json"], cwd=bin_dir).stdout
    return {p["name"].lower().replace("_", "-") for p in json.loads(out)}


def test_wheel_and_sdist_hold_the_packages_and_the_command(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = whl.read(meta).decode()
        entry_points = whl.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for module in (
        "lychee/rerank/client/__init__.py",
        "lychee/rerank/v1/rerank_pb2.py",
        "lychee_server/cli.py",
        "lychee_server/app.py",
        "langchain_lychee/__init__.py",
        "llamaindex_lychee/__init__.py",
        "haystack_lychee/__init__.py",
    ):
        assert module in names, module
    assert "lychee-rerank = lychee_server.cli:main" in entry_points
    for extra in ("server", "langchain", "llamaindex", "haystack", "eval", "cuda"):
        assert f"Provides-Extra: {extra}" in metadata
    base = [
        line for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert not any(re.search(r"\b(torch|pydantic|transformers|langchain)", line) for line in base), base
    import tarfile

    with tarfile.open(dist["sdist"]) as sdist:
        members = {m.name.split("/", 1)[1] for m in sdist.getmembers() if "/" in m.name}
    assert {"pyproject.toml", "proto/lychee/rerank/v1/rerank.proto", "server/lychee_server/cli.py"} <= members


@contextlib.contextmanager
def _serving(cmd: list[str], cwd: Path) -> Iterator[dict[str, int]]:
    """Run a ``serve`` command until its ``{"event": "serving", ...}`` line; SIGTERM on exit (exit 0)."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=_clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    ready: dict[str, int] = {}
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith('{"event": "serving"'):
                ready.update(json.loads(line))
                found.set()
        found.set()

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        assert found.wait(180) and ready, "no serving line:\n" + "\n".join(lines[-40:])
        yield ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, "\n".join(lines[-40:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        thread.join(timeout=5)


def _tiny_server_cmd(python: Path | str, model: Path) -> list[str]:
    return [
        str(python),
        "-m",
        "lychee_server.cli",
        "serve",
        "--model",
        str(model),
        "--device",
        "cpu",
        "--port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "off",
        "--decode-threads",
        "1",
    ]


@pytest.mark.slow
def test_base_install_is_the_client_and_its_commands(
    dist: dict[str, Path], tmp_path: Path, tiny_checkpoint: Path
) -> None:
    t0 = time.monotonic()
    bin_dir = _venv(tmp_path / "base")
    _run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(dist["wheel"])], cwd=tmp_path)
    installed = _installed(bin_dir)
    assert {"grpcio", "protobuf", "lychee-rerank"} <= installed
    assert not installed & {
        "torch",
        "pydantic",
        "pydantic-settings",
        "transformers",
        "fastapi",
        "langchain-core",
    }
    _run(
        [str(bin_dir / "python"), "-c", "import lychee.rerank.client, lychee.rerank.v1.rerank_pb2"],
        cwd=tmp_path,
    )

    cli = str(bin_dir / "lychee-rerank")
    assert "info" in _run([cli, "--help"], cwd=tmp_path).stdout
    for argv in (["serve", "--model", "x", "--port", "1"], ["make-test-checkpoint", str(tmp_path / "ck")]):
        proc = _run([cli, *argv], cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().count("\n") == 0, proc.stderr  # one line
        assert proc.stderr.startswith(f"lychee-rerank {argv[0]}: needs the [server] extra"), proc.stderr
        assert f"pip install '{dist['wheel']}[server]'" in proc.stderr, proc.stderr

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Expenses are refunded within 30 days.")
    (tmp_path / "docs" / "b.txt").write_text("The cafeteria opens at 8 am.")
    # a server from the dev venv; the client commands from the base venv
    with _serving(_tiny_server_cmd(sys.executable, tiny_checkpoint), cwd=REPO) as ready:
        target = f"127.0.0.1:{ready['port']}"
        info = json.loads(_run([cli, "info", "--target", target, "--json"], cwd=tmp_path).stdout)
        assert info["model_id"] and info["random_weights"] is True
        assert info["limits"]["max_documents"] > 0
        ranked = _run(
            [cli, "rank", "--target", target, "-q", "refunds", "--json", "docs"], cwd=tmp_path
        ).stdout
        assert sorted(Path(r["path"]).name for r in json.loads(ranked)) == ["a.txt", "b.txt"]
    print(f"base install checks: {time.monotonic() - t0:.1f} s")


def _readme_langchain_imports() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## LangChain", 1)[1]
    block = section.split("```python", 1)[1].split("```", 1)[0]
    imports = [line for line in block.splitlines() if line.startswith(("from ", "import "))]
    assert imports, "no imports in the README's LangChain snippet"
    return imports


@pytest.mark.slow
def test_langchain_extra_runs_the_readme_snippets_imports(dist: dict[str, Path], tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "lc")
    spec = f"{dist['wheel']}[langchain]"
    _run(
        [
            str(bin_dir / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "-c",
            str(REPO / "scripts/constraints.txt"),
            spec,
        ],
        cwd=tmp_path,
    )
    assert "torch" not in _installed(bin_dir)
    code = "\n".join(
        [
            *_readme_langchain_imports(),
            'reranker = LycheeRerank(target="127.0.0.1:1", top_n=4)',
            "print(type(reranker).__name__, ContextualCompressionRetriever.__name__)",
        ]
    )
    out = _run([str(bin_dir / "python"), "-c", code], cwd=tmp_path).stdout
    assert out.split() == ["LycheeRerank", "ContextualCompressionRetriever"]


@pytest.mark.slow
def test_server_extra_serves_from_the_installed_command(dist: dict[str, Path], tmp_path: Path) -> None:
    try:
        _server_install(dist, tmp_path)
    finally:  # several GB: do not leave it in pytest's kept temporary directories
        shutil.rmtree(tmp_path / "srv", ignore_errors=True)


def _server_install(dist: dict[str, Path], tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "srv")
    pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q"]
    t0 = time.monotonic()
    _run([*pip, *TORCH], cwd=tmp_path)  # as scripts/install.sh: this machine's torch, not a fresh download
    t1 = time.monotonic()
    _run([*pip, "-c", str(REPO / "scripts/constraints.txt"), f"{dist['wheel']}[server]"], cwd=tmp_path)
    t2 = time.monotonic()
    cli = str(bin_dir / "lychee-rerank")
    model = tmp_path / "tiny"
    _run([cli, "make-test-checkpoint", str(model)], cwd=tmp_path)
    with _serving(_tiny_server_cmd(bin_dir / "python", model), cwd=tmp_path) as ready:
        out = _run([cli, "info", "--target", f"127.0.0.1:{ready['port']}", "--json"], cwd=tmp_path).stdout
        assert json.loads(out)["device"] == "cpu"
    print(
        f"server venv: torch {t1 - t0:.0f} s, [server] {t2 - t1:.0f} s, serve {time.monotonic() - t2:.0f} s"
    )
