"""Headless Chromium for the browser tests (imported by tests/test_pages.py and
tests/test_jupyterlab.py, not a conftest).

The browser is Debian's ``chromium`` package (``apt-get install chromium``), driven by playwright
through ``executable_path``: no browser is ever downloaded (never ``playwright install``). Without
chromium or playwright the tests skip with the reason, except where ``EXO_LAB_REQUIRE_BROWSER=1``
(CI sets it in .ci/run): there a missing browser is a failure.

Chromium resolves no host name but 127.0.0.1 (``--host-resolver-rules``), so a page that tried
to load anything from elsewhere would fail loudly instead of reaching out.
"""
from __future__ import annotations

import os
import shutil

import psutil
import pytest

from exo_lab import lifeline

REQUIRE_ENV = "EXO_LAB_REQUIRE_BROWSER"
CHROMIUM_NAMES = ("chromium", "chromium-browser")
LAUNCH_ARGS = [
    "--no-sandbox",                       # CI runs as root, where the sandbox cannot start
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-domain-reliability",
    "--disable-sync",
    "--no-first-run",
]
# The key dialog's first request is answered 401 on purpose; Chromium logs that as an error.
EXPECTED_CONSOLE = ("the server responded with a status of 401",)


def chromium_path() -> str | None:
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_browser() -> str:
    """Chromium's path and playwright; skips (or fails under EXO_LAB_REQUIRE_BROWSER=1) without them."""
    problems = []
    path = chromium_path()
    if path is None:
        problems.append("no chromium on PATH (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problems.append("playwright is not installed (pip install -e '.[test]')")
    if problems:
        reason = "browser tests need Debian's chromium and playwright: " + "; ".join(problems)
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_ENV}=1 says they must run here)", pytrace=False)
        pytest.skip(reason)
    return path


def descendants() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def end_processes(pids, timeout_s: float = 10.0) -> None:
    """SIGTERM each live pid, then SIGKILL whatever is left after ``timeout_s``."""
    processes = []
    for pid in pids:
        try:
            processes.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    lifeline.end_processes(processes, timeout_s)


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium per test module; it and playwright's driver are ended by pid
    whatever happens."""
    path = require_browser()
    from playwright.sync_api import sync_playwright

    before = descendants()
    manager = sync_playwright().start()
    try:
        launched = manager.chromium.launch(executable_path=path, args=LAUNCH_ARGS)
        try:
            yield launched
        finally:
            launched.close()
    finally:
        started = descendants() - before
        manager.stop()
        end_processes(started & descendants())


class ConsoleLog:
    """Every console message and uncaught exception of a page; ``errors()`` are the unexpected ones."""

    def __init__(self, page):
        self.messages: list[tuple[str, str]] = []
        page.on("console", lambda message: self.messages.append((message.type, message.text)))
        page.on("pageerror", lambda error: self.messages.append(("pageerror", str(error))))

    def errors(self) -> list[tuple[str, str]]:
        return [(kind, text) for kind, text in self.messages
                if kind in ("error", "pageerror") and not any(ok in text for ok in EXPECTED_CONSOLE)]

