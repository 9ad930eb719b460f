"""``lychee-rerank rank ... --html`` through the real CLI and a real server, opened in the same
headless Chromium: the grid shows every ranked file in the order ``--json`` prints, thumbnails are
embedded and decode, nothing is fetched, the enlarged view opens and Esc closes it, and the file
the server refused is listed by name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from harness import SubprocessServer


def _folder(root: Path) -> Path:
    folder = root / "shots"
    (folder / "nested").mkdir(parents=True)
    for i, colour in enumerate([(200, 30, 30), (30, 160, 60), (30, 60, 200), (220, 180, 20), (120, 30, 150)]):
        image = Image.new("RGB", (120 + 20 * i, 90), colour)
        ImageDraw.Draw(image).ellipse(
            (10, 10, 70, 70), fill=(255 - colour[0], 255 - colour[1], 255 - colour[2])
        )
        image.save(folder / (f"shot-{i}.png" if i % 2 == 0 else f"shot-{i}.jpg"))
    Image.new("RGBA", (900, 600), (0, 120, 255, 128)).save(folder / "nested" / "wide.png")  # thumbnailed
    (folder / "nested" / "notes.md").write_text("# Login error\n\nThe dialog says <b>denied</b> & exits.\n")
    (folder / "readme.txt").write_text("Press Reset to clear the login error.")
    (folder / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)  # refused by the server
    return folder


def test_rank_html_report_opens_and_shows_the_grid(
    served: SubprocessServer, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    folder = _folder(tmp_path)
    report = tmp_path / "out" / "report.html"
    report.parent.mkdir()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "lychee_server.cli", "rank", str(folder)),
            *("--query", "the login error dialog", "--target", served.address),
            *("--skip-bad", "--json", "--html", str(report)),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {report}" in proc.stderr
    rows = json.loads(proc.stdout)
    expected = [Path(r["path"]).relative_to(folder).as_posix() for r in rows]
    assert len(expected) == 8 and "cut.png" not in expected

    driver = browser
    driver.get(report.as_uri())
    cards: list[dict[str, Any]] = driver.execute_script(
        """return Array.from(document.querySelectorAll('#grid > li')).map((li) => {
             const img = li.querySelector('img');
             return {name: li.dataset.name, score: Number(li.dataset.score), rank: li.dataset.rank,
                     src: img ? img.getAttribute('src').slice(0, 22) : null,
                     width: img ? img.naturalWidth : null, shown: li.querySelector('.score-num').textContent,
                     snippet: (li.querySelector('.card-snippet') || {}).textContent || null};
           });"""
    )
    assert [c["name"] for c in cards] == expected
    assert [c["rank"] for c in cards] == [str(i) for i in range(1, len(rows) + 1)]
    for card, row in zip(cards, rows, strict=True):
        assert card["score"] == row["score"]
        assert card["shown"] == f"{row['score']:.4f}"
        if card["name"].endswith((".png", ".jpg")):
            assert card["src"] in ("data:image/jpeg;base64", "data:image/png;base64,"), card
            assert 0 < card["width"] <= 480
        else:
            assert card["snippet"]
    notes = next(c for c in cards if c["name"] == "nested/notes.md")
    assert "<b>denied</b> & exits." in notes["snippet"]  # shown as text, not markup
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0
    assert "random weights" in driver.find_element(By.CSS_SELECTOR, ".report-head").text
    problems = driver.find_element(By.ID, "h-problems").find_element(By.XPATH, "..").text
    assert "cut.png" in problems

    first = driver.find_element(By.CSS_SELECTOR, "#grid > li:first-child .card-open")
    first.send_keys(Keys.ENTER)  # keyboard opens the enlarged view
    viewer = driver.find_element(By.ID, "viewer")
    assert viewer.get_attribute("open") is not None
    assert expected[0] in driver.find_element(By.ID, "viewer-title").text
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    assert viewer.get_attribute("open") is None
    assert driver.switch_to.active_element == first

    driver.execute_script(
        "const s = document.getElementById('threshold'); s.value = '1';"
        "s.dispatchEvent(new Event('input', {bubbles: true}));"
    )
    assert driver.find_element(By.ID, "shown-count").text == f"showing 0 of {len(rows)}"
