"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a study a real worker runs."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import front_spec, tiny_spec
from tests.procs import Stack

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHARTS = ("history", "curves", "scatter", "slice", "importances", "parallel")


@pytest.fixture
def browser() -> Iterator:  # type: ignore[type-arg]
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):  # make test installs it; run directly, say how (never a silent skip)
        pytest.fail("the dashboard's browser tests need Debian's chromium: apt-get install chromium (make test "
                    "installs it when run as root)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def live_stack(sqlite_url: str, tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(sqlite_url, tmp_path, KDSEARCH_ENGINE="tests.sleep_engine:SleepEngine",
                  KDSEARCH_TEST_EPOCH_S="0.6", KDSEARCH_POLL_INTERVAL="0.1")
    stack.start_api()
    yield stack
    stack.stop()


def shot(page, path: Path) -> None:  # type: ignore[no-untyped-def]
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CI"):
        print(f"screenshot: {path}")


def test_study_page_is_live(browser, live_stack: Stack, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    live_stack.submit(tiny_spec(tiny_assets, name="live", n_trials=6,
                                search_space={"num_train_epochs": 3, "learning_rate": {"low": 1e-4, "high": 1e-2,
                                                                                       "log": True}}))
    live_stack.start_worker()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(f"{live_stack.url}/studies/live")

    page.wait_for_function("document.querySelectorAll('#trials tbody tr').length >= 1", timeout=60_000)
    first = page.locator("#trials tbody tr").count()
    # A new trial shows up without a reload.
    page.wait_for_function(f"document.querySelectorAll('#trials tbody tr').length > {first}", timeout=60_000)
    shot(page, tmp_path / "study-running.png")

    live_stack.wait_status("live")
    page.wait_for_function("document.querySelector('#status').textContent.includes('finished')", timeout=30_000)
    page.wait_for_function("document.querySelectorAll('#trials tbody tr').length === 6", timeout=30_000)
    for chart in CHARTS:
        page.wait_for_selector(f"#{chart} svg.main-svg", timeout=30_000)
    assert "export-best live" in page.locator("#best").inner_text()
    # The study's metric names the table column and the best-trial card; the teacher's score is on the page.
    assert page.inner_text("#metric-header") == "accuracy" and "accuracy" in page.inner_text("#best .big")
    assert "teacher accuracy 0.9000" in page.inner_text("#counts")

    # Sorting happens on the server: clicking Accuracy orders rows by value.
    page.click("#trials th[data-sort='value']")
    page.wait_for_function("document.querySelector(\"#trials th[data-sort='value']\").classList.contains('sorted')")
    page.wait_for_timeout(500)
    values = [float(v) for v in page.locator("#trials tbody tr td:nth-child(3)").all_inner_texts() if v]
    assert values == sorted(values, reverse=True) and len(values) == 6
    shot(page, tmp_path / "study-finished.png")

    # After export-best --seeds, the page shows the retrained spread beside the best trial.
    from storage import get_study, make_engine, record_seed_run, session_scope

    db = make_engine(live_stack.env["KDSEARCH_DATABASE_URL"])
    with session_scope(db) as session:
        study = get_study(session, "live")
        best = int(page.locator("#best").inner_text().split("trial #")[1].split(",")[0])
        for seed, accuracy in ((34, 0.81), (35, 0.83)):
            record_seed_run(session, study_id=study.id, trial_number=best, seed=seed, eval_accuracy=accuracy,
                            best_epoch=3, checkpoint_artifact_id=f"test-{seed}")
    db.dispose()
    page.reload()
    page.wait_for_selector("#seed-retrain", timeout=30_000)
    assert "retrained over 2 seeds" in page.inner_text("#seed-retrain")
    assert "best seed 35" in page.inner_text("#seed-retrain")

    # The workers page: host, device, status and heartbeat age of the worker that ran the study.
    page.goto(f"{live_stack.url}/workers")
    page.wait_for_selector("#workers tbody tr")
    row = page.inner_text("#workers tbody tr")
    assert "cpu" in row and "idle" in row
    shot(page, tmp_path / "workers.png")
    assert not problems, problems


def test_studies_page_launches_and_lists(browser, live_stack: Stack, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    page = browser.new_page(viewport={"width": 1400, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(live_stack.url)
    page.click("#launch summary")
    bad = tiny_spec(tiny_assets, name="from-form", n_trials=0)
    page.fill("#spec", json.dumps(bad))
    page.click("#submit")
    page.wait_for_selector("#launch-result .error")
    assert "n_trials" in page.inner_text("#launch-result")
    page.fill("#spec", json.dumps({**bad, "n_trials": 2}))
    page.click("#submit")
    page.wait_for_selector("#launch-result a")
    page.wait_for_selector("#studies tbody tr >> text=from-form", timeout=10_000)
    assert "0/2" in page.inner_text("#studies tbody")
    shot(page, tmp_path / "studies.png")
    # The cancel button works (its POST is JSON: without a token the API refuses any other kind, issue 26).
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.click('#studies tbody button[data-cancel="from-form"]')
    page.wait_for_function("() => [...document.querySelectorAll('#studies tbody tr')].some(r => "
                           "r.innerText.includes('from-form') && r.innerText.includes('cancelled'))", timeout=10_000)
    assert dialogs == ["Cancel study from-form? Running trials stop at their next epoch."], dialogs
    assert live_stack.study("from-form")["status"] == "cancelled"
    assert not problems, problems


def test_preparation_progress_sorting_and_fetch_errors(browser, sqlite_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                       tiny_assets) -> None:
    stack = Stack(sqlite_url, tmp_path, KDSEARCH_ENGINE="tests.flaky_engine:FlakyEngine", KDSEARCH_TEST_EPOCH_S="0.1",
                  KDSEARCH_POLL_INTERVAL="0.1", KDSEARCH_PROGRESS_INTERVAL="0", KDSEARCH_TEST_PREP_STEPS="40",
                  KDSEARCH_TEST_PREP_S="0.25")
    try:
        stack.start_api()
        stack.submit(tiny_spec(tiny_assets, name="slow-page", n_trials=4,
                               search_space={"num_train_epochs": {"low": 1, "high": 6}}))
        stack.start_worker()
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(stack.url)
        # The studies list shows the preparation's bar, rows and the server's ETA while the teacher labels rows.
        page.wait_for_selector("#studies .progress.preparing", timeout=30_000)
        assert re.search(r"preparing teacher logits: [\d,]+ / 4,000 rows", page.inner_text("#studies tbody"))
        page.goto(f"{stack.url}/studies/slow-page")
        page.wait_for_function("document.querySelector('#preparing').textContent.includes('ETA')", timeout=30_000)
        shot(page, tmp_path / "preparing.png")
        stack.wait_status("slow-page")
        page.wait_for_function("document.querySelectorAll('#trials tbody tr').length === 4", timeout=30_000)
        assert page.inner_text("#preparing") == ""
        # "Duration" sorts by duration (on the server).
        page.click("#trials th[data-sort='duration']")
        page.wait_for_function("document.querySelector(\"#trials th[data-sort='duration']\").classList.contains("
                               "'sorted')")
        page.wait_for_timeout(500)
        durations = [float(v) for v in page.locator("#trials tbody tr td:nth-child(11)").all_inner_texts()]
        assert durations == sorted(durations, reverse=True) and len(durations) == 4
        # A refresh that fails says so on the page, not only in the console.
        assert page.is_hidden("#fetch-error")
        stack.api.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        stack.api.wait(30)  # type: ignore[union-attr]
        page.wait_for_selector("#fetch-error:not([hidden])", timeout=30_000)
        assert "could not refresh" in page.inner_text("#fetch-error")
    finally:
        stack.stop()


def test_pareto_chart(browser, sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """A two-objective study run by a real worker (the distillation engine, tiny models): the Pareto chart shows every
    trial, the front from the API and the teacher; the best-trial card is the front; the table has size columns."""
    import httpx

    stack = Stack(sqlite_url, tmp_path, KDSEARCH_POLL_INTERVAL="0.1")
    try:
        stack.start_api()
        stack.submit(front_spec(tiny_assets, "pareto-page", n_trials=4))
        stack.start_worker()
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.goto(f"{stack.url}/studies/pareto-page")
        stack.wait_status("pareto-page")
        page.wait_for_function("document.querySelectorAll('#trials tbody tr').length === 4", timeout=60_000)
        page.wait_for_selector("#pareto svg.main-svg", timeout=30_000)
        front = httpx.get(f"{stack.url}/api/studies/pareto-page/pareto").json()
        complete = [t for t in stack.trials("pareto-page") if t["state"] == "COMPLETE"]
        page.wait_for_function(f"document.getElementById('pareto-info').textContent.startsWith("
                               f"'{len(front['front'])} of {len(complete)} complete')", timeout=30_000)
        traces = page.evaluate("document.getElementById('pareto').data.map((t) => ({name: t.name, x: t.x, y: t.y, "
                               "text: t.text, hovertext: t.hovertext}))")
        by_name = {t["name"]: t for t in traces}
        assert set(by_name) == {"dominated trial", "Pareto front", "teacher"}
        assert by_name["Pareto front"]["x"] == [p["cost"] for p in front["front"]]
        assert len(by_name["dominated trial"]["x"]) == len(complete) - len(front["front"])
        assert by_name["teacher"]["x"] == [front["teacher_profile"]["params"]]
        assert by_name["teacher"]["y"] == [front["teacher_metric"]]
        # Hover: the shape and the KD parameters of each front point.
        first = front["front"][0]
        shape = first["profile"]["shape"]
        hover = by_name["Pareto front"]["text"][0]
        assert f"#{first['number']} accuracy" in hover
        assert f"L{shape['num_hidden_layers']} H{shape['hidden_size']}" in hover
        assert "lr=" in hover and "\u03b1=" in hover  # alpha
        # The best-trial card is the front; the export command carries a selector.
        best = page.inner_text("#best")
        assert "Pareto front" in best and "--max-params" in best and f"#{first['number']}" in best
        # Card and chart from one answer: the card lists exactly the chart's front (it lagged a poll behind once).
        assert page.locator("#front-list tbody tr td:first-child").all_inner_texts() == [
            f"#{p['number']}" for p in front["front"]]
        # Size and latency columns in the trials table.
        header = page.locator("#trials thead th").all_inner_texts()
        assert "Params" in header and "Latency (ms)" in header and "Shape" in header
        params_col = header.index("Params") + 1
        assert all(page.locator(f"#trials tbody tr td:nth-child({params_col})").all_inner_texts())
        shot(page, tmp_path / "pareto.png")
        # Another cost axis: the chart is redrawn against latency.
        page.select_option("#pareto-cost", "latency_ms")
        page.wait_for_function("document.getElementById('pareto').layout.xaxis.title.text.includes('CPU ms')",
                               timeout=10_000)
        assert not problems, problems
    finally:
        stack.stop()
