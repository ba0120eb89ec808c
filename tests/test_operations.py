"""Operating kdsearch: preparation errors sorted by whose fault they are, out-of-memory trials, preparation progress,
the review's fixes. Real API and worker processes (``service.testing.FlakyEngine``), SQLite and PostgreSQL."""

from __future__ import annotations

import re
import time
from pathlib import Path

import httpx
import pytest

from kdsearch.testing import Stack, tiny_spec
from tests.conftest import FLAKY

# What FLAKY's stack adds here: quick preparation retries, and a slow preparation's progress.
OPERATIONS = {"KDSEARCH_PREPARE_RETRY_DELAY": "0.3", "KDSEARCH_MAX_PREPARE_ATTEMPTS": "3",
              "KDSEARCH_PROGRESS_INTERVAL": "0", "KDSEARCH_TEST_PREP_STEPS": "20", "KDSEARCH_TEST_PREP_S": "0.25"}


@pytest.fixture
def flaky_env() -> dict[str, str]:
    return OPERATIONS


@pytest.fixture
def stack(flaky_stack: Stack) -> Stack:
    return flaky_stack


def _spec(assets, name: str, n_trials: int = 3) -> dict:  # type: ignore[no-untyped-def]
    return tiny_spec(assets, name=name, n_trials=n_trials, search_space={"num_train_epochs": 2})


def test_preparation_faults_by_whose_fault_they_are(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    for name in ("oserror-once-a", "data-b", "oserror-always-c", "oom-once-d"):
        stack.submit(_spec(tiny_assets, name))
    stack.start_worker()

    hiccup = stack.wait_status("oserror-once-a")  # a disk or network hiccup: retried, the study completes
    assert hiccup["status"] == "finished" and hiccup["finished"] == 3 and hiccup["counts"]["failed"] == 0
    assert hiccup["prepare_retry"] is None and hiccup["error"] is None

    data = stack.wait_status("data-b")  # the data's fault: failed at once, with the reason
    assert data["status"] == "failed" and "DataError: column 'label' holds 'maybe'" in data["error"]
    assert "times in a row" not in data["error"]

    always = stack.wait_status("oserror-always-c")  # nobody's data error, but every time: failed with the count
    assert always["status"] == "failed"
    assert always["error"] == "OSError: No space left on device (preparation failed 3 times in a row)"
    assert (Path(stack.env["KDSEARCH_ARTIFACTS"]) / "flaky-oserror-always-c").read_text() == "xxx"

    oom = stack.wait_status("oom-once-d")  # a trial out of memory: that trial fails and is retried
    assert oom["status"] == "finished" and oom["finished"] == 3 and oom["counts"]["failed"] == 1
    failed = [t for t in stack.trials("oom-once-d") if t["state"] == "FAIL"]
    assert len(failed) == 1 and failed[0]["fail_reason"] == "out of memory"
    assert stack.workers[0].poll() is None, "the worker keeps running"
    logs = stack.worker_logs()
    assert "preparation failed (OSError: Connection reset by peer), attempt 1 of 3" in logs


def test_a_retrying_study_shows_why(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack.env["KDSEARCH_PREPARE_RETRY_DELAY"] = "30"  # long enough to look at
    stack.submit(_spec(tiny_assets, "oserror-once-e"))
    stack.start_worker()
    stack.wait_for(lambda: stack.study("oserror-once-e")["prepare_retry"] is not None, 60, "the retry to show")
    study = stack.study("oserror-once-e")
    assert study["status"] == "running" and study["prepare_retry"]["attempts"] == 1
    assert study["prepare_retry"]["last_error"] == "OSError: Connection reset by peer"
    assert study["counts"]["waiting"] == 3  # the slot went back untried: no trial attempt used


def test_preparation_progress_is_visible(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack.submit(_spec(tiny_assets, "slow-f", n_trials=1))
    stack.start_worker()
    seen: list[dict] = []

    def mid_way() -> bool:  # two polls mid-way that saw the count move (two polls may see the same count)
        study = stack.study("slow-f")
        if study["preparing"] and 0 < study["preparing"]["done"] < study["preparing"]["total"]:
            seen.append(study)
        return len({s["preparing"]["done"] for s in seen}) >= 2

    stack.wait_for(mid_way, 60, "preparation progress")
    listed = next(s for s in httpx.get(f"{stack.url}/api/studies").json() if s["name"] == "slow-f")
    for prep in (seen[0]["preparing"], seen[-1]["preparing"]):
        assert prep["stage"] == "teacher_logits" and prep["total"] == 2000
        assert prep["rate"] > 0 and prep["eta_s"] is not None and prep["eta_s"] >= 0
    assert seen[-1]["preparing"]["done"] > seen[0]["preparing"]["done"]
    assert listed["preparing"] is None or listed["preparing"]["stage"] == "teacher_logits"
    done = stack.wait_status("slow-f")
    assert done["status"] == "finished" and done["preparing"] is None
    # Plain lines about every 10% in a log that is not a terminal, never a mangled progress bar.
    lines = re.findall(r"study slow-f: teacher_logits ([\d,]+) / 2,000 rows \((\d+)%\)", stack.worker_logs())
    assert 8 <= len(lines) <= 12 and lines[-1] == ("2,000", "100")


def test_trials_sort_by_duration(stack: Stack, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    stack.submit(tiny_spec(tiny_assets, name="durations", n_trials=4,
                           search_space={"num_train_epochs": {"low": 1, "high": 8}}))
    stack.start_worker()
    assert stack.wait_status("durations")["status"] == "finished"
    for order in ("asc", "desc"):
        trials = httpx.get(f"{stack.url}/api/studies/durations/trials",
                           params={"sort": "duration", "order": order}).json()["trials"]
        durations = [t["duration_s"] for t in trials]
        assert durations == sorted(durations, reverse=order == "desc") and len(durations) == 4


def test_a_slow_launch_does_not_stall_reads(sqlite_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """One slow SQLite write (another process holds the write lock) must not stall every dashboard poll."""
    import sqlite3
    import threading

    stack = Stack(sqlite_url, tmp_path)
    try:
        stack.start_api()
        locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # in WAL mode: writers wait, readers go on
        launched: list[int] = []
        thread = threading.Thread(target=lambda: launched.append(httpx.post(
            f"{stack.url}/api/studies", json=tiny_spec(tiny_assets, name="slow-write"), timeout=60).status_code))
        thread.start()
        time.sleep(1.5)  # the launch is now waiting for the write lock
        assert not launched
        started = time.monotonic()
        assert httpx.get(f"{stack.url}/api/studies", timeout=10).status_code == 200
        assert httpx.get(f"{stack.url}/api/health", timeout=10).status_code == 200
        assert time.monotonic() - started < 2.0
        locker.execute("ROLLBACK")
        thread.join(60)
        assert launched == [201]
    finally:
        stack.stop()


def test_prometheus_metrics_match_the_api(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    stack = Stack(db_url, tmp_path, **{**FLAKY, **OPERATIONS, "KDSEARCH_API_TOKEN": "sekrit"})
    auth = {"Authorization": "Bearer sekrit"}
    try:
        stack.start_api()
        for name, n in (("metrics-a", 4), ("data-metrics", 2), ("metrics-queued", 3)):
            spec = {**_spec(tiny_assets, name, n_trials=n), "priority": 0 if name == "metrics-queued" else 1}
            assert httpx.post(f"{stack.url}/api/studies", json=spec, headers=auth, timeout=60).status_code == 201
        stack.start_worker("--max-trials", "5")  # the two prioritised studies, then the worker stops
        stack.wait_for(lambda: stack.workers[0].poll() is not None, 120, "the worker to stop")
        assert httpx.get(f"{stack.url}/metrics").status_code == 401  # the same access rule as every read
        scraped = httpx.get(f"{stack.url}/metrics", headers=auth)
        assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(scraped.text) for s in family.samples}
        studies = httpx.get(f"{stack.url}/api/studies", headers=auth).json()

        def sample(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted(labels.items())))]

        for status in ("queued", "running", "finished", "failed", "cancelled"):
            assert sample("kdsearch_studies", status=status) == sum(s["status"] == status for s in studies), status
        for study in studies:
            counts = study["counts"]
            if study["status"] != "running":  # per-study series for running studies only
                assert not any(dict(labels).get("study") == study["name"] for _, labels in samples), study["name"]
                continue
            assert sample("kdsearch_trials", study=study["name"], state="COMPLETE") == counts["complete"]
            assert sample("kdsearch_trials", study=study["name"], state="FAIL") == counts["failed"]
            assert sample("kdsearch_pending_slots", study=study["name"]) == counts["waiting"]
        assert sample("kdsearch_queue_depth") == 3
        # Only counters end in _total (Prometheus' naming rules).
        counters = {f.name for f in text_string_to_metric_families(scraped.text) if f.type == "counter"}
        assert all(f.type == "counter" or not f.name.endswith("_total")
                   for f in text_string_to_metric_families(scraped.text))
        # This API process's own metrics and its HTTP requests (prometheus-fastapi-instrumentator).
        assert sample("process_cpu_seconds_total") > 0 and "python_gc_objects_collected" in counters
        assert sample("http_requests_total", handler="/api/studies", method="POST", status="2xx") == 3
        assert not any(name == "http_requests_total" and dict(labels).get("handler") == "/metrics"
                       for name, labels in samples)
        assert sample("kdsearch_workers", status="stopped") == 1 and sample("kdsearch_workers", status="lost") == 0
        finished = sum(s["finished"] for s in studies)
        assert sample("kdsearch_trial_duration_seconds_count") == finished == 4
        assert sample("kdsearch_trial_duration_seconds_bucket", le="+Inf") == finished
        assert 0 < sample("kdsearch_trial_duration_seconds_sum") < 60 * finished
        done = next(s for s in studies if s["name"] == "metrics-a")
        assert done["status"] == "finished" and ("kdsearch_best_value", (("metric", "accuracy"), (
            "study", "metrics-a"))) not in samples  # only running studies report a best value

        # One trial of the queued study: it is running now, and has its per-study series.
        stack.start_worker("--max-trials", "1")
        stack.wait_for(lambda: stack.workers[1].poll() is not None, 120, "the second worker to stop")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in text_string_to_metric_families(
            httpx.get(f"{stack.url}/metrics", headers=auth).text) for s in family.samples}
        running = httpx.get(f"{stack.url}/api/studies/metrics-queued", headers=auth).json()
        assert running["status"] == "running" and running["counts"]["complete"] == 1
        assert sample("kdsearch_trials", study="metrics-queued", state="COMPLETE") == 1
        assert sample("kdsearch_pending_slots", study="metrics-queued") == running["counts"]["waiting"] == 2
        assert sample("kdsearch_queue_depth") == 2
        assert sample("kdsearch_best_value", study="metrics-queued", metric="accuracy") == running["best_value"]
    finally:
        stack.stop()


def test_duration_sort_keeps_microseconds(db_url: str) -> None:
    """Trials a fraction of a millisecond apart sort by their true durations on both backends (SQLite's date
    functions alone keep milliseconds: 0.24172 s and 0.241126 s came out swapped)."""
    import datetime as dt

    import optuna
    import sqlalchemy as sa
    from sqlalchemy.orm import Session

    from storage import OPTUNA_TRIALS as _trials
    from storage import duration_seconds, optuna_study_id, page_trial_ids

    storage = optuna.storages.RDBStorage(db_url)
    study = optuna.create_study(study_name="micro", storage=storage)
    start = dt.datetime(2026, 1, 1, 23, 59, 59, 999_500)  # a day and a second boundary inside the durations
    seconds = [0.24172, 0.241126, 0.241127, 86_400.5, 0.000001]
    for _ in seconds:
        study.enqueue_trial({})
        study.tell(study.ask(), 0.5)
    engine = sa.create_engine(db_url)
    with Session(engine) as session, session.begin():
        study_id = optuna_study_id(session, "micro")
        assert study_id is not None
        for number, s in enumerate(seconds):
            session.execute(sa.update(_trials).where(_trials.c.study_id == study_id, _trials.c.number == number)
                            .values(datetime_start=start, datetime_complete=start + dt.timedelta(seconds=s)))
    with Session(engine) as session:
        measured = session.execute(sa.select(_trials.c.number, duration_seconds(engine.dialect.name))
                                   .where(_trials.c.study_id == study_id).order_by(_trials.c.number)).all()
        assert [round(float(d), 6) for _, d in measured] == seconds
        for descending in (False, True):
            _, ids = page_trial_ids(session, study_id, offset=0, limit=10, sort="duration", descending=descending)
            numbers = [session.scalar(sa.select(_trials.c.number).where(_trials.c.trial_id == i)) for i in ids]
            assert numbers == sorted(range(len(seconds)), key=lambda n: seconds[n], reverse=descending)
    engine.dispose()
