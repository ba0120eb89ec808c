"""The study page's API stays correct (and fast: the figure is printed) with 5,000 trials."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import update

from kdsearch.testing import time_calls
from service.api import create_app
from service.settings import Settings
from service.testing import seed_study
from storage import StudyRow, StudyStatus, make_engine, session_scope


def test_five_thousand_trials(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'scale.db'}"
    seed_study(url, "scale", 5000)
    with TestClient(create_app(Settings(database_url=url, artifacts=tmp_path / "a"))) as client:
        summary = client.get("/api/studies/scale/summary").json()
        assert len(summary["points"]) == 5000 and len(summary["curves"]) == 5000
        assert summary["study"]["finished"] == 5000
        assert summary["study"]["best_value"] == max(p["value"] for p in summary["points"] if p["state"] == "COMPLETE")
        page = client.get("/api/studies/scale/trials?limit=50&offset=100&sort=value&order=desc").json()
        assert page["total"] == 5000 and len(page["trials"]) == 50
        values = [t["value"] for t in page["trials"]]
        assert values == sorted(values, reverse=True)
        assert client.get("/api/studies/scale/trials?state=PRUNED&limit=1").json()["total"] == summary["study"][
            "counts"]["pruned"]
        scrape = client.get("/metrics").text
        assert 'kdsearch_trial_duration_seconds_count 5000.0' in scrape
        # Per-study series for running studies only: none for this finished one, its counts once it runs.
        pruned = f'kdsearch_trials{{state="PRUNED",study="scale"}} {summary["study"]["counts"]["pruned"]}.0'
        assert summary["study"]["status"] != "running" and 'study="scale"' not in scrape
        db = make_engine(url)
        with session_scope(db) as session:
            session.execute(update(StudyRow).where(StudyRow.name == "scale").values(status=StudyStatus.RUNNING))
        db.dispose()
        assert pruned in client.get("/metrics").text
        timings = time_calls(client, "scale", reps=3)
    with capsys.disabled():
        print("\n5,000-trial study page API (benchmark figure, not asserted): "
              + ", ".join(f"{k.split(' ', 1)[1]} {v * 1000:.0f} ms" for k, v in timings.items()))
