"""A real browser for the console's tests: Debian's Chromium (installed by `make server-deps`), driven by
Playwright for Python. Screenshots go to test-artifacts/console/ (kept after the run, as CI artifacts)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.support import REPO

ARTIFACTS = REPO / "test-artifacts" / "console"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:  # never skipped: CI installs it, and a console test that silently skips tests nothing
        raise RuntimeError("Chromium is not installed: run `make server-deps` (Debian package chromium)")
    return found


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def screenshot():
    """screenshot(page, name): the whole page, saved under test-artifacts/console/NAME.png."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(page, name: str, full_page: bool = True) -> Path:
        path = ARTIFACTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        return path

    return take
