"""The study page's API with thousands of trials: seed a study, time the calls the page makes.

    python bench/dashboard_scale.py             # 5,000 trials on SQLite; writes bench/results/dashboard.md
    python bench/dashboard_scale.py --trials 20000 --database-url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def seed_study(db_url: str, name: str, n_trials: int, seed: int = 0) -> None:
    """A kdsearch study whose Optuna twin holds ``n_trials`` finished trials with params, epochs and attributes.

    Rows go into Optuna's schema with bulk inserts (one ``add_trials`` per trial would take minutes); the result is
    what workers would have written, and plain Optuna reads it back.
    """
    import json
    from datetime import datetime, timedelta, timezone

    import optuna
    import sqlalchemy as sa
    from optuna.distributions import FloatDistribution, IntDistribution, distribution_to_json

    from search_space import StudySpec
    from storage import create_study, init_db, make_engine, make_optuna_storage

    spec = StudySpec.model_validate({"name": name, "teacher": "owner/teacher", "student": {"model": "owner/student"},
                                     "dataset": {"hub": "glue", "config": "sst2"}, "n_trials": n_trials})
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_optuna_storage(db_url)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    study_id = study._study_id
    engine = make_engine(db_url)
    init_db(engine)
    create_study(engine, name=name, spec=spec.model_dump(mode="json"), n_trials=n_trials, priority=0, timeout_s=None)
    dists = {"learning_rate": FloatDistribution(1e-5, 1e-3, log=True), "temperature": FloatDistribution(2, 30),
             "alpha": FloatDistribution(0, 1), "num_train_epochs": IntDistribution(2, 10)}
    dist_json = {k: distribution_to_json(d) for k, d in dists.items()}
    rng = random.Random(seed)
    start = datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=10)
    rows: dict[str, list[dict]] = {"trials": [], "trial_values": [], "trial_params": [],
                                   "trial_intermediate_values": [], "trial_user_attributes": []}
    meta = sa.MetaData()
    meta.reflect(engine, only=list(rows))
    with engine.begin() as conn:
        first_id = (conn.scalar(sa.select(sa.func.max(meta.tables["trials"].c.trial_id))) or 0) + 1
    for number in range(n_trials):
        trial_id = first_id + number
        params = {"learning_rate": 10 ** rng.uniform(-5, -3), "temperature": rng.uniform(2, 30),
                  "alpha": rng.uniform(0, 1), "num_train_epochs": rng.randint(2, 10)}
        pruned = rng.random() < 0.3
        epochs = rng.randint(1, params["num_train_epochs"]) if pruned else params["num_train_epochs"]
        curve = {e: 0.5 + 0.3 * (1 - math.exp(-e / 3)) + rng.uniform(-0.02, 0.02) for e in range(1, epochs + 1)}
        began = start + timedelta(seconds=7 * number)
        rows["trials"].append({"trial_id": trial_id, "number": number, "study_id": study_id,
                               "state": "PRUNED" if pruned else "COMPLETE", "datetime_start": began,
                               "datetime_complete": began + timedelta(seconds=5 * epochs)})
        rows["trial_values"].append({"trial_id": trial_id, "objective": 0, "value": max(curve.values()),
                                     "value_type": "FINITE"})
        rows["trial_params"] += [{"trial_id": trial_id, "param_name": k, "param_value": float(v),
                                  "distribution_json": dist_json[k]} for k, v in params.items()]
        rows["trial_intermediate_values"] += [{"trial_id": trial_id, "step": e, "intermediate_value": v,
                                               "intermediate_value_type": "FINITE"} for e, v in curve.items()]
        attrs = {"params": {**params, "batch_size": 128}, "worker": f"host:{number % 8}:cpu",
                 "best_epoch": max(curve, key=curve.__getitem__),
                 "epochs": [{"epoch": e, "score": v, "metrics": {"accuracy": v}} for e, v in curve.items()]}
        rows["trial_user_attributes"] += [{"trial_id": trial_id, "key": k, "value_json": json.dumps(v)}
                                          for k, v in attrs.items()]
    with engine.begin() as conn:
        for table, values in rows.items():
            conn.execute(meta.tables[table].insert(), values)
    engine.dispose()
    storage.engine.dispose()


def time_calls(client, name: str, reps: int = 5) -> dict[str, float]:  # type: ignore[no-untyped-def]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings

    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{tmp}/scale.db"
        started = time.perf_counter()
        seed_study(url, "scale", args.trials)
        seeded = time.perf_counter() - started
        with TestClient(create_app(Settings(database_url=url, artifacts=Path(tmp) / "a"))) as client:
            timings = time_calls(client, "scale")
    lines = [f"# Dashboard API with {args.trials:,} trials", "",
             f"`python bench/dashboard_scale.py --trials {args.trials}` on {time.strftime('%Y-%m-%d %H:%M')}, "
             f"{'SQLite' if not args.database_url else args.database_url.split(':')[0]}, in-process client "
             f"(seeding took {seeded:.0f} s). Median of 5 calls:", "",
             "| call | seconds |", "|---|---:|", *[f"| {k} | {v:.3f} |" for k, v in timings.items()]]
    out = ROOT / "bench" / "results" / "dashboard.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
