"""The calls the study page makes, timed: what ``bench/dashboard_scale.py`` reports and
``tests/test_dashboard_scale.py`` prints (the study itself is seeded by ``service.testing.seed_study``)."""

from __future__ import annotations

import statistics
import time

import httpx


def time_calls(client: httpx.Client, name: str, reps: int = 5) -> dict[str, float]:
    """The median seconds of each API call the study page makes for study ``name`` (each answered 200), and of the
    summary's conditional poll (answered 304). ``client``: an ``httpx.Client`` on the API, or FastAPI's
    ``TestClient``."""
    calls = {
        "GET /api/studies": "/api/studies",
        f"GET /api/studies/{name}": f"/api/studies/{name}",
        f"GET /api/studies/{name}/summary": f"/api/studies/{name}/summary",
        f"GET /api/studies/{name}/trials?limit=50&sort=value&order=desc":
            f"/api/studies/{name}/trials?limit=50&sort=value&order=desc",
        "GET /metrics (Prometheus scrape)": "/metrics",
    }
    timings = {}
    for label, url in calls.items():
        seconds = []
        for _ in range(reps):
            started = time.perf_counter()
            response = client.get(url)
            seconds.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text
        timings[label] = statistics.median(seconds)
    etag = client.get(f"/api/studies/{name}/summary").headers["ETag"]
    started = time.perf_counter()
    assert client.get(f"/api/studies/{name}/summary", headers={"If-None-Match": etag}).status_code == 304
    timings[f"GET /api/studies/{name}/summary, unchanged (304)"] = time.perf_counter() - started
    return timings
