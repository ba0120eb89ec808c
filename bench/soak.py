"""Soak: many workers on PostgreSQL, random SIGKILLs and database restarts; count what was lost.

    python bench/soak.py                       # 6 workers, 4 studies, 4 kills, 2 PostgreSQL restarts
    python bench/soak.py --workers 16 --kills 10 --restarts 3
    python bench/soak.py --s3                  # 3 hosts: an S3 bucket (moto's server), own caches, skewed clocks

Trials run on the test engine (sleeps per epoch) so the soak exercises the queue, heartbeats, retries and
reconnects, not training. Needs the local PostgreSQL and, for restarts, pg_ctlcluster as root; ``--s3`` needs
moto (the dev extra) and Debian's faketime. Writes its section of bench/results/reliability.md (one per mode).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kdsearch.testing import (  # noqa: E402 - after the path
    POSTGRES_ADMIN_URL,
    Stack,
    s3_server,
    skewed_clock,
    tiny_spec,
    write_dataset,
    write_tiny_model,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--trials", type=int, default=25, help="trials per study")
    parser.add_argument("--kills", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--epoch-s", type=float, default=2.0, help="long enough that the events land mid-study")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--s3", action="store_true",
                        help="artifacts in an S3 bucket (moto's server), workers spread over 3 hosts with their own "
                             "local caches, one host's clock 120 s ahead and one 120 s behind (libfaketime)")
    args = parser.parse_args()
    with contextlib.ExitStack() as resources:
        aws = resources.enter_context(s3_server("kdsearch-soak", Path(tempfile.mkdtemp()) / "moto.log")) \
            if args.s3 else {}
        run(args, aws)


HOSTS = {"host-a": 0, "host-ahead": 120, "host-behind": -120}


def run(args: argparse.Namespace, aws: dict[str, str]) -> None:

    import optuna
    from optuna.trial import TrialState
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rng = random.Random(args.seed)
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    db_name = f"kdsoak_{os.getpid()}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = make_url(POSTGRES_ADMIN_URL).set(database=db_name).render_as_string(hide_password=False)
    version = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    started = time.monotonic()
    kills = restarts = kills_mid_trial = 0
    with tempfile.TemporaryDirectory(prefix="kdsearch-soak-") as tmp:
        root = Path(tmp)
        assets = {"teacher": write_tiny_model(root / "teacher"), "data": write_dataset(root / "data")}
        extra = {"KDSEARCH_ARTIFACTS": "s3://kdsearch-soak/soak", **aws} if args.s3 else {}
        stack = Stack(db_url, root, KDSEARCH_ENGINE="service.testing:SleepEngine",
                      KDSEARCH_TEST_EPOCH_S=str(args.epoch_s), KDSEARCH_POLL_INTERVAL="0.2",
                      KDSEARCH_HEARTBEAT_INTERVAL="1", KDSEARCH_GRACE_PERIOD="5", **extra)
        host_of: dict[int, str] = {}

        def start_worker(host: str) -> None:
            """A worker on ``host``: its own local cache and (with --s3) its own clock."""
            env = {"KDSEARCH_LOCAL_CACHE": str(root / host / "cache"),
                   **(skewed_clock(HOSTS[host]) if HOSTS[host] else {})} if args.s3 else {}
            host_of[stack.start_worker(env=env).pid] = host
        try:
            stack.start_api()
            names = [f"soak-{i}" for i in range(args.studies)]
            for i, name in enumerate(names):
                stack.submit(tiny_spec(assets, name=name, n_trials=args.trials, priority=i % 3,
                                       search_space={"num_train_epochs": {"low": 2, "high": 6}}, pruner="median"))
            for i in range(args.workers):
                start_worker(list(HOSTS)[i % len(HOSTS)])
            events = ["kill"] * args.kills + (["restart"] * args.restarts if version else [])
            rng.shuffle(events)
            for event in events:
                time.sleep(rng.uniform(3, 8))
                if event == "kill":
                    victim = pick_busy_worker(stack, rng)
                    kills_mid_trial += victim is not None
                    victim = victim or rng.choice([w for w in stack.workers if w.poll() is None])
                    victim.send_signal(signal.SIGKILL)
                    victim.wait()
                    start_worker(host_of.get(victim.pid, "host-a"))  # a supervisor would restart it
                    kills += 1
                    print(f"[{time.monotonic() - started:6.1f}s] killed worker pid {victim.pid}", flush=True)
                else:
                    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                                   check=True, capture_output=True)
                    restarts += 1
                    print(f"[{time.monotonic() - started:6.1f}s] restarted PostgreSQL", flush=True)
            for name in names:
                stack.wait_status(name, timeout_s=900)
            checkpoints = _bucket_objects(aws, "kdsearch-soak", "soak/optuna/") if args.s3 else None
            elapsed = time.monotonic() - started
            lost = overruns = doubles = finished_total = failed_total = stale_reaped = 0
            for name in names:
                trials = optuna.load_study(study_name=name, storage=db_url).get_trials(deepcopy=False)
                finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
                per_slot = Counter(t.user_attrs["slot"] for t in finished)
                finished_total += len(finished)
                failed_total += sum(t.state == TrialState.FAIL for t in trials)
                stale_reaped += sum(t.system_attrs.get("fail_reason") == "stale heartbeat" for t in trials)
                overruns += max(0, len(finished) - args.trials)
                doubles += sum(n - 1 for n in per_slot.values() if n > 1)
                lost += args.trials - len(per_slot)  # slots that never got a finished trial
                lost += sum(t.state == TrialState.COMPLETE and "checkpoint_artifact_id" not in t.user_attrs
                            for t in trials)
                lost += sum(t.state == TrialState.RUNNING for t in trials)
                for t in trials:  # what was lost, named, so a FAIL can be traced in the worker logs
                    if t.state == TrialState.RUNNING or (t.state == TrialState.COMPLETE
                                                         and "checkpoint_artifact_id" not in t.user_attrs):
                        print(f"lost: study {name} trial {t.number} (id {t._trial_id}) {t.state.name}, params "
                              f"{t.params}, user attrs {sorted(t.user_attrs)}, started {t.datetime_start}",
                              flush=True)
            logs = stack.worker_logs()
            (ROOT / "bench" / ".cache").mkdir(parents=True, exist_ok=True)
            (ROOT / "bench" / ".cache" / "soak-worker.log").write_text(logs)  # the last soak's, for tracing
            errors = [line for line in logs.splitlines() if " ERROR " in line]
            if errors:
                print(f"{len(errors)} ERROR lines in the worker logs; the first: {errors[:3]}", flush=True)
        finally:
            stack.stop()
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
    rows = [
        ("workers (started, incl. replacements)", args.workers + kills),
        ("studies x trials", f"{args.studies} x {args.trials}"),
        ("finished trials (COMPLETE + PRUNED)", finished_total),
        ("kills of a worker in the middle of a trial", kills_mid_trial),
        ("FAIL trials (killed mid-trial or cut by a restart, all retried)", failed_total),
        ("SIGKILLs injected", kills),
        ("PostgreSQL restarts", restarts),
        ("trials lost", lost),
        ("budget overruns", overruns),
        ("double runs", doubles),
        ("'too many clients' errors", logs.count("too many clients")),
        ("trials reaped for a stale heartbeat (at most one per mid-trial kill)", stale_reaped),
        *([("checkpoints in the bucket", checkpoints)] if args.s3 else []),
        ("wall time (s)", f"{elapsed:.0f}"),
    ]
    table = ["| measure | value |", "|---|---:|", *[f"| {k} | {v} |" for k, v in rows]]
    exact = lost == overruns == doubles == 0 and finished_total == args.studies * args.trials
    exact = exact and stale_reaped <= kills_mid_trial  # a skewed clock must never make a healthy trial look stale
    exercised = failed_total > 0 or args.kills == 0  # a soak whose kills all missed proves nothing
    verdict = "PASS" if exact and exercised else "FAIL"
    mode = "s3" if args.s3 else "local"
    setting = ("artifacts in an S3 bucket (moto's server as a real process), the workers spread over 3 hosts with "
               "their own local caches, one host's clock 120 s ahead and one 120 s behind (libfaketime)"
               if args.s3 else "artifacts in one local directory, one host")
    report = [
        f"<!-- soak:{mode} -->",
        f"## {'Three hosts, skewed clocks, S3' if args.s3 else 'One host'}",
        "",
        f"`python bench/soak.py --workers {args.workers} --studies {args.studies} --trials {args.trials} "
        f"--kills {args.kills} --restarts {args.restarts} --epoch-s {args.epoch_s}{' --s3' if args.s3 else ''}` "
        f"on {time.strftime('%Y-%m-%d %H:%M')}: PostgreSQL store, {setting}; test engine sleeping {args.epoch_s} s "
        "per epoch, heartbeat 1 s, grace 5 s.",
        "",
        *table,
        "",
        f"Verdict: **{verdict}** (must be: 0 lost, 0 overruns, 0 double runs, every study exactly n_trials, no more "
        "trials reaped than kills landed mid-trial, and at least one kill must have interrupted a trial).",
        f"<!-- /soak:{mode} -->",
    ]
    write_section(ROOT / "bench" / "results" / "reliability.md", mode, report)
    print("\n".join(report))
    sys.exit(0 if verdict == "PASS" else 1)


def write_section(path: Path, mode: str, lines: list[str]) -> None:
    """Replace this mode's section of the report, keeping the other modes' runs."""
    old = path.read_text() if path.is_file() else ""
    start, end = f"<!-- soak:{mode} -->", f"<!-- /soak:{mode} -->"
    if start in old and end in old:
        head, rest = old.split(start, 1)
        new = head + "\n".join(lines) + rest.split(end, 1)[1]
    elif old.startswith("# Reliability soak") and "<!-- soak:" not in old:
        # The single-mode report of earlier releases: its run becomes the local section.
        body = old.split("\n", 2)[2] if old.count("\n") >= 2 else ""
        legacy = ["<!-- soak:local -->", "## One host", "", body.strip(), "<!-- /soak:local -->"]
        new = "# Reliability soak\n\n" + "\n".join(legacy) + "\n\n" + "\n".join(lines) + "\n"
        if mode == "local":
            new = "# Reliability soak\n\n" + "\n".join(lines) + "\n"
    else:
        new = (old.rstrip() + "\n\n" if old else "# Reliability soak\n\n") + "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)


def _bucket_objects(aws: dict[str, str], bucket: str, prefix: str) -> int:
    import boto3

    client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sum(len(page.get("Contents", [])) for page in pages)


def pick_busy_worker(stack, rng: random.Random, wait_s: float = 15):  # type: ignore[no-untyped-def]
    """A live worker process that the store lists as running a trial (None if none turns up in time)."""
    import httpx

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        busy = {w["pid"] for w in httpx.get(f"{stack.url}/api/workers", timeout=30).json() if w["status"] == "busy"}
        candidates = [w for w in stack.workers if w.poll() is None and w.pid in busy]
        if candidates:
            return rng.choice(candidates)
        time.sleep(0.5)
    return None


if __name__ == "__main__":
    main()
