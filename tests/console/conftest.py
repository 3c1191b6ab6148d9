"""The console under test: `conveyor console` as a real process on a loopback port, and a real
headless Chromium driven by Selenium (Debian's chromium and chromium-driver; never a download)."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ConveyorProcess, conveyor_env, wait_until
from tests.integration.conftest import start_conveyor

__all__ = ["start_conveyor"]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


@dataclass
class Console:
    process: ConveyorProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode()


StartConsole = Callable[..., Console]


@pytest.fixture
def start_console(database_url: str, tmp_path: Path) -> Iterator[StartConsole]:
    """Start `conveyor console ARGS` on an ephemeral loopback port; stopped at teardown."""
    started: list[ConveyorProcess] = []

    def start(*args: str, **env: str) -> Console:
        process = ConveyorProcess(
            ["console", "--bind", "127.0.0.1:0", *args],
            conveyor_env(database_url, **env),
            tmp_path / f"console-{len(started)}.log",
        )
        started.append(process)

        def port() -> int | None:
            if process.process.poll() is not None:
                raise AssertionError(f"console exited:\n{process.log()}")
            for line in process.log().splitlines():
                if '"console listening"' in line:
                    return int(json.loads(line)["port"])
            return None

        console = Console(process, wait_until(port, 30, "the console's port in its log"))
        wait_until(lambda: console.get("/healthz")[0] == 200, 30, "the console to answer")
        return console

    yield start
    for process in started:
        process.stop(timeout=30)


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        message = (
            f"headless Chromium is missing ({', '.join(missing)}): "
            "apt-get install -y chromium chromium-driver"
        )
        pytest.fail(message)  # `make test` installs it: its absence is a failure, never a skip
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    # Selenium Manager must never look for (or download) a browser or driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setenv("SE_AVOID_STATS", "true")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
