"""Prometheus metrics, computed from the database at scrape time: right with any number of API processes, and
nothing to keep in step (a worker's counters would die with it).

One scrape is a handful of aggregate queries (studies by status, trials by state, pending slots, workers) and one
read of finished trials' start and end times for the duration histogram.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from storage import StudyStatus, db_now, session_scope, store_census, trial_summaries, worker_status

TRIAL_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
BUILD_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 2400, 3600, 7200)
TRIAL_STATES = ("COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL")
WORKER_STATUSES = ("idle", "busy", "stopped", "lost")


def _histogram(name: str, documentation: str, values: list[float], buckets: tuple[int, ...]) -> HistogramMetricFamily:
    counts = [sum(1 for v in values if v <= bound) for bound in buckets]
    return HistogramMetricFamily(name, documentation,
                                 buckets=[*((str(b), c) for b, c in zip(buckets, counts, strict=True)),
                                          ("+Inf", len(values))],
                                 sum_value=sum(values))


class StoreCollector(Collector):
    """Every kdsearch metric, read from the shared store when Prometheus scrapes."""

    def __init__(self, db: Engine, grace_period_s: float) -> None:
        self.db = db
        self.grace_period_s = grace_period_s

    def collect(self) -> Iterator[GaugeMetricFamily | HistogramMetricFamily]:
        with session_scope(self.db) as session:
            now = db_now(session)  # heartbeats are stamped on the database's clock: judge them on it
            census = store_census(session)
            # Per-study series for running studies only: a finished study's would stay forever, one more label set
            # per study ever launched.
            running = [study for study in census.studies if study.status == StudyStatus.RUNNING]
            summaries = trial_summaries(session, [s.name for s in running])
        by_status = {status: 0 for status in StudyStatus.ALL}
        for study in census.studies:
            by_status[study.status] = by_status.get(study.status, 0) + 1
        pending = census.pending_slots

        gauge = GaugeMetricFamily("kdsearch_studies", "Studies by status", labels=["status"])
        for status, n in by_status.items():
            gauge.add_metric([status], n)
        yield gauge

        trials = GaugeMetricFamily("kdsearch_trials", "Optuna trials by state, per running study",
                                   labels=["study", "state"])
        for study in running:
            states = summaries[study.name][0]
            for state in TRIAL_STATES:
                trials.add_metric([study.name, state], states.get(state, 0))
        yield trials

        queue = GaugeMetricFamily("kdsearch_pending_slots", "Trial slots waiting for a worker, per running study",
                                  labels=["study"])
        for study in running:
            queue.add_metric([study.name], pending.get(study.id, 0))
        yield queue
        yield GaugeMetricFamily("kdsearch_queue_depth", "Trial slots waiting for a worker, all studies (queued ones "
                                "too)", value=sum(pending.values()))

        by_worker = {status: 0 for status in WORKER_STATUSES}
        for row in census.workers:
            status = worker_status(row, now, self.grace_period_s)
            by_worker[status] = by_worker.get(status, 0) + 1
        worker_gauge = GaugeMetricFamily("kdsearch_workers", "Workers by status (lost: stopped heart-beating)",
                                         labels=["status"])
        for status, n in by_worker.items():
            worker_gauge.add_metric([status], n)
        yield worker_gauge

        yield _histogram("kdsearch_trial_duration_seconds", "Wall time of finished (COMPLETE or PRUNED) trials",
                         census.trial_durations, TRIAL_BUCKETS)
        yield _histogram("kdsearch_teacher_cache_build_seconds",
                         "Wall time of preparations that built a teacher-logit cache or transfer set",
                         census.build_seconds, BUILD_BUCKETS)

        best = GaugeMetricFamily("kdsearch_best_value", "Best COMPLETE trial's value on the study's metric, per "
                                 "running study", labels=["study", "metric"])
        for study in running:
            value = summaries[study.name][1]
            if value is not None:
                best.add_metric([study.name, census.metrics.get(study.name) or ""], value)
        yield best
        yield GaugeMetricFamily("kdsearch_optuna_studies", "Studies in Optuna's schema (kdsearch's and others')",
                                value=census.n_optuna_studies)

