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
    """A queued kdsearch study whose Optuna twin holds ``n_trials`` finished trials with epochs and params."""
    import optuna
    from optuna.distributions import FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from search_space import StudySpec
    from storage import create_study, make_engine, make_optuna_storage

    spec = StudySpec.model_validate({"name": name, "teacher": "owner/teacher", "student": {"model": "owner/student"},
                                     "dataset": {"hub": "glue", "config": "sst2"}, "n_trials": n_trials})
    engine = make_engine(db_url)
    from storage import init_db

    init_db(engine)
    create_study(engine, name=name, spec=spec.model_dump(mode="json"), n_trials=n_trials, priority=0, timeout_s=None)
    engine.dispose()
    storage = make_optuna_storage(db_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    dists = {"learning_rate": FloatDistribution(1e-5, 1e-3, log=True), "temperature": FloatDistribution(2, 30),
             "alpha": FloatDistribution(0, 1), "num_train_epochs": IntDistribution(2, 10)}
    rng = random.Random(seed)
    trials = []
    for number in range(n_trials):
        params = {"learning_rate": 10 ** rng.uniform(-5, -3), "temperature": rng.uniform(2, 30),
                  "alpha": rng.uniform(0, 1), "num_train_epochs": rng.randint(2, 10)}
        pruned = rng.random() < 0.3
        epochs = rng.randint(1, params["num_train_epochs"]) if pruned else params["num_train_epochs"]
        curve = {e: 0.5 + 0.3 * (1 - math.exp(-e / 3)) + rng.uniform(-0.02, 0.02) for e in range(1, epochs + 1)}
        trials.append(create_trial(
            state=TrialState.PRUNED if pruned else TrialState.COMPLETE, value=max(curve.values()), params=params,
            distributions=dists, intermediate_values=curve,
            user_attrs={"params": {**params, "batch_size": 128}, "worker": f"host:{number % 8}:cpu",
                        "best_epoch": max(curve, key=curve.__getitem__),
                        "epochs": [{"epoch": e, "eval_accuracy": v} for e, v in curve.items()]},
        ))
    study.add_trials(trials)
    storage.engine.dispose()


def time_calls(client, name: str, reps: int = 5) -> dict[str, float]:  # type: ignore[no-untyped-def]
    calls = {
        "GET /api/studies": "/api/studies",
        f"GET /api/studies/{name}": f"/api/studies/{name}",
        f"GET /api/studies/{name}/summary": f"/api/studies/{name}/summary",
        f"GET /api/studies/{name}/trials?limit=50&sort=value&order=desc":
            f"/api/studies/{name}/trials?limit=50&sort=value&order=desc",
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
