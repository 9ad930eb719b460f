"""Generated evidence (issue #16): docs/benchmarks.md and docs/reliability.md are renderings of the
committed JSON in docs/data/, every JSON there carries its provenance, and the prose template holds
no typed number (scripts/render_docs.py)."""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "docs" / "data"


def _load_renderer() -> Any:
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "scripts" / "render_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["render_docs"] = module
    spec.loader.exec_module(module)
    return module


rd = _load_renderer()
DATA_FILES = sorted(DATA.rglob("*.json"))


# ------------------------------------------------------------------------------ (i) drift
@pytest.mark.parametrize("name", ["benchmarks", "reliability"])
def test_the_committed_doc_is_the_rendering_of_its_data(name: str) -> None:
    rendered = rd.RENDERERS[name](rd.Fmt())
    committed = rd.DOCS[name].read_text()
    assert committed == rendered, (
        f"docs/{name}.md differs from the rendering of docs/data/: run "
        f"`.venv/bin/python scripts/render_docs.py render {name}` (and never edit the doc by hand)"
    )


@pytest.mark.parametrize("name", ["benchmarks", "reliability"])
def test_a_hand_edited_number_fails_the_check(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = rd.RENDERERS[name](rd.Fmt())
    doc = tmp_path / f"{name}.md"
    monkeypatch.setitem(rd.DOCS, name, doc)
    doc.write_text(text)
    assert rd.main(["check", name]) == 0
    # Change one digit of the first table row that has one.
    row = next(line for line in text.splitlines() if line.startswith("| ") and re.search(r"\d", line))
    i = re.search(r"\d", row).start()  # type: ignore[union-attr]
    edited = row[:i] + str((int(row[i]) + 1) % 10) + row[i + 1 :]
    doc.write_text(text.replace(row, edited, 1))
    assert rd.main(["check", name]) == 1


# ------------------------------------------------------------------------------ (ii) provenance
def test_there_is_data_for_both_docs() -> None:
    assert any(p.is_relative_to(DATA / "benchmarks") for p in DATA_FILES)
    assert any(p.is_relative_to(DATA / "reliability") for p in DATA_FILES)


@pytest.mark.parametrize("path", DATA_FILES, ids=[str(p.relative_to(DATA)) for p in DATA_FILES])
def test_every_data_file_carries_its_provenance(path: Path) -> None:
    doc = json.loads(path.read_text())
    assert rd.missing_provenance(doc) == [], (
        f"{path}: add commit/date/machine/command (scripts/render_docs.py stamp)"
    )
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?", doc["commit"]) or doc["commit"] == rd.UNKNOWN_COMMIT, doc[
        "commit"
    ]
    when = dt.datetime.strptime(doc["date"], "%Y-%m-%dT%H:%M:%SZ")
    assert dt.datetime(2026, 1, 1) < when < dt.datetime.now() + dt.timedelta(days=1)
    assert re.fullmatch(r".+, (\d+|unknown) cores, .+", doc["machine"]), doc["machine"]  # CPU, cores, GPU


def test_missing_provenance_names_what_is_missing() -> None:
    assert rd.missing_provenance({"commit": "abc1234", "date": "", "machine": "m"}) == ["date", "command"]
    assert rd.missing_provenance([]) == list(rd.PROVENANCE_KEYS)
    assert rd.missing_provenance(rd.provenance("cmd")) == []


def test_the_commit_is_the_short_sha_marked_dirty_by_code_changes() -> None:
    commit = rd.git_commit()
    head = rd._git("rev-parse", "--short", "HEAD")
    assert commit in (head, head + "-dirty")
    assert commit.endswith("-dirty") == bool(rd._git("status", "--porcelain", "--", *rd.DIRTY_PATHS))


# ------------------------------------------------------------------------------ (iii) no typed numbers
@pytest.mark.parametrize("name", ["benchmarks", "reliability"])
def test_the_template_has_no_typed_numbers(name: str) -> None:
    template = rd.RENDERERS[name](rd.Fmt(sentinel=True))
    assert template.count(rd.SENTINEL) > 20  # the committed data is rendered, so values were interpolated
    assert rd.untyped_digits(template) == []


@pytest.mark.parametrize("name", ["benchmarks", "reliability"])
def test_without_data_the_doc_has_no_numbers_at_all(name: str, tmp_path: Path) -> None:
    """Nothing reaches the doc from anywhere but docs/data: with an empty data dir, even the real
    rendering holds no figure."""
    text = rd.RENDERERS[name](rd.Fmt(), tmp_path)
    assert rd.untyped_digits(text) == []
    assert rd.SENTINEL not in text


def test_the_digit_scan_reports_typed_numbers_and_allows_names() -> None:
    assert rd.untyped_digits("took 15 ms with `--repeats 3` on 2 cores (1.5x)") == ["15", "3", "2", "1.5x"]
    assert (
        rd.untyped_digits("p50 and p99 on an H100 in BF16, Qwen2.5-VL 7B, /v1/rerank, grpc/grpc#36066.") == []
    )
    assert rd.untyped_digits(f"{rd.SENTINEL} ms, x{rd.SENTINEL}") == []
    assert rd.untyped_digits("an H1000 or p51") == ["H1000", "p51"]


class _Leaky(rd.Fmt):  # type: ignore[misc, name-defined]
    """Formats one float for real in sentinel mode: a figure that bypassed the interpolation."""

    def __init__(self) -> None:
        super().__init__(sentinel=True)
        self.leaked = False

    def __call__(self, value: Any, spec: str = "") -> str:
        if not self.leaked and isinstance(value, float) and spec:
            self.leaked = True
            return str(format(value, spec))
        return str(super().__call__(value, spec))


@pytest.mark.parametrize("name", ["benchmarks", "reliability"])
def test_a_figure_that_bypasses_the_interpolation_is_caught(name: str) -> None:
    leaky = _Leaky()
    template = rd.RENDERERS[name](leaky)
    assert leaky.leaked
    assert rd.untyped_digits(template) != []


# ------------------------------------------------------------------------------ sections and producers
def _stamped_bench(tmp: Path, name: str) -> Path:
    d = tmp / "benchmarks"
    d.mkdir(exist_ok=True)
    src = json.loads((DATA / "benchmarks" / "cpu-tiny.json").read_text())
    src["report"]["machine"] = "NVIDIA H200"
    (d / "gpu").mkdir(exist_ok=True)
    path = d / "gpu" / name
    path.write_text(json.dumps(src))
    return d


def test_gpu_rows_render_when_gpu_data_is_there(tmp_path: Path) -> None:
    empty = rd.render_benchmarks(rd.Fmt(), tmp_path)
    assert "No GPU run yet" in empty and "scripts/gpu_check.sh OUTDIR" in empty
    data = _stamped_bench(tmp_path, "bench.json")
    text = rd.render_benchmarks(rd.Fmt(), data)
    assert "No GPU run yet" not in text
    assert "### NVIDIA H200" in text and "docs/data/benchmarks/gpu/bench.json" not in text  # a tmp dir
    gpu = text.split("## GPU, real shape")[1].split("## Arithmetic")[0]
    assert "| (b) " in gpu


def test_floors_data_matches_the_code() -> None:
    """floors.json is data computed from BUILTIN_SHAPES, the settings and the bench's image size:
    if any of them changes, the committed figures must be regenerated (scripts/benchmarks.sh floors)."""
    pytest.importorskip("transformers")
    committed = json.loads((DATA / "benchmarks" / "floors.json").read_text())["figures"]
    assert rd.compute_floors() == committed


def test_the_reliability_groups_are_those_the_script_runs() -> None:
    script = (REPO / "scripts" / "reliability.sh").read_text()
    found = {
        m.group(1): tuple(m.group(2).split())
        for m in re.finditer(r"^\s*(?:\S+=\S+ )?run_group (\w+) (.+)$", script, re.M)
    }
    assert found == rd.RELIABILITY_GROUPS


def _junit(cases: list[tuple[str, str]]) -> str:
    body = []
    for name, outcome in cases:
        inner = {
            "passed": "",
            "failed": "<failure message='boom'/>",
            "xfailed": "<skipped type='pytest.xfail' message='known'/>",
        }[outcome]
        body.append(f"<testcase classname='t' name='{name}'>{inner}</testcase>")
    return (
        "<testsuites><testsuite name='pytest' timestamp='2026-12-01T21:03:51.0+00:00'>"
        + "".join(body)
        + "</testsuite></testsuites>"
    )


def test_import_reliability_keeps_outcomes_and_provenance(tmp_path: Path) -> None:
    src, dst = tmp_path / "build", tmp_path / "data"
    src.mkdir()
    (src / "bad_inputs.xml").write_text(
        _junit(
            [
                ("test_catalogue_at_the_edge[a]", "passed"),
                ("test_catalogue_at_the_edge[b]", "failed"),
                ("test_catalogue_against_the_server[a]", "passed"),
            ]
        )
    )
    (src / "bad_inputs.rc").write_text("1\n")
    (src / "bad_inputs.cmd").write_text("python -m pytest tests/reliability/test_bad_inputs.py -q\n")
    shutil.copy(REPO / "docs" / "data" / "reliability" / "security.json", tmp_path / "sec.json")
    security = json.loads((tmp_path / "sec.json").read_text())["figures"]
    security["machine"] = {"cpu_model": "Test CPU", "cpus": 4, "gpu": False, "date": "2026-12-01T21:06:08Z"}
    (src / "security.json").write_text(json.dumps(security))
    (src / "security.xml").write_text(_junit([("test_x", "passed")]))

    prov = {
        "commit": "abc1234-dirty",
        "date": "2026-12-02T00:00:00Z",
        "machine": "M, 2 cores, no GPU",
        "command": "c",
    }
    written = rd.import_reliability(src, dst, prov)
    assert sorted(p.name for p in written) == ["bad_inputs.json", "security.json"]
    bad = json.loads((dst / "bad_inputs.json").read_text())
    assert (bad["commit"], bad["date"], bad["rc"]) == ("abc1234-dirty", "2026-12-02T00:00:00Z", 1)
    assert bad["command"] == "python -m pytest tests/reliability/test_bad_inputs.py -q"
    assert [c["outcome"] for c in bad["cases"]] == ["passed", "failed", "passed"]
    text = rd.render_reliability(rd.Fmt(), dst)
    assert "2 tried, 1 passed | **FAIL**" in text
    assert "**1 (failed)**" in text
    assert "**Not measured in this data:** fuzzing; load; faults; liveness." in text

    # Figures from before provenance was recorded: unknown commit, the tests' own date and machine.
    old = rd.import_reliability(src, tmp_path / "old", None)
    sec = json.loads(old[1].read_text())
    assert sec["commit"] == rd.UNKNOWN_COMMIT
    assert sec["date"] == "2026-12-01T21:06:08Z"
    assert sec["machine"] == "Test CPU, 4 cores, no GPU"
    assert json.loads(old[0].read_text())["date"] == "2026-12-01T21:03:51Z"  # the JUnit timestamp
    assert sec["command"].startswith("python -m pytest tests/reliability/test_security.py")


def test_stamp_wraps_a_report_with_its_provenance(tmp_path: Path) -> None:
    raw, prov, out = tmp_path / "raw.json", tmp_path / "prov.json", tmp_path / "out.json"
    raw.write_text(json.dumps({"rows": [], "machine": "CPU x2"}))
    prov.write_text(json.dumps(rd.provenance("bench --json raw.json")))
    assert rd.main(["stamp", str(raw), "--out", str(out), "--provenance", str(prov), "--note", "n"]) == 0
    doc = json.loads(out.read_text())
    assert doc["report"] == {"rows": [], "machine": "CPU x2"}
    assert doc["command"] == "bench --json raw.json" and doc["note"] == "n"
    assert rd.missing_provenance(doc) == []
