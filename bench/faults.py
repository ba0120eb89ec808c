"""Fault bench: three workers on PostgreSQL with S3 artifacts train real (tiny) students while the infrastructure
fails under them; count what was lost, run twice or spent on the infrastructure's faults.

    python bench/faults.py                  # 3 studies x 10 trials, 3 workers (run as root: it mounts a tmpfs)

During the run, one after the other:

- one worker's disk fills mid-study: that worker's ``TMPDIR`` (where a trial's checkpoint is staged) and
  ``KDSEARCH_LOCAL_CACHE`` are on a 16 MB tmpfs, filled with a file for ``--disk-full-s`` seconds;
- the bucket is unreachable for ``--bucket-down-s`` seconds: the workers reach moto's server (a real process)
  through a TCP proxy in this bench, whose pause closes its listener and drops every open connection; the second
  study is submitted as it goes away, so its trials train while no checkpoint can be stored;
- PostgreSQL restarts (``pg_ctlcluster ... stop``, ``--db-down-s`` seconds, ``start``) while a worker trains;
- a worker is SIGKILLed while it builds a teacher-logit cache (a study on a new dataset and a larger teacher is
  submitted mid-run; the worker the store records as preparing it is killed, and a new one started, as a
  supervisor would);
- once the studies end, ``kdsearch export-best --onnx --force`` is SIGKILLed as its first files appear, then run
  again: the second must succeed and leave a complete export (what the killed one left beside it is listed).

Counts: trials complete (target all), lost (0), run twice (0), budget overruns (0), attempts spent on infrastructure
faults (0: FAIL trials and slot attempts not caused by a SIGKILL), and files written outside their folders (0: every
path under the run's root, the bucket and the repository outside the places each process writes to). The SIGKILLed
trials and attempts are reported apart. Needs the local PostgreSQL, pg_ctlcluster and mount as root, and moto (the
dev extra). Writes bench/results/faults.md; exits 1 unless the verdict is PASS.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from kdsearch.testing import (  # noqa: E402 - after the path
    KDSEARCH,
    POSTGRES_ADMIN_URL,
    Stack,
    free_port,
    s3_server,
    tiny_spec,
    write_dataset,
    write_tiny_model,
)

BUCKET = "kdsearch-faults"
PREFIX = "faults"
DISK_HOST = "host-disk"
HOSTS = [DISK_HOST, "host-b", "host-c"]
# What the workers log when a fault reaches them (service/worker.py, storage, botocore's message).
GIVEN_BACK = "is the infrastructure's fault"
PREPARATION_FAILED = "preparation failed ("
NO_SPACE = os.strerror(errno.ENOSPC)
# The worker's outage message, and psycopg's connection errors (retried, or given back as a trial's fault).
DATABASE_UNREACHABLE = ("database unavailable", "OperationalError")
# botocore's EndpointConnectionError (connection refused) and ConnectionClosedError (dropped mid-request).
BUCKET_UNREACHABLE = ("Could not connect to the endpoint URL", "Connection was closed before we received")


class PausableProxy:
    """A TCP proxy on a loopback port in front of ``upstream`` (host, port). ``pause`` closes its listener and drops
    every open connection, so the endpoint refuses connections as an unreachable bucket does; ``resume`` listens on
    the same port again."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = free_port()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self.resume()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def resume(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def pause(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (close alone does not)
            listener.close()
        with self._lock:
            open_connections = list(self._connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)  # its pipe threads see the end and close it

    def close(self) -> None:
        self.pause()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # paused
            try:
                server = socket.create_connection(self.upstream, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._connections.update((client, server))
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)  # the other direction's thread ends too, and closes ``sink``
            with self._lock:
                self._connections.discard(source)
            source.close()


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``directory`` (needs root), unmounted afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"faults: cannot mount a tmpfs on {directory} (run as root): {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Write one file into ``directory`` until its file system is full; returns the file."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(chunk)
                out.flush()
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def write_big_teacher(directory: Path) -> Path:
    """A teacher (the tiny test model's vocabulary and tokenizer) large enough that labelling its transfer set takes
    seconds: 4 layers, hidden size 256."""
    from transformers import BertConfig, BertForSequenceClassification

    write_tiny_model(directory, seed=7)
    small = BertConfig.from_pretrained(directory)
    config = BertConfig(vocab_size=small.vocab_size, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024, max_position_embeddings=64, num_labels=2, id2label=small.id2label,
                        label2id=small.label2id, architectures=["BertForSequenceClassification"])
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def tree(directory: Path) -> set[Path]:
    """Every path under ``directory`` (links not followed)."""
    found: set[Path] = set()
    for parent, dirs, files in os.walk(directory):
        found.update(Path(parent) / name for name in [*dirs, *files])
    return found


def repo_untracked() -> set[str]:
    """The repository's untracked and ignored paths, caches left out."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    paths = {line[3:] for line in out.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if "__pycache__" not in p and ".mypy_cache" not in p and ".ruff_cache" not in p
            and ".pytest_cache" not in p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10, help="trials per study")
    parser.add_argument("--train-rows", type=int, default=500, help="training rows of the first two studies")
    parser.add_argument("--build-eval-rows", type=int, default=400,
                        help="evaluation rows of the mid-run study's data (its cache labels them with the training "
                             "rows: a longer build, where the kill lands, without longer trials)")
    parser.add_argument("--disk-full-s", type=float, default=20.0)
    parser.add_argument("--bucket-down-s", type=float, default=30.0)
    parser.add_argument("--db-down-s", type=float, default=5.0, help="seconds PostgreSQL stays stopped in its restart")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("faults: run as root (it mounts a tmpfs and restarts PostgreSQL)")
    # A SIGTERM (a background run stopped) unwinds like Ctrl-C: the processes stopped, the tmpfs unmounted.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="kdsearch-faults-") as tmp:
        run_root = Path(tmp)
        with s3_server(BUCKET, run_root / "moto.log") as aws, fresh_database() as db_url:
            run(args, run_root, aws, db_url)


@contextlib.contextmanager
def fresh_database() -> Iterator[str]:
    """A new database on the local PostgreSQL server (its URL), dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    db_name = f"kdfaults_{os.getpid()}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=db_name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))


def run(args: argparse.Namespace, run_root: Path, aws: dict[str, str], db_url: str) -> None:
    import httpx
    import optuna
    from optuna.trial import TrialState
    from sqlalchemy import create_engine, select
    from sqlalchemy.pool import NullPool

    from distill.hardware import load_1min, machine
    from storage import PreparationRow, StudyRow, TrialSlotRow

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    version = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else None
    if version is None:
        raise SystemExit("faults: needs the local PostgreSQL cluster (/etc/postgresql) to restart it")
    db = create_engine(db_url, poolclass=NullPool)
    load_start = load_1min()
    repo_before = repo_untracked()
    proxy = PausableProxy(("127.0.0.1", int(aws["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])))
    assets_dir = run_root / "assets"
    assets = {"teacher": write_tiny_model(assets_dir / "teacher", seed=1, layers=2),
              "data": write_dataset(assets_dir / "data", n_train=args.train_rows)}
    build_assets = {"teacher": write_big_teacher(assets_dir / "big-teacher"),
                    "data": write_dataset(assets_dir / "big-data", n_eval=args.build_eval_rows, seed=1)}
    hosts = {host: run_root / "hosts" / host for host in HOSTS}
    for directory in hosts.values():
        directory.mkdir(parents=True)
    (run_root / "api-tmp").mkdir()
    started = time.monotonic()
    timeline: list[str] = []

    def note(message: str) -> None:
        line = f"[{time.monotonic() - started:6.1f}s] {message}"
        timeline.append(line)
        print(line, flush=True)

    stack = Stack(db_url, run_root, KDSEARCH_ARTIFACTS=f"s3://{BUCKET}/{PREFIX}",
                  **{**aws, "AWS_ENDPOINT_URL": proxy.url}, KDSEARCH_ARTIFACT_KEY="faults-bench-signing-key",
                  KDSEARCH_POLL_INTERVAL="0.2", KDSEARCH_HEARTBEAT_INTERVAL="1", KDSEARCH_GRACE_PERIOD="15",
                  KDSEARCH_PROGRESS_INTERVAL="0.2", TMPDIR=str(run_root / "api-tmp"))
    host_of: dict[int, str] = {}
    killed_pids: set[int] = set()
    restarted_after_exit: list[str] = []
    events: Counter[str] = Counter()
    export_report: dict[str, Any] = {}
    # The first study trains as the disk fills, the second is submitted as the bucket goes away, the third (a new
    # dataset and teacher) mid-run for its cache build.
    names = [f"faults-{i}" for i in range(3)]
    with tmpfs(hosts[DISK_HOST], "16m") as disk:

        def start_worker(host: str) -> subprocess.Popen[bytes]:
            """A worker on ``host``: its own local cache and temporary directory (the disk host's on the tmpfs)."""
            (hosts[host] / "cache").mkdir(exist_ok=True)
            (hosts[host] / "tmp").mkdir(exist_ok=True)
            worker = stack.start_worker("--threads-per-proc", "1",
                                        env={"KDSEARCH_LOCAL_CACHE": str(hosts[host] / "cache"),
                                             "TMPDIR": str(hosts[host] / "tmp")})
            host_of[worker.pid] = host
            return worker

        def supervise() -> None:
            """Restart a worker that exited on its own (after repeated infrastructure faults), as a supervisor
            would; the bench's own kills are restarted where they happen."""
            for worker in list(stack.workers):
                if worker.poll() is not None and worker.pid not in killed_pids and worker.pid in host_of:
                    host = host_of.pop(worker.pid)
                    restarted_after_exit.append(f"pid {worker.pid} on {host} exited {worker.returncode}")
                    note(f"worker pid {worker.pid} on {host} exited {worker.returncode}: started another")
                    start_worker(host)

        def busy_trials() -> dict[int, dict[str, Any]]:
            """Live workers (by pid) the API lists as running a trial."""
            rows = httpx.get(f"{stack.url}/api/workers", timeout=30).json()
            return {w["pid"]: w for w in rows if w["status"] == "busy" and w["current_trial_number"] is not None}

        def wait_until(predicate: Any, timeout_s: float, what: str) -> bool:
            """Poll ``predicate`` (an API or database error while PostgreSQL restarts counts as not yet), restarting
            workers that exited; False after ``timeout_s``."""
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                supervise()
                try:
                    if predicate():
                        return True
                except Exception:  # noqa: BLE001 - the API or the database is briefly away
                    pass
                time.sleep(0.2)
            note(f"gave up waiting for {what} after {timeout_s:.0f} s")
            return False

        def hold(seconds: float) -> None:
            """Let a fault last ``seconds``, restarting workers that exit meanwhile."""
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                supervise()
                time.sleep(0.2)

        def submit(name: str, study_assets: dict[str, Path], **spec: Any) -> dict[str, Any]:
            return stack.submit(tiny_spec(study_assets, name=name, n_trials=args.trials, pruner="none",
                                          search_space={"num_train_epochs": {"low": 1, "high": 3}, "batch_size": 32,
                                                        "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
                                          **spec))

        def disk_host_trains() -> bool:
            return any(host_of.get(pid) == DISK_HOST for pid in busy_trials())

        try:
            stack.start_api()
            submit(names[0], assets)
            for host in HOSTS:
                start_worker(host)
            note(f"study {names[0]} submitted, {len(HOSTS)} workers started")

            # 1. One worker's disk fills while it trains (mid-study: the moment its worker is seen training).
            wait_until(disk_host_trains, 900, "the disk host's worker to train")
            filler = fill(disk)
            note(f"{DISK_HOST}'s disk full ({filler.stat().st_size // 1024} KiB filler)")
            hold(args.disk_full_s)
            filler.unlink()
            events["disk fills"] += 1
            note(f"{DISK_HOST}'s disk freed")

            # 2. The bucket is unreachable. The second study is submitted as it goes away, so that whatever the
            # host's speed, its trials train while no checkpoint can be stored.
            proxy.pause()
            submit(names[1], assets)
            note(f"bucket unreachable for {args.bucket_down_s:.0f} s; study {names[1]} submitted")
            hold(args.bucket_down_s)
            proxy.resume()
            events["bucket outages"] += 1
            note("bucket reachable again")

            # 3. PostgreSQL restarts while a worker trains, down long enough that every worker meets the outage.
            if not wait_until(lambda: bool(busy_trials()), 120, "a worker to train"):
                note("restarting PostgreSQL with no trial seen training")
            pg_ctl = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main"]
            subprocess.run([*pg_ctl, "stop"], check=True, capture_output=True)
            note(f"PostgreSQL stopped for {args.db_down_s:g} s")
            hold(args.db_down_s)
            subprocess.run([*pg_ctl, "start"], check=True, capture_output=True)
            events["PostgreSQL restarts"] += 1
            note("PostgreSQL started again")

            # 4. A worker is killed while it builds a teacher-logit cache.
            build_study = submit(names[-1], build_assets, priority=2)
            note(f"study {names[-1]} submitted (a new dataset and teacher: a cache build)")
            builder: list[int] = []

            def building() -> bool:
                with db.connect() as conn:
                    row = conn.execute(select(PreparationRow.worker_id).where(
                        PreparationRow.study_id == build_study["id"], PreparationRow.stage.is_not(None))).first()
                if row is None or row.worker_id is None:
                    return False
                pid = int(row.worker_id.split(":")[-2])
                if any(w.pid == pid and w.poll() is None for w in stack.workers):
                    builder.append(pid)
                    return True
                return False

            if wait_until(building, 300, f"a worker to build {names[-1]}'s cache"):
                victim = next(w for w in stack.workers if w.pid == builder[-1])
                killed_pids.add(victim.pid)
                victim.send_signal(signal.SIGKILL)
                victim.wait()
                events["workers SIGKILLed while building a cache"] += 1
                note(f"SIGKILLed worker pid {victim.pid} ({host_of[victim.pid]}) while it built the cache")
                start_worker(host_of[victim.pid])

            for name in names:
                wait_until(lambda name=name: stack.study(name)["status"] in ("finished", "failed", "cancelled"),
                           1800, f"study {name} to end")
            note("all studies ended")

            # 5. export-best is killed mid-way, then run again.
            export_report = kill_and_rerun_export(stack, names[0], run_root, KDSEARCH, note)
            events["export-best runs SIGKILLed"] += export_report["killed"]
        finally:
            stack.stop()
            proxy.close()
            run_tree = tree(run_root)  # the disk host's tmpfs still mounted
        elapsed = time.monotonic() - started
        logs = stack.worker_logs()

    # -- counting ------------------------------------------------------------------------------------------------
    killed_workers = {f":{pid}:" for pid in killed_pids}
    complete = lost = overruns = doubles = waiting = 0
    fail_by_kill: list[str] = []
    fail_by_fault: list[str] = []
    statuses: dict[str, str] = {}
    for name in names:
        trials = optuna.load_study(study_name=name, storage=db_url).get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        per_slot = Counter(t.user_attrs["slot"] for t in finished)
        complete += sum(t.state == TrialState.COMPLETE for t in trials)
        overruns += max(0, len(finished) - args.trials)
        doubles += sum(n - 1 for n in per_slot.values() if n > 1)
        lost += args.trials - len(per_slot)  # slots that never got a finished trial
        lost += sum(t.state == TrialState.COMPLETE and "checkpoint_artifact_id" not in t.user_attrs for t in trials)
        lost += sum(t.state == TrialState.RUNNING for t in trials)
        waiting += sum(t.state == TrialState.WAITING for t in trials)
        for t in trials:
            if t.state != TrialState.FAIL:
                continue
            reason = t.user_attrs.get("fail_reason") or t.system_attrs.get("fail_reason") or "?"
            # A SIGKILLed worker's trial is reaped for its stale heartbeat; any other FAIL was a fault's.
            by_kill = reason == "stale heartbeat" and any(k in t.user_attrs.get("worker", "") for k in killed_workers)
            (fail_by_kill if by_kill else fail_by_fault).append(f"{name} #{t.number}: {reason}")
    with db.connect() as conn:
        retries = conn.execute(select(TrialSlotRow.attempts)).scalars().all()
        for row in conn.execute(select(StudyRow.name, StudyRow.status, StudyRow.error)):
            statuses[row.name] = row.status + (f" ({row.error})" if row.error else "")
    db.dispose()
    slot_retries = sum(max(0, n - 1) for n in retries)
    kills_in_preparation = events["workers SIGKILLed while building a cache"]
    # A SIGKILLed worker's slot costs one attempt: its trial FAILs (stale heartbeat), or, killed before its trial
    # began (a cache build), the slot is reaped with none. Every other retry was spent on a fault.
    fault_attempts = slot_retries - len(fail_by_kill) - kills_in_preparation
    bucket_keys = _bucket_keys(aws)
    checkpoints = sum(k.startswith(f"{PREFIX}/optuna/") for k in bucket_keys)
    outside_bucket = [k for k in bucket_keys if not k.startswith((f"{PREFIX}/cache/", f"{PREFIX}/optuna/"))]
    outside = sorted(str(p.relative_to(run_root)) for p in run_tree if not _expected(p, run_root, hosts))
    outside += [f"s3://{BUCKET}/{k}" for k in outside_bucket]
    outside += [f"repo: {p}" for p in sorted(repo_untracked() - repo_before) if p != "bench/results/faults.md"]
    given_back = logs.count(GIVEN_BACK)
    preparations_failed = logs.count(PREPARATION_FAILED)
    errors = [line for line in logs.splitlines() if " ERROR " in line]
    disk_reached, bucket_reached = logs.count(NO_SPACE), sum(logs.count(text) for text in BUCKET_UNREACHABLE)
    db_reached = sum(any(text in line for text in DATABASE_UNREACHABLE) for line in logs.splitlines())

    rows: list[tuple[str, Any]] = [
        ("studies x trials", f"{len(names)} x {args.trials}"),
        ("study outcomes", "; ".join(f"{n}: {statuses.get(n, '?')}" for n in names)),
        ("trials complete", f"{complete} of {len(names) * args.trials}"),
        ("trials lost", lost),
        ("trials run twice", doubles),
        ("checkpoints in the bucket (one per complete trial; more: a stored trial trained again)", checkpoints),
        ("budget overruns", overruns),
        ("trials left WAITING", waiting),
        ("attempts spent on infrastructure faults: FAIL trials", len(fail_by_fault)),
        ("attempts spent on infrastructure faults: slot retries not caused by a SIGKILL", fault_attempts),
        ("files written outside their folders", len(outside)),
        ("disk fills / bucket outages / PostgreSQL restarts (injected)",
         f"{events['disk fills']} / {events['bucket outages']} / {events['PostgreSQL restarts']}"),
        ("trials given back untried after an infrastructure fault (worker log)", given_back),
        ("preparations that failed on a fault and were retried (worker log)", preparations_failed),
        (f"'{NO_SPACE}' / bucket connection errors in the worker logs",
         f"{disk_reached} / {bucket_reached}"),
        ("worker log lines on the database being unreachable", db_reached),
        ("workers that stopped after repeated faults (restarted)", len(restarted_after_exit)),
        ("workers SIGKILLed while building a cache", kills_in_preparation),
        ("FAIL trials of SIGKILLed workers (apart)", len(fail_by_kill)),
        ("export-best SIGKILLed mid-way", export_report.get("killed_when", "no")),
        ("export-best run again", export_report.get("rerun", "not run")),
        ("left beside the export and in its TMPDIR after the kill", ", ".join(export_report.get("beside", []))
         or "nothing"),
        ("left beside the export and in its TMPDIR after the rerun", ", ".join(export_report.get("after_rerun", []))
         or "nothing"),
        ("ERROR lines in the worker logs", len(errors)),
        ("wall time (s)", f"{elapsed:.0f}"),
    ]
    complete_ok = (complete == len(names) * args.trials and lost == doubles == overruns == 0
                   and checkpoints == complete)
    faults_ok = not fail_by_fault and fault_attempts == 0 and not outside
    export_ok = export_report.get("ok", False)
    exercised = (disk_reached > 0 and bucket_reached > 0 and db_reached > 0 and kills_in_preparation == 1
                 and export_report.get("killed", 0) == 1)
    verdict = "PASS" if complete_ok and faults_ok and export_ok and exercised else "FAIL"
    report = [
        "# Fault bench",
        "",
        f"`python bench/faults.py --trials {args.trials} --train-rows {args.train_rows} --build-eval-rows "
        f"{args.build_eval_rows} --disk-full-s {args.disk_full_s:g} --bucket-down-s {args.bucket_down_s:g} "
        f"--db-down-s {args.db_down_s:g}` "
        f"on {time.strftime('%Y-%m-%d %H:%M')}, on {machine()}, load (1 min) {load_start} at the start and "
        f"{load_1min()} at the end. PostgreSQL store; artifacts in an S3 bucket (moto's server as a real process, "
        "reached through a pausable TCP proxy), manifests signed; three workers (one process, one torch thread each) "
        "on three \"hosts\" with their own local caches and temporary directories; the real distillation engine on "
        "tiny BERT students (heartbeat 1 s, grace 15 s). The first study trains as one worker's disk fills, the "
        "second is submitted as the bucket goes away (so its trials train while no checkpoint can be stored, "
        "whatever the host's speed), the third, with a new dataset and a larger teacher, after PostgreSQL's "
        "restart, so that a worker can be killed while it builds its teacher-logit cache.",
        "",
        "| measure | value |",
        "|---|---:|",
        *[f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows],
        "",
        f"Verdict: **{verdict}** (must be: every trial complete, 0 lost, 0 run twice (one checkpoint per complete "
        "trial), 0 overruns, 0 attempts spent on infrastructure faults, 0 files outside their folders, the re-run "
        "export complete, and every fault must have reached a worker: the full disk, the unreachable bucket and the "
        "stopped database each in a worker's log, the cache-build kill and the export kill landed).",
        "",
        "Every run so far, and the cause of any that failed: [faults.notes.md](faults.notes.md) (kept by hand; a "
        "fault can land in a different step each run).",
        "",
        "## Timeline",
        "",
        *[f"    {line}" for line in timeline],
        *(["", "## FAIL trials not caused by a SIGKILL", "", *[f"- {r}" for r in fail_by_fault]]
          if fail_by_fault else []),
        *(["", "## FAIL trials of SIGKILLed workers", "", *[f"- {r}" for r in fail_by_kill]] if fail_by_kill else []),
        *(["", "## Files outside their folders", "", *[f"- `{p}`" for p in outside]] if outside else []),
        *(["", "## Workers that stopped on their own", "", *[f"- {r}" for r in restarted_after_exit]]
          if restarted_after_exit else []),
        *(["", "## First ERROR lines of the worker logs", "", *[f"    {line[:300]}" for line in errors[:10]]]
          if errors else []),
        "",
    ]
    out = ROOT / "bench" / "results" / "faults.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(report))
    print("\n".join(report))
    logs_copy = os.environ.get("KDSEARCH_FAULTS_KEEP_LOGS")
    if logs_copy:  # the worker logs, for a FAIL's post-mortem (the run's root is removed)
        Path(logs_copy).write_text(logs)
    sys.exit(0 if verdict == "PASS" else 1)


def kill_and_rerun_export(stack: Any, study: str, run_root: Path, kdsearch: list[str],
                          note: Any) -> dict[str, Any]:
    """SIGKILL ``export-best --onnx --force`` as its first files appear beside (or in) the target, then run it again;
    report whether the second succeeded with a complete export and what the killed run left beside it."""
    export_root = run_root / "export"
    export_tmp = run_root / "export-tmp"
    export_root.mkdir()
    export_tmp.mkdir()
    target = export_root / "model"
    command = [*kdsearch, "export-best", study, "--out", str(target), "--onnx", "--force"]
    env = {**stack.env, "TMPDIR": str(export_tmp)}
    report: dict[str, Any] = {"killed": 0}
    with open(run_root / "export.log", "ab") as log:
        first = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        started = time.monotonic()
        while first.poll() is None and not any(export_root.iterdir()):
            time.sleep(0.02)
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
            first.wait()
            written = sorted(str(p.relative_to(export_root)) for p in tree(export_root))
            report["killed"] = 1
            report["killed_when"] = (f"yes, {time.monotonic() - started:.1f} s in, with {len(written)} path(s) "
                                     f"written under the export folder")
            note(f"export-best SIGKILLed {time.monotonic() - started:.1f} s in ({', '.join(written[:6])})")
        else:
            note(f"export-best ended ({first.returncode}) before its first file could be seen: not killed")
        report["beside"] = leftovers(export_root, export_tmp, target)
        second = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    report["after_rerun"] = leftovers(export_root, export_tmp, target)
    problems = export_problems(target) if second.returncode == 0 else [f"exit {second.returncode}"]
    report["ok"] = not problems
    report["rerun"] = "succeeded, a complete export" if not problems else "FAILED: " + "; ".join(problems)
    note(f"export-best run again: {report['rerun']}")
    return report


def leftovers(export_root: Path, export_tmp: Path, target: Path) -> list[str]:
    """What lies beside the export target, and in the export's temporary folder (its ``TMPDIR``), each top-level
    entry with the number of files under it."""
    found = []
    for folder, entries in ((export_root, [p for p in export_root.iterdir() if p != target]),
                            (export_tmp, list(export_tmp.iterdir()))):
        for entry in sorted(entries):
            files = sum(p.is_file() for p in tree(entry)) if entry.is_dir() else 1
            found.append(f"{folder.name}/{entry.name} ({files} file{'s' if files != 1 else ''})")
    return found


def export_problems(target: Path) -> list[str]:
    """What is missing or wrong in an export: its files, a model that loads and gives finite logits, and ONNX on the
    card."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    problems = [f"no {name}" for name in ("config.json", "model.safetensors", "README.md", "tokenizer_config.json",
                                          "onnx/model.onnx") if not (target / name).is_file()]
    if problems:
        return problems
    model = AutoModelForSequenceClassification.from_pretrained(target).eval()
    tokenizer = AutoTokenizer.from_pretrained(target)
    with torch.no_grad():
        logits = model(**tokenizer(["a good movie"], return_tensors="pt")).logits
    if not torch.isfinite(logits).all():
        problems.append("non-finite logits")
    if "onnx" not in (target / "README.md").read_text().lower():
        problems.append("the card says nothing of ONNX")
    return problems


def _expected(path: Path, run_root: Path, hosts: dict[str, Path]) -> bool:
    """Whether a path under the run's root is one a process of the run was meant to write: the logs, the assets,
    each host's cache and temporary folders, the API's temporary folder, the export target and its temporary
    folder (what the killed export left beside the target is reported apart)."""
    rel = path.relative_to(run_root).parts
    if len(rel) == 1:
        return rel[0] in {"api.log", "export.log", "moto.log", "assets", "hosts", "api-tmp", "export",
                          "export-tmp"} or (rel[0].startswith("worker-") and rel[0].endswith(".log"))
    if rel[0] in ("assets", "api-tmp", "export-tmp"):
        return True
    if rel[0] == "export":
        return rel[1] == "model"
    if rel[0] == "hosts":
        return rel[1] in hosts and (len(rel) == 2 or rel[2] in ("cache", "tmp") or
                                    (rel[1] == DISK_HOST and rel[2] == "filler"))
    return False


def _bucket_keys(aws: dict[str, str]) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


if __name__ == "__main__":
    main()
