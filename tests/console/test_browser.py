"""The console in a real headless Chromium: what operators see, live, and what they can do."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from selenium.common.exceptions import (
    NoAlertPresentException,
    NoSuchElementException,
    StaleElementReferenceException,
)
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from conveyor import submit
from tests.console.conftest import StartConsole
from tests.helpers import ConveyorProcess, scalar, wait_until

pytestmark = pytest.mark.timeout(240)

GATED = {"CONVEYOR_PIPELINE": "tests.console.pipelines:gated"}
REFERENCE_STAGES = ["analyze", "assemble", "answer"]
Start = Callable[..., ConveyorProcess]


def _wait(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 30) -> Any:
    # Live fragments replace elements under the test's feet: a stale one is just re-read.
    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
    ).until(condition)


# Reads of several elements are done in one script, so a live update cannot land in between.
def _attrs(driver: WebDriver, css: str, name: str) -> list[str | None]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map(e => e.getAttribute(arguments[1]));",
            css,
            name,
        )
    )


def _texts(driver: WebDriver, css: str) -> list[str]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText.trim());",
            css,
        )
    )


def _cells(driver: WebDriver, css: str) -> list[list[str]]:
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])]"
            ".map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()));",
            css,
        )
    )


def _text(driver: WebDriver, css: str) -> str:
    found = _texts(driver, css)
    return found[0] if found else ""


def _open_live(driver: WebDriver, url: str) -> None:
    """Open a page and wait until its event stream is connected; mark the window, so a test can
    prove later that no reload happened (a reload clears the mark)."""
    driver.get(url)
    _wait(
        driver,
        lambda d: d.find_element(By.ID, "live-state").get_attribute("data-state") == "open",
    )
    # A connected stream makes the page re-read once (changes since it was rendered): let that
    # land before the test looks at or clicks anything.
    _wait(driver, lambda d: int(d.find_element(By.ID, "live").get_attribute("data-version") or 0))
    driver.execute_script("window.conveyorTestMark = 'not reloaded';")


def _not_reloaded(driver: WebDriver) -> bool:
    return driver.execute_script("return window.conveyorTestMark") == "not reloaded"


def _submit(database_url: str, payload: dict[str, Any], pipeline: str = "agents") -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return str(submit(conn, payload, pipeline=pipeline).id)


def _status(database_url: str, run_id: str) -> str:
    return str(
        scalar(database_url, "SELECT status FROM conveyor.pipeline_runs WHERE id = %s", (run_id,))
    )


def _no_alert(driver: WebDriver) -> bool:
    try:
        _ = driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_overview_shows_the_reference_pipelines_stages_and_live_workers(
    browser: WebDriver, start_console: StartConsole, start_conveyor: Start
) -> None:
    start_conveyor("run")
    console = start_console()
    _open_live(browser, console.url + "/")
    stages = "section[data-pipeline='agents'] tr.stage"
    assert _attrs(browser, stages, "data-stage") == REFERENCE_STAGES
    assert _texts(browser, stages + " .flow") == [
        "NEW → ANALYZING → ANALYZED",
        "ANALYZED → ASSEMBLING → CONTEXT_READY",
        "CONTEXT_READY → ANSWERING → DONE",
    ]

    # The workers' heartbeats reach the page without a reload: one live worker per stage.
    summaries = "tr.stage td[data-col='workers'] summary"
    _wait(browser, lambda d: _texts(d, summaries) == ["1 live"] * 3)
    assert _not_reloaded(browser)


def test_a_run_submitted_while_the_page_is_open_appears_and_reaches_done(
    browser: WebDriver, start_console: StartConsole, start_conveyor: Start, database_url: str
) -> None:
    start_conveyor("run")
    console = start_console()
    _open_live(browser, console.url + "/runs")
    assert browser.find_elements(By.CSS_SELECTOR, "tr[data-run]") == []

    run_id = _submit(database_url, {"question": "What does the console show?"})

    def row_status(driver: WebDriver) -> str | None:
        found = _attrs(driver, f"tr[data-run='{run_id}']", "data-status")
        return found[0] if found else None

    _wait(browser, lambda d: row_status(d) is not None)  # it appears...
    _wait(browser, lambda d: row_status(d) == "DONE")  # ...and moves to DONE on the page
    assert _not_reloaded(browser)

    # The overview's latest runs show it too, updated the same way.
    _open_live(browser, console.url + "/")
    cell = f"section.latest tr[data-run='{run_id}'] .status"
    _wait(browser, lambda d: _text(d, cell) == "DONE")
    completed = "tr.stage[data-stage='answer'] td[data-col='completed']"
    _wait(browser, lambda d: _text(d, completed) == "1")


def test_run_page_shows_every_stages_output_the_history_and_the_timeline(
    browser: WebDriver, start_console: StartConsole, start_conveyor: Start, database_url: str
) -> None:
    start_conveyor("run", CONVEYOR_SWEEP_INTERVAL="0.5")
    console = start_console()
    # Due in 5 s: the page is open before the run moves, and follows it without a reload.
    with psycopg.connect(database_url, autocommit=True) as conn:
        run_id = str(submit(conn, {"question": "Where did the time go?"}, delay_seconds=5).id)
    _open_live(browser, f"{console.url}/runs/{run_id}")
    assert _text(browser, "#run-status") == "NEW"
    _wait(browser, lambda d: _text(d, "#run-status") == "DONE")
    _wait(browser, lambda d: len(_attrs(d, "#history tbody tr[data-to]", "data-to")) == 3)
    assert _not_reloaded(browser)

    assert _attrs(browser, "#outputs .output", "data-stage") == REFERENCE_STAGES
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT outputs FROM conveyor.pipeline_runs WHERE id = %s", (run_id,)
        ).fetchone()
    assert row is not None
    shown = [json.loads(text) for text in _texts(browser, "#outputs .output pre")]
    assert shown == [row[0][stage] for stage in REFERENCE_STAGES]
    assert json.loads(_text(browser, "#input")) == {"question": "Where did the time go?"}

    assert _attrs(browser, "#history tbody tr", "data-to") == ["ANALYZED", "CONTEXT_READY", "DONE"]
    history = _cells(browser, "#history tbody tr")
    for cells, stage in zip(history, REFERENCE_STAGES, strict=True):
        assert cells[1] == stage
        assert cells[4].startswith(f"{stage}-")  # the worker that did it
    assert _texts(browser, "#timeline table.timeline th") == [
        "analyze #1",
        "assemble #1",
        "answer #1",
    ]


def test_with_actions_on_a_failed_run_is_retried_from_the_page_to_done(
    browser: WebDriver,
    start_console: StartConsole,
    start_conveyor: Start,
    database_url: str,
    tmp_path: Path,
) -> None:
    gate = tmp_path / "gate"
    start_conveyor("run", **GATED)
    console = start_console("--allow-actions", **GATED)
    run_id = _submit(database_url, {"gate": str(gate)}, pipeline="gated")
    wait_until(lambda: _status(database_url, run_id) == "FAILED", 60, "the run to fail")

    _open_live(browser, f"{console.url}/runs/{run_id}")
    assert _text(browser, "#run-status") == "FAILED"
    assert "is closed" in _text(browser, "#last-error")
    gate.write_text("open")  # the cause is fixed; now the operator retries
    _wait(browser, lambda d: d.find_element(By.ID, "retry").click() or True)  # stale: again

    _wait(browser, lambda d: _text(d, "#run-status") == "DONE", 60)
    _wait(browser, lambda d: _attrs(d, "#history tbody tr", "data-to")[-1:] == ["DONE"])
    assert _status(database_url, run_id) == "DONE"
    transitions = [(cells[2], cells[4]) for cells in _cells(browser, "#history tbody tr")]
    assert ("FAILED → NEW", "console:anonymous") in transitions  # logged with who did it
    assert transitions[-1][0] == "CHECKED → DONE"
    assert '"action": "retry"' in console.process.log()


def test_with_actions_off_there_is_no_button_and_a_forged_post_is_refused(
    browser: WebDriver,
    start_console: StartConsole,
    start_conveyor: Start,
    database_url: str,
    tmp_path: Path,
) -> None:
    start_conveyor("run", **GATED)
    console = start_console(**GATED)
    run_id = _submit(database_url, {"gate": str(tmp_path / "never")}, pipeline="gated")
    wait_until(lambda: _status(database_url, run_id) == "FAILED", 60, "the run to fail")

    _open_live(browser, f"{console.url}/runs/{run_id}")
    assert _text(browser, "#run-status") == "FAILED"
    assert browser.find_elements(By.CSS_SELECTOR, "form[method='post']") == []
    assert browser.find_elements(By.TAG_NAME, "button") == []
    assert browser.find_element(By.CSS_SELECTOR, "header .mode").text == "read-only"

    # A POST forged from the page itself (same origin, as a script injected there would send).
    status = browser.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const body = new URLSearchParams({csrf_token: "forged", stage: "check"});
        fetch(arguments[0], {method: "POST", body: body}).then(r => done(r.status));
        """,
        f"/runs/{run_id}/retry",
    )
    assert status == 403
    browser.get(f"{console.url}/runs")  # bulk forms are absent too
    assert browser.find_elements(By.CSS_SELECTOR, "form[method='post']") == []
    assert _status(database_url, run_id) == "FAILED"


def test_a_script_in_a_runs_input_renders_as_text(
    browser: WebDriver, start_console: StartConsole, start_conveyor: Start, database_url: str
) -> None:
    payload = "<script>alert(1)</script>"
    start_conveyor("run")
    console = start_console()
    run_id = _submit(database_url, {"question": payload})
    wait_until(lambda: _status(database_url, run_id) == "DONE", 60, "the run to finish")

    for path in ("/", "/runs", f"/runs?key={payload}", f"/runs/{run_id}"):
        browser.get(console.url + path)
        _wait(browser, lambda d: d.find_element(By.TAG_NAME, "main").is_displayed())
        assert _no_alert(browser), path
        scripts = browser.find_elements(By.XPATH, "//script[contains(., 'alert')]")
        assert scripts == [], path
        if path != f"/runs?key={payload}":
            # Shown as the very characters that were submitted.
            assert payload in browser.find_element(By.TAG_NAME, "main").text, path
    # An output that quotes the input is escaped as well (the offline answerer does not quote
    # the question, so the answer is given one that does).
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE conveyor.pipeline_runs SET outputs = jsonb_set(outputs, '{answer,answer}',"
            " to_jsonb(%s::text)) WHERE id = %s",
            (f"You asked: {payload}", run_id),
        )
    browser.get(f"{console.url}/runs/{run_id}")
    _wait(browser, lambda d: d.find_element(By.TAG_NAME, "main").is_displayed())
    assert payload in _text(browser, "#outputs .output[data-stage='answer'] pre")
    assert browser.find_elements(By.XPATH, "//script[contains(., 'alert')]") == []
    assert _no_alert(browser)


def test_a_parents_page_follows_its_children_live(
    browser: WebDriver, start_console: StartConsole, database_url: str
) -> None:
    fan_out = {"waiting": "SPLIT_WAITING", "join": "SPLIT", "fail_fast": True, "first": 0}
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO conveyor.pipeline_runs (pipeline, status, input, children_pending,"
            " fan_out) VALUES ('fan', 'SPLIT_WAITING', '{}', 2, %s) RETURNING id",
            (json.dumps({**fan_out, "width": 2}),),
        ).fetchone()
        assert row is not None
        parent = str(row[0])
        # Numbered and counted here, as the engine's fan_out statement does (conveyor.fan_out).
        children = [
            str(child[0])
            for child in conn.execute(
                "WITH engine AS (SELECT set_config('conveyor.fan_out', 'on', true))"
                " INSERT INTO conveyor.pipeline_runs (pipeline, status, input, parent_id,"
                " child_index) SELECT 'fan', 'PART', '{}', %s, n"
                " FROM generate_series(0, 1) n, engine ORDER BY n RETURNING id",
                (parent,),
            ).fetchall()
        ]
    console = start_console()
    _open_live(browser, f"{console.url}/runs/{parent}")
    assert _attrs(browser, "#children tr[data-child]", "data-status") == ["PART", "PART"]

    # The parent's own row does not change: the page re-reads for a child it lists.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE conveyor.pipeline_runs SET status = 'SQUARING' WHERE id = %s", (children[1],)
        )
    rows = "#children tr[data-child]"
    _wait(browser, lambda d: _attrs(d, rows, "data-status") == ["PART", "SQUARING"])
    assert _not_reloaded(browser)
    assert "waiting for 2" in _text(browser, "#children-summary")

    browser.find_element(By.CSS_SELECTOR, f"#children a[href='/runs/{children[1]}']").click()
    _wait(browser, lambda d: _text(d, "#run-status") == "SQUARING")
    assert _text(browser, "#parent").startswith("child 1 of")
