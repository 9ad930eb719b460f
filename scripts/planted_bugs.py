"""Plant the bugs of issue 16 one at a time in a temporary copy of the repository and show which
tests fail (the shared working tree is never touched).

    .venv/bin/python scripts/planted_bugs.py [--only NAME] [--json OUT]

Each bug is one exact text replacement in one file; the copy is restored after each run. A bug that
fails no test is reported as SURVIVED. Output: a Markdown table (for docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = [
    "tests/engine/test_golden.py",
    "tests/engine/test_check.py",
    "tests/engine/test_reference_independence.py",
    "tests/engine/test_probability.py",
    "tests/scheduler/test_ordering.py",
]

# name -> (file, old, new, what it is)
BUGS: dict[str, tuple[str, str, str, str]] = {
    "system-prompt-typo": (
        "server/lychee_server/domain.py",
        '"Judge whether the Document',
        '"Judges whether the Document',
        "a typo in the engine's system prompt",
    ),
    "max-pixels-not-applied": (
        "server/lychee_server/engine/loading.py",
        "    _set_pixel_bounds(processor, settings.min_pixels, settings.max_pixels)\n",
        "",
        "the configured min_pixels/max_pixels never reach the processor",
    ),
    "fallback-doc-positions-off-by-one": (
        "server/lychee_server/engine/qwen.py",
        "            images = all_images\n",
        "            images = all_images\n            pos = pos.copy()\n            pos[:, n_shared:] -= 1\n",
        "no-prefix-reuse fallback: positions after the prefix one too low",
    ),
    "fallback-start-at-1": (
        "server/lychee_server/engine/qwen.py",
        "                full, [i.grid for i in all_images], self.image_token_id, self.merge, 0\n",
        "                full, [i.grid for i in all_images], self.image_token_id, self.merge, 1\n",
        "no-prefix-reuse fallback: positions start at 1 (a uniform shift)",
    ),
    "sharpened-probability": (
        "server/lychee_server/engine/interface.py",
        "        return 1.0 / (1.0 + math.exp(-logit_diff))\n    e = math.exp(logit_diff)\n",
        "        return 1.0 / (1.0 + math.exp(-2 * logit_diff))\n    e = math.exp(2 * logit_diff)\n",
        "p(yes) = sigmoid(2 x) instead of sigmoid(x)",
    ),
    "nan-not-last": (
        "server/lychee_server/scheduler/core.py",
        "    return (True,) if math.isnan(score) else (False, -score)\n",
        "    return (False, -score)\n",
        "NaN scores not sorted last",
    ),
    "swapped-yes-no": (
        "server/lychee_server/engine/qwen.py",
        '        self.yes_id = int(tok.convert_tokens_to_ids("yes"))\n'
        '        self.no_id = int(tok.convert_tokens_to_ids("no"))\n',
        '        self.yes_id = int(tok.convert_tokens_to_ids("no"))\n'
        '        self.no_id = int(tok.convert_tokens_to_ids("yes"))\n',
        "yes/no ids swapped in the engine",
    ),
}


def copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    for rel in files:
        if "node_modules" in rel:
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run(copy: Path, tests: list[str]) -> tuple[int, list[str], float]:
    env = dict(os.environ, PYTHONPATH=f"{copy / 'server'}:{copy / 'client'}:{copy / 'tests'}")
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", *tests],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
    )
    failed = sorted(set(re.findall(r"^FAILED (\S+)", done.stdout, flags=re.M)))
    return done.returncode, failed, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.only or list(BUGS)
    results = []
    with tempfile.TemporaryDirectory(prefix="lychee-planted-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        where = subprocess.run(
            [sys.executable, "-c", "import lychee_server; print(lychee_server.__file__)"],
            cwd=copy,
            env=dict(os.environ, PYTHONPATH=str(copy / "server")),
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert where.startswith(str(copy)), f"the copy imports {where}"
        code, failed, secs = run(copy, TESTS)
        assert code == 0, f"tests fail before planting anything: {failed}"
        print(f"baseline: {' '.join(TESTS)} green in {secs:.0f} s", file=sys.stderr)
        for name in names:
            path, old, new, what = BUGS[name]
            target = copy / path
            original = target.read_text()
            assert original.count(old) == 1, f"{name}: the text to replace is not in {path} exactly once"
            target.write_text(original.replace(old, new))
            try:
                code, failed, secs = run(copy, TESTS)
            finally:
                target.write_text(original)
            results.append(
                {"bug": name, "what": what, "file": path, "failed": failed, "seconds": round(secs)}
            )
            print(f"{name}: {len(failed)} failing tests ({secs:.0f} s)", file=sys.stderr)
    print("| planted bug | file | failing tests |\n|---|---|---|")
    for r in results:
        shown = ", ".join(f"`{f.split('::', 1)[1] if '::' in f else f}`" for f in r["failed"][:6])
        more = f" (+{len(r['failed']) - 6} more)" if len(r["failed"]) > 6 else ""
        print(f"| {r['what']} (`{r['bug']}`) | `{r['file']}` | {shown or '**SURVIVED**'}{more} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
