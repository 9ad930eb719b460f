"""A real headless Chromium for the playground tests (a uniquely named module: ``conftest`` is not
imported).

The browser is Debian's ``chromium`` and ``chromium-driver`` (``scripts/install_browser.sh``, run
by ``.ci/run`` before the tests), driven by Selenium with both paths given explicitly, so
selenium-manager never runs and nothing is downloaded. Paths can be overridden with
``LYCHEE_CHROMIUM`` and ``LYCHEE_CHROMEDRIVER``.

Under ``CI=true`` a missing or broken browser fails the test (CI must run it); elsewhere the test
is skipped with the reason and the command that installs the browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import pytest

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
DRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
INSTALL_HINT = "install it with `sudo bash scripts/install_browser.sh` (Debian: chromium chromium-driver)"
WINDOW = (1280, 1080)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (the browser test must run there), skip with the reason elsewhere."""
    message = f"headless Chromium unavailable: {reason}; {INSTALL_HINT}"
    if in_ci():
        pytest.fail(message + " (CI=true: the browser test may not be skipped)", pytrace=False)
    pytest.skip(message)


def _find(env: str, candidates: tuple[str, ...], name: str) -> str:
    chosen = os.environ.get(env)
    if chosen:
        if not Path(chosen).is_file():
            unavailable(f"{env}={chosen} is not a file")
        return chosen
    for path in candidates:
        if Path(path).is_file():
            return path
    found = shutil.which(name)
    if found:
        return found
    unavailable(f"no {name} found (looked in {', '.join(candidates)} and PATH)")


def start_chromium(download_dir: Path | None = None) -> Any:
    """A headless Chromium WebDriver session (the caller quits it)."""
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
        from selenium.webdriver.chrome.service import Service
    except ImportError as err:  # pragma: no cover - selenium is in the dev extra
        unavailable(f"selenium is not installed ({err})")
    binary = _find("LYCHEE_CHROMIUM", CHROMIUM_CANDIDATES, "chromium")
    driver_path = _find("LYCHEE_CHROMEDRIVER", DRIVER_CANDIDATES, "chromedriver")
    os.environ.setdefault("SE_OFFLINE", "true")  # belt and braces: selenium-manager never fetches
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # containers run as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    if download_dir is not None:
        options.add_experimental_option(
            "prefs",
            {
                "download.default_directory": str(download_dir),
                "download.prompt_for_download": False,
                "safebrowsing.enabled": False,
            },
        )
    try:
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    except WebDriverException as err:
        unavailable(f"{binary} with {driver_path} did not start: {err.msg or err}")
    driver.set_script_timeout(60)
    if download_dir is not None:
        driver.execute_cdp_cmd(
            "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(download_dir)}
        )
    return driver
