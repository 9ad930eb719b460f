"""The playground page in a real headless Chromium against a real server on the tiny checkpoint.

One run through the page: 23 generated images (PNG, JPEG, WebP, a GIF and a BMP converted in the
browser, one photo-sized JPEG that the browser downscales under ``max_pixels``), 3 text files, 2
pasted passages, a corrupt PNG and a PDF, a text query, Rank pressed from the keyboard. The test
watches the progress bar through a MutationObserver it installs, records the bodies the page
POSTs (wrapping ``fetch``), and checks that the grid's order is the ranking ``/v1/rerank`` gives
for the very bytes the page sent, that the corrupt file and the PDF are reported by name while the
rest is ranked, that the enlarged view opens and Esc closes it, that the threshold slider hides
low scores, and that the downloaded JSON and CSV parse.

Screenshots (mid-run and finished) go to the test's temporary folder, or to
``LYCHEE_PLAYGROUND_SCREENSHOTS`` when set (``docs/images`` refreshes the README's)::

    LYCHEE_PLAYGROUND_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/playground
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

MAX_PIXELS = 16 * 28 * 28  # TINY_ENV's LYCHEE_MAX_PIXELS
EVENT_DELAY_MS = 150
"""The page reads the progress stream one event per this many ms (a slow network, simulated by the
test's fetch wrapper), so a screenshot can be taken while the bar is part-way."""

INSTRUMENT = (Path(__file__).parent / "instrument.js").read_text(encoding="utf-8")


def _wait(what: str, check: Callable[[], Any], timeout: float = 60.0, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def _screenshot_dir(tmp_path: Path) -> Path:
    chosen = os.environ.get("LYCHEE_PLAYGROUND_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _shoot(driver: Any, path: Path, scroll_to: str) -> None:
    driver.execute_script(
        "document.querySelector(arguments[0]).scrollIntoView({block: 'start'}); window.scrollBy(0, -12);",
        scroll_to,
    )
    assert driver.save_screenshot(str(path)), path
    with Image.open(path) as shot:
        assert shot.size[0] >= 1000


def _corpus(root: Path) -> tuple[list[Path], list[str]]:
    """Files for the page (in the order they are picked) and the pasted passages."""
    folder = root / "photos"
    folder.mkdir()
    files: list[Path] = []
    palette = [
        (200, 40, 40), (40, 160, 60), (40, 70, 200), (230, 190, 30), (120, 40, 160), (20, 150, 160),
        (240, 120, 30), (90, 90, 90), (250, 250, 250), (10, 10, 10), (170, 110, 60), (60, 200, 200),
    ]  # fmt: skip
    for i in range(20):
        bg = palette[i % len(palette)]
        fg = palette[(i * 5 + 3) % len(palette)]
        image = Image.new("RGB", (112, 84), bg)
        draw = ImageDraw.Draw(image)
        if i % 3 == 0:
            draw.ellipse((14 + i, 10, 70 + i, 74), fill=fg)
        elif i % 3 == 1:
            draw.rectangle((8, 8 + i, 100, 40 + i), fill=fg)
        else:
            draw.polygon([(56, 6), (8 + i, 78), (104 - i, 78)], fill=fg)
        suffix, fmt = [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")][i % 3]
        path = folder / f"photo-{i:02d}{suffix}"
        image.save(path, fmt, **({"quality": 90} if fmt != "PNG" else {}))
        files.append(path)
    gif = folder / "sticker.gif"
    sticker = Image.new("RGB", (80, 60), (250, 200, 40))
    ImageDraw.Draw(sticker).ellipse((20, 10, 60, 50), fill=(200, 30, 120))
    sticker.convert("P", palette=Image.Palette.ADAPTIVE).save(gif, "GIF")
    bmp = folder / "scan.bmp"
    Image.new("RGB", (90, 70), (30, 90, 200)).save(bmp, "BMP")
    big = folder / "camera.jpg"
    photo = Image.new("RGB", (640, 480), (200, 60, 40))
    ImageDraw.Draw(photo).ellipse((160, 80, 480, 400), fill=(40, 60, 200))
    photo.save(big, "JPEG", quality=90)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00not really a png" * 20)
    pdf = folder / "manual.pdf"
    pdf.write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    texts = [
        ("refunds.txt", "Travel expenses are refunded within 30 days.\nKeep every receipt."),
        ("holidays.md", "# Holidays\n\nThe office closes on public holidays.\n\n- New Year\n- Labour Day"),
        ("menu.txt", "The cafeteria serves soup, salads and a red circle of pizza."),
    ]
    for name, body in texts:
        (folder / name).write_text(body, encoding="utf-8")
    files += [gif, bmp, big, broken, pdf] + [folder / name for name, _ in texts]
    passages = ["A red circle on a blue background.", "Quarterly report:\nrevenue grew by 4 %."]
    return files, passages


def _cards(driver: Any) -> list[dict[str, Any]]:
    return list(
        driver.execute_script(
            """return Array.from(document.querySelectorAll('#grid > li')).map((li) => ({
                 name: li.dataset.name, score: Number(li.dataset.score), rank: Number(li.dataset.rank),
                 hidden: li.hidden, kind: li.classList.contains('card-image') ? 'image' : 'text',
                 img: li.querySelector('img') ? li.querySelector('img').naturalWidth : null,
                 text: (li.querySelector('.card-snippet') || {}).textContent || null}));"""
        )
    )


def _rerank(base_url: str, body: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url}/v1/rerank", data=body.encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def _decoded(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_playground_ranks_files_with_progress(
    browser: Any, base_url: str, tmp_path: Path, downloads: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    shots = _screenshot_dir(tmp_path)
    files, passages = _corpus(tmp_path)
    driver = browser
    driver.get(base_url + "/")
    line = _wait(
        "the server line", lambda: "random weights" in driver.find_element(By.ID, "server-line").text
    )
    assert line
    assert driver.find_element(By.ID, "instruction").get_attribute("value") == (
        "Given a web search query, retrieve relevant passages that answer the query"
    )
    driver.execute_script(INSTRUMENT, EVENT_DELAY_MS)

    driver.find_element(By.ID, "query-text").send_keys("a red circle on a blue background")
    driver.find_element(By.ID, "doc-files").send_keys("\n".join(str(p) for p in files))
    _wait("the file list", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#file-list li")) == len(files))
    assert "24 images, 3 text files" in driver.find_element(By.ID, "file-count").text  # one is broken
    driver.find_element(By.ID, "passages").send_keys("\n\n".join(passages))
    listed = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#file-list .file-name")]
    assert listed == [p.name for p in files]

    driver.find_element(By.ID, "rank").send_keys(Keys.ENTER)  # the keyboard presses Rank

    sent_docs = len(files) - 2 + len(passages)  # all but the broken PNG and the PDF

    def mid_run() -> bool:  # the retry (without broken.png), a third of the way or more
        values = driver.execute_script("return window.__pg.values")
        return bool(values and values[-1][1] == sent_docs and sent_docs / 3 <= values[-1][0] < sent_docs)

    _wait("the bar part-way through the retried run", mid_run, timeout=60, every=0.02)
    _shoot(driver, shots / "playground-running.png", "#docs-drop")
    _wait("the grid", lambda: driver.find_elements(By.CSS_SELECTOR, "#grid > li"), timeout=90)
    assert not driver.find_element(By.ID, "run-error").is_displayed()

    # -- progress: a real bar, moving through intermediate values, ending full
    values = driver.execute_script("return window.__pg.values")
    final = [v for v in values if v[1] == sent_docs]
    nows = [v[0] for v in final]
    assert nows == sorted(nows), f"the bar went backwards: {nows}"
    assert nows[-1] == sent_docs
    intermediate = sorted({n for n in nows if 0 < n < sent_docs})
    assert len(intermediate) >= 3, f"too few intermediate values: {nows}"
    assert any("Scoring:" in v[2] for v in final), [v[2] for v in final]
    bar = driver.find_element(By.ID, "progress")
    assert bar.get_attribute("aria-valuenow") == bar.get_attribute("aria-valuemax") == str(sent_docs)

    # -- bad files reported by name, the rest ranked
    problems = {
        li.find_element(By.CLASS_NAME, "problem-name").text: li.find_element(
            By.CLASS_NAME, "problem-reason"
        ).text
        for li in driver.find_elements(By.CSS_SELECTOR, "#problem-list li")
    }
    assert set(problems) == {"broken.png", "manual.pdf"}, problems
    assert "IMAGE_DECODE_FAILED" in problems["broken.png"]
    assert "documents[" not in problems["broken.png"]
    assert "unsupported" in problems["manual.pdf"]

    # -- what the page sent: the server's route, sizes within max_pixels, conversions
    bodies = driver.execute_script("return window.__pg.bodies")
    assert all(b["url"].endswith("/v1/rerank/progress") for b in bodies), [b["url"] for b in bodies]
    assert len(bodies) == 2  # the first names broken.png, the retry leaves it out
    final_body = json.loads(bodies[-1]["body"])
    first_body = json.loads(bodies[0]["body"])
    assert len(first_body["documents"]) == sent_docs + 1
    assert len(final_body["documents"]) == sent_docs
    sent_names = [p.name for p in files if p.name not in problems] + [
        f"passage {i + 1}" for i in range(len(passages))
    ]
    by_name = dict(zip(sent_names, final_body["documents"], strict=True))
    for path in files:
        if path.name in problems:
            continue
        doc = by_name[path.name]
        if path.suffix in {".txt", ".md"}:
            assert doc == {"text": path.read_text(encoding="utf-8")}
            continue
        image = _decoded(doc["image"])
        assert image.width * image.height <= MAX_PIXELS
        if path.name == "camera.jpg":
            assert image.format == "JPEG" and abs(image.width / image.height - 640 / 480) < 0.02
        elif path.suffix in {".gif", ".bmp"}:
            assert image.format == "PNG"
        else:
            assert base64.b64decode(doc["image"]) == path.read_bytes()  # sent as is
    assert by_name["passage 2"] == {"text": passages[1]}

    # -- the grid is the API's ranking of the same bytes
    cards = _cards(driver)
    api = _rerank(base_url, bodies[-1]["body"])
    api_names = [sent_names[r["index"]] for r in api["results"]]
    assert [c["name"] for c in cards] == api_names
    for card, result in zip(cards, api["results"], strict=True):
        assert card["score"] == pytest.approx(result["relevance_score"], abs=1e-6)
    assert [c["rank"] for c in cards] == list(range(1, len(cards) + 1))
    assert all(c["img"] and c["img"] > 0 for c in cards if c["kind"] == "image")  # thumbnails decoded
    menu = next(c for c in cards if c["name"] == "menu.txt")
    assert menu["kind"] == "text" and menu["text"].startswith("The cafeteria serves soup")

    _shoot(driver, shots / "playground-done.png", "#run")

    # -- every control has a label (or its own text), every image a text alternative
    unlabelled = driver.execute_script(
        """return Array.from(document.querySelectorAll('input, select, textarea, button'))
             .filter((e) => e.getAttribute('aria-hidden') !== 'true' && !(e.labels && e.labels.length)
                            && !e.getAttribute('aria-label') && !e.textContent.trim())
             .map((e) => e.id || e.outerHTML.slice(0, 80));"""
    )
    assert unlabelled == []
    assert (
        driver.execute_script("return Array.from(document.images).filter((i) => i.src && !i.alt).length") == 0
    )

    # -- click to enlarge; Esc closes and gives the focus back
    first = driver.find_element(By.CSS_SELECTOR, "#grid > li:first-child .card-open")
    first.click()
    viewer = driver.find_element(By.ID, "viewer")
    _wait("the viewer", lambda: viewer.get_attribute("open") is not None, timeout=5)
    assert cards[0]["name"] in driver.find_element(By.ID, "viewer-title").text
    driver.switch_to.active_element.send_keys(Keys.ESCAPE)
    _wait("the viewer to close", lambda: viewer.get_attribute("open") is None, timeout=5)
    assert driver.switch_to.active_element == first

    # -- the threshold slider hides the scores under it
    scores = sorted(c["score"] for c in cards)
    threshold = round(scores[len(scores) // 2], 2)
    driver.execute_script(
        "const s = document.getElementById('threshold'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));",
        threshold,
    )
    visible = [c for c in _cards(driver) if not c["hidden"]]
    assert len(visible) == sum(1 for s in scores if s >= threshold)
    assert 0 < len(visible) < len(cards)
    assert f"showing {len(visible)} of {len(cards)}" in driver.find_element(By.ID, "shown-count").text

    # -- downloads: JSON (a real download, and the page's Blob URL) and CSV parse
    driver.find_element(By.ID, "download-json").click()
    saved = _wait(
        "the downloaded JSON", lambda: next(downloads.glob("lychee-ranking*.json"), None), timeout=20
    )
    _wait("the download to finish", lambda: not list(downloads.glob("*.crdownload")), timeout=20)
    record = json.loads(saved.read_text(encoding="utf-8"))
    fetch_blob = (
        "const done = arguments[arguments.length - 1];"
        "fetch(document.getElementById(arguments[0]).href)"
        ".then((r) => r.text()).then(done, (e) => done('ERR ' + e));"
    )
    assert json.loads(driver.execute_async_script(fetch_blob, "download-json")) == record
    assert [r["name"] for r in record["results"]] == api_names
    assert [r["rank"] for r in record["results"]] == list(range(1, len(api_names) + 1))
    assert {p["name"] for p in record["not_ranked"]} == {"broken.png", "manual.pdf"}
    assert record["query"] == {"text": "a red circle on a blue background", "image": None}
    assert record["random_weights"] is True
    rows = list(csv.reader(io.StringIO(driver.execute_async_script(fetch_blob, "download-csv"))))
    assert rows[0] == ["rank", "score", "name", "kind"]
    assert [r[2] for r in rows[1:]] == api_names


def test_playground_with_a_token_and_a_query_image(
    tiny_checkpoint: Path, browser: Any, tmp_path: Path
) -> None:
    """A server with keys: the page says it needs the token; with the token (kept in
    sessionStorage, not localStorage) it ranks pasted passages against a query image, top_n
    applied."""
    from http_door.http_support import TINY_ENV, http_url
    from selenium.webdriver.common.by import By

    from harness import subprocess_server

    query_image = tmp_path / "query.png"
    Image.new("RGB", (300, 200), (220, 30, 30)).save(query_image)
    env = {**TINY_ENV, "LYCHEE_API_KEYS": json.dumps(["pg-secret"])}
    with subprocess_server(tiny_checkpoint, env=env) as srv:
        driver = browser
        driver.get(http_url(srv) + "/")
        driver.execute_script("sessionStorage.clear()")
        driver.refresh()
        _wait(
            "the token hint", lambda: "needs an API token" in driver.find_element(By.ID, "server-line").text
        )
        driver.find_element(By.ID, "passages").send_keys("red things\n\nblue things\n\ngreen things")
        driver.find_element(By.ID, "query-file").send_keys(str(query_image))
        _wait("the query preview", lambda: driver.find_element(By.ID, "query-preview").is_displayed())
        driver.find_element(By.ID, "rank").click()
        error = _wait("the error", lambda: driver.find_element(By.ID, "run-error").text)
        assert "API token" in error
        driver.find_element(By.ID, "token").send_keys("pg-secret")
        _wait("the model line", lambda: "random weights" in driver.find_element(By.ID, "server-line").text)
        assert driver.execute_script("return sessionStorage.getItem('lychee-rerank-token')") == "pg-secret"
        assert driver.execute_script("return localStorage.length") == 0
        driver.find_element(By.ID, "top-n").send_keys("2")
        driver.find_element(By.ID, "rank").click()
        _wait("two cards", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#grid > li")) == 2)
        assert not driver.find_element(By.ID, "run-error").is_displayed()
        assert {c["name"] for c in _cards(driver)} <= {"passage 1", "passage 2", "passage 3"}
        driver.refresh()  # the token survives a reload of the tab
        assert driver.find_element(By.ID, "token").get_attribute("value") == "pg-secret"
