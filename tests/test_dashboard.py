"""The dashboard in a real browser (Debian's Chromium driven by Playwright) against a study a real worker runs."""

from __future__ import annotations

import os
import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdsearch.objectives import COSTS
from kdsearch.testing import Stack, tiny_spec
from tests.conftest import front_spec

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
    stack = Stack(sqlite_url, tmp_path, KDSEARCH_ENGINE="service.testing:SleepEngine",
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
        record_seed_run(db, study_id=study.id, trial_number=best, seed=seed, best_score=accuracy,
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
    stack = Stack(sqlite_url, tmp_path, KDSEARCH_ENGINE="service.testing:FlakyEngine", KDSEARCH_TEST_EPOCH_S="0.1",
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
        durations = [float(v) for v in page.locator("#trials tbody tr td:nth-child(7)").all_inner_texts()]
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
        # One fixed student shape, profiled like any trial: every trial has one cost, so no Pareto chart.
        stack.submit(tiny_spec(tiny_assets, name="one-shape", n_trials=2, search_space={
            "num_train_epochs": 1, "batch_size": 32, "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}))
        stack.start_worker()
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
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
        # Size and latency columns in the trials table: one per cost of the registry, and the cost axes the same.
        header = [h.lower() for h in page.locator("#trials thead th").all_inner_texts()]
        assert "shape" in header and all(cost.short.lower() in header for cost in COSTS)
        # The table may be a poll behind the API (a row drawn while its trial ran has no cost yet): wait for the poll
        # that draws the finished trials, then every cost cell holds a figure.
        columns = [header.index(cost.short.lower()) + 1 for cost in COSTS]
        page.wait_for_function(f"{columns}.every((c) => [...document.querySelectorAll("
                               f"`#trials tbody tr td:nth-child(${{c}})`)]"
                               ".every((td) => td.textContent.trim() !== ''))",
                               timeout=30_000)
        for column in columns:
            assert all(page.locator(f"#trials tbody tr td:nth-child({column})").all_inner_texts())
        assert page.eval_on_selector_all("#pareto-cost option", "(os) => os.map((o) => o.value)") == [
            cost.name for cost in COSTS]
        assert_fits(page, "a searched-shape study's page with every size column at 1280px")
        shot(page, tmp_path / "pareto.png")
        # Another cost axis: the chart is redrawn against latency.
        page.select_option("#pareto-cost", "latency_ms")
        page.wait_for_function("document.getElementById('pareto').layout.xaxis.title.text.includes('CPU ms')",
                               timeout=10_000)
        stack.wait_status("one-shape")
        assert all(t["profile"] for t in stack.trials("one-shape"))  # measured, yet all at one cost
        assert stack.study("pareto-page")["shape_searched"] and not stack.study("one-shape")["shape_searched"]
        page.goto(f"{stack.url}/studies/one-shape")
        page.wait_for_selector("#history svg.main-svg", timeout=30_000)
        assert page.is_hidden("#pareto-card")
        assert not problems, problems
    finally:
        stack.stop()


# ------------------------------------------------------------------------------------------------ issue 27: 15-18
WIDTHS = (1280, 1920)
# Measured in the page: the page's own overflow, and every visible table's box against its card's (or main's).
LAYOUT_JS = """() => {
  const spills = [...document.querySelectorAll('table')].filter((t) => t.offsetParent !== null).map((t) => {
    const box = (t.closest('.card') || t.closest('main')).getBoundingClientRect();
    const r = t.getBoundingClientRect();
    const out = r.right > box.right + 0.5 || r.left < box.left - 0.5;
    return out ? `${t.id || t.className}: ${r.left}-${r.right} outside ${box.left}-${box.right}` : null;
  }).filter(Boolean);
  return {scroll: document.documentElement.scrollWidth, inner: window.innerWidth, spills};
}"""


def assert_fits(page, what: str) -> None:  # type: ignore[no-untyped-def]
    layout = page.evaluate(LAYOUT_JS)
    assert layout["scroll"] <= layout["inner"], f"{what}: the page scrolls sideways ({layout})"
    assert not layout["spills"], f"{what}: a table spills out of its card ({layout['spills']})"


def open_page(browser, url: str, width: int, problems: list[str]):  # type: ignore[no-untyped-def]
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.goto(url)
    return page


def test_layout_empty_charts_and_preparation_at_1280_and_1920(browser, sqlite_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                               tiny_assets) -> None:
    """Issue 27, 15-17, at 1280 and 1920 px: no sideways scroll and every table inside its card; a queued study's
    cancel button and a failed study's error on screen (the error on lines of its own, not a word per line); one
    message instead of six empty charts for a failed study; one-epoch trials on the learning-curve chart; no
    Pareto chart for one fixed student shape; the importances caveat under 10 trials; a preparation's rows, rate
    and ETA that agree."""
    from datetime import timedelta

    from storage import db_now, get_study, make_engine, report_progress, session_scope

    stack = Stack(sqlite_url, tmp_path, KDSEARCH_ENGINE="service.testing:FlakyEngine", KDSEARCH_TEST_EPOCH_S="0.05",
                  KDSEARCH_POLL_INTERVAL="0.1")
    problems: list[str] = []
    try:
        stack.start_api()
        # The data's fault: the study fails at preparation with the reason (FlakyEngine's "data-" studies).
        stack.submit(tiny_spec(tiny_assets, name="data-labels-the-teacher-does-not-know", n_trials=3))
        stack.submit(tiny_spec(tiny_assets, name="one-epoch", n_trials=3,
                               search_space={"num_train_epochs": 1, "batch_size": 32,
                                             "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}))
        worker = stack.start_worker()
        assert stack.wait_status("data-labels-the-teacher-does-not-know")["status"] == "failed"
        assert stack.wait_status("one-epoch")["status"] == "finished"
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
        # A queued study (no worker now) whose preparation reported 1,000 of 4,000 rows at 100 rows/s 30 s ago.
        stack.submit(tiny_spec(tiny_assets, name="queued-with-a-long-name-for-the-studies-table", n_trials=3))
        db = make_engine(stack.env["KDSEARCH_DATABASE_URL"])
        with session_scope(db) as session:
            queued_id = get_study(session, "queued-with-a-long-name-for-the-studies-table").id  # type: ignore[union-attr]
            then = db_now(session) - timedelta(seconds=30)
        report_progress(db, queued_id, "worker-x", "teacher_logits", 1000, 4000, 100.0, now=then)
        db.dispose()

        for width in WIDTHS:
            page = open_page(browser, stack.url, width, problems)
            page.wait_for_selector("#studies tr.detail .study-error")
            page.wait_for_selector("#studies button[data-cancel]")
            assert_fits(page, f"studies page at {width}px")
            cancel = page.evaluate("(() => { const r = document.querySelector('#studies button[data-cancel]')"
                                   ".getBoundingClientRect(); return [r.left, r.right, window.innerWidth]; })()")
            assert cancel[0] >= 0 and cancel[1] <= cancel[2], f"cancel button off screen at {width}px: {cancel}"
            error = page.locator("#studies .study-error")
            assert error.is_visible() and "DataError" in error.inner_text()
            lines = page.evaluate("(() => { const e = document.querySelector('#studies .study-error'); "
                                  "const height = e.getBoundingClientRect().height; "
                                  "return Math.round(height / parseFloat(getComputedStyle(e).lineHeight)); })()")
            words = len(error.inner_text().split())
            assert lines <= 2 < words, f"the error takes {lines} lines for {words} words at {width}px"
            # 17: rows, rate and ETA as of the one report, and its age: (4,000 - 1,000) / 100 rows/s = 30 s.
            prep = page.inner_text("#studies tr.detail[data-study^='queued'] td")
            assert re.search(r"1,000 / 4,000 rows, 100 rows/s, ETA 30 s \(reported \d+ s ago\)", prep), prep
            shot(page, tmp_path / f"studies-{width}.png")
            page.close()

            page = open_page(browser, f"{stack.url}/studies/one-epoch", width, problems)
            page.wait_for_function("document.querySelectorAll('#trials tbody tr').length === 3", timeout=30_000)
            for chart in CHARTS:
                page.wait_for_selector(f"#{chart} svg.main-svg", timeout=30_000)
            assert_fits(page, f"finished study at {width}px")
            # Every one-epoch trial is drawn on the learning-curve chart, as a point (a line needs two).
            curves = page.evaluate("document.getElementById('curves').data.map((t) => [t.mode, t.x.length])")
            assert curves == [["markers", 1]] * 3, curves
            assert page.is_hidden("#pareto-card")  # one fixed shape: every trial has the same cost
            page.wait_for_selector("#importances-note:not([hidden])")
            assert "Only 3 complete trials" in page.inner_text("#importances-note")
            shot(page, tmp_path / f"study-{width}.png")
            page.close()

            page = open_page(browser, f"{stack.url}/studies/data-labels-the-teacher-does-not-know", width, problems)
            page.wait_for_selector("#no-charts:not([hidden])")
            assert "failed before any trial finished" in page.inner_text("#no-charts")
            assert page.is_hidden("#charts") and page.locator(".chart svg.main-svg").count() == 0
            assert "DataError" in page.inner_text("#error")
            assert_fits(page, f"failed study at {width}px")
            page.close()

            page = open_page(browser, f"{stack.url}/studies/queued-with-a-long-name-for-the-studies-table", width,
                             problems)
            page.wait_for_selector("#no-charts:not([hidden])")
            assert "No trial has finished yet" in page.inner_text("#no-charts")
            assert re.search(r"ETA 30 s \(reported \d+ s ago\)", page.inner_text("#preparing"))
            assert page.is_visible("#cancel")
            assert_fits(page, f"queued study at {width}px")
            page.close()
        assert not problems, problems
    finally:
        stack.stop()


def test_trial_page_timeline_and_workers(browser, sqlite_url: str, tmp_path: Path,  # type: ignore[no-untyped-def]
                                         tiny_assets) -> None:
    """Issue 27, 16 and 18: a trial page (parameters, per-epoch curves, the worker's lines, artifacts, the
    export-best command to copy), reached from the trials table and the timeline; a failed trial's page shows its
    reason and no export; the workers table names the study and the trial it runs."""
    import httpx

    stack = Stack(sqlite_url, tmp_path, KDSEARCH_ENGINE="service.testing:FlakyEngine", KDSEARCH_TEST_EPOCH_S="0.6",
                  KDSEARCH_POLL_INTERVAL="0.1")
    problems: list[str] = []
    try:
        stack.start_api()
        # FlakyEngine: the first trial of an "oom-once-" study runs out of memory (FAIL, retried); the rest train.
        stack.submit(tiny_spec(tiny_assets, name="oom-once-pages", n_trials=3,
                               search_space={"num_train_epochs": 2, "batch_size": 32,
                                             "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}))
        stack.start_worker()
        # While a trial trains, the workers table names its study and its trial number, each a link.
        workers = open_page(browser, f"{stack.url}/workers", 1280, problems)
        workers.wait_for_selector("#workers td.trial a", timeout=60_000)
        row = workers.locator("#workers tbody tr").first
        assert row.locator("td.study a").inner_text() == "oom-once-pages"
        assert re.fullmatch(r"#\d+", row.locator("td.trial a").inner_text())
        href = row.locator("td.trial a").get_attribute("href") or ""
        assert re.fullmatch(r"/studies/oom-once-pages/trials/\d+", href), href
        assert_fits(workers, "workers page at 1280px")
        workers.close()
        stack.wait_status("oom-once-pages")
        trials = {t["number"]: t for t in stack.trials("oom-once-pages")}
        assert trials[0]["state"] == "FAIL" and [trials[n]["state"] for n in (1, 2, 3)] == ["COMPLETE"] * 3
        worker_id = trials[1]["worker"]

        for width in WIDTHS:
            page = open_page(browser, f"{stack.url}/studies/oom-once-pages", width, problems)
            page.wait_for_selector("#timeline svg.main-svg", timeout=30_000)
            # The timeline: every trial that ran, on the row of the worker that ran it.
            bars = page.evaluate("document.getElementById('timeline').data.flatMap((t) => t.customdata.map((n, i) => "
                                 "[n, t.y[i], t.name]))")
            assert sorted(bars) == [[n, worker_id, trials[n]["state"]] for n in range(4)]
            assert_fits(page, f"study page with a timeline at {width}px")
            page.close()

        page = open_page(browser, f"{stack.url}/studies/oom-once-pages", 1920, problems)
        page.wait_for_selector("#trials tbody tr a")
        page.click("#trials tbody tr[data-number='2'] a")
        page.wait_for_url(f"{stack.url}/studies/oom-once-pages/trials/2")
        page.wait_for_selector("#log:not(:empty)")
        detail = httpx.get(f"{stack.url}/api/studies/oom-once-pages/trials/2").json()
        assert page.inner_text("#number") == "#2" and "COMPLETE" in page.inner_text("#state")
        params = dict(r.split("\t") for r in page.locator("#params tbody tr").all_inner_texts())
        assert set(params) == set(detail["params"]) and params["num_train_epochs"] == "2"
        assert page.locator("#epochs tbody tr").count() == 2
        assert page.evaluate("document.getElementById('epoch-chart').data[0].y.length") == 2
        log = page.inner_text("#log")
        # The checkpoint the worker recorded on the trial, read from Optuna's store itself.
        import optuna

        recorded = optuna.load_study(study_name="oom-once-pages", storage=stack.env["KDSEARCH_DATABASE_URL"])
        checkpoint = recorded.trials[2].user_attrs["checkpoint_artifact_id"]
        for line in ("trial 2 (slot", f"on worker {worker_id}", "trial 2 epoch 1: accuracy",
                     "trial 2 epoch 2: accuracy", f"checkpoint stored as artifact {checkpoint}",
                     "trial 2 complete: best accuracy"):
            assert line in log, (line, log)
        assert [r.split("\t")[:3] for r in page.locator("#artifacts tbody tr").all_inner_texts()] == [
            ["checkpoint", "checkpoint.tar", checkpoint]]
        command = "kdsearch export-best oom-once-pages --trial 2 --out ./oom-once-pages-trial-2"
        assert page.inner_text("#export-command") == command == detail["export_command"]
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.url)
        page.click("#copy")
        page.wait_for_function("document.getElementById('copied').textContent !== ''")
        assert page.evaluate("navigator.clipboard.readText()") == command
        assert_fits(page, "trial page at 1920px")
        shot(page, tmp_path / "trial.png")
        page.close()

        # The failed trial: its reason, the worker's line saying so, no checkpoint and so no export command.
        page = open_page(browser, f"{stack.url}/studies/oom-once-pages/trials/0", 1280, problems)
        page.wait_for_selector("#log:not(:empty)")
        page.wait_for_selector("#no-export:not([hidden])")
        assert page.inner_text("#fail-reason") == "out of memory"
        assert "trial 0 failed: out of memory" in page.inner_text("#log")
        assert page.is_hidden("#export-line") and "none stored" in page.inner_text("#artifacts")
        assert_fits(page, "failed trial page at 1280px")
        page.close()
        missing = httpx.get(f"{stack.url}/api/studies/oom-once-pages/trials/99")
        assert missing.status_code == 404 and "has no trial 99" in missing.json()["detail"]
        assert not problems, problems
    finally:
        stack.stop()
