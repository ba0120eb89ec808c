"""The study page's API with thousands of trials: seed a study, time the calls the page makes.

    python bench/dashboard_scale.py             # 5,000 trials on SQLite; writes bench/results/dashboard.md
    python bench/dashboard_scale.py --trials 20000 --database-url postgresql+psycopg://...
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kdsearch.testing import time_calls  # noqa: E402 - after the path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=5000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings
    from service.testing import seed_study

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
