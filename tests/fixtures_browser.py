"""One headless Chromium per test session (Debian's package, driven by Playwright with its
executable path set: Playwright never downloads a browser here), and the folder screenshots are
kept in as test artefacts (``$TELEREAD_TEST_ARTIFACTS``, default ``test-artifacts/`` in the
checkout)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = [
    "--no-sandbox",  # the CI runs as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # the machine's closed network refuses Chromium's own calls
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",  # the critical alert's sound
]


def chromium_path() -> str:
    found = os.environ.get("TELEREAD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("Debian's chromium is not installed (apt-get install chromium); scripts/test.sh installs it")
    return found


@pytest.fixture(scope="session")
def playwright() -> Iterator[Any]:
    """One Playwright driver per test process (a second sync driver in one thread is refused)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        yield pw


def _launched(playwright: Any, flags: list[str]) -> Iterator[Any]:
    chromium = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=flags)
    try:
        yield chromium
    finally:
        chromium.close()


@pytest.fixture(scope="session")
def browser(playwright: Any) -> Iterator[Any]:
    yield from _launched(playwright, CHROMIUM_FLAGS)


# WebGL for the image viewer (OHIF's cornerstone renders with it): software GL, SwiftShader through
# ANGLE, since the test machine has no GPU (Chromium refuses WebGL under --disable-gpu).
GL_FLAGS = [f for f in CHROMIUM_FLAGS if f != "--disable-gpu"] + [
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
]


@pytest.fixture(scope="session")
def gl_browser(playwright: Any) -> Iterator[Any]:
    """A second headless Chromium with software WebGL, for the image viewer's tests."""
    yield from _launched(playwright, GL_FLAGS)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    root = Path(os.environ.get("TELEREAD_TEST_ARTIFACTS") or Path(__file__).resolve().parent.parent / "test-artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root
