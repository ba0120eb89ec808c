"""export-best: find the study's best trial in the store, optionally retrain it over seeds, write the model directory.

Without ``seeds`` the best trial's own checkpoint is written out. With ``seeds=N`` its configuration is retrained
with N fresh seeds (``spec.seed + 1 .. spec.seed + N``: none is the seed the search scored, so the mean is not
inflated by the selection), each result recorded in ``kd_seed_runs`` with its checkpoint as it finishes (a rerun
resumes), and the best seed is exported with the mean and spread on its model card.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, inspect

from distill.engine import TRIAL_RECORD, load_engine
from distill.export import ExportError, model_card, normalized_record, write_export
from search_space import StudySpec
from service.settings import Settings
from storage import (
    ArtifactLayout,
    SeedSpread,
    get_study,
    make_engine,
    make_optuna_storage,
    record_seed_run,
    seed_runs,
    session_scope,
    unpack_directory,
)


@dataclass
class ExportResult:
    out_dir: Path
    trial_number: int
    metric: str  # the study's metric
    score: float  # of the exported checkpoint, on the study's metric
    metrics: dict[str, float]  # every metric of the task, of the exported checkpoint
    spread: SeedSpread | None = None


def _best_trial(study: optuna.Study) -> tuple[FrozenTrial, int]:
    """The best COMPLETE trial (best PRUNED one if none completed), and how many trials finished."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    candidates = [t for t in trials if t.value is not None and "checkpoint_artifact_id" in t.user_attrs]
    complete = [t for t in candidates if t.state == TrialState.COMPLETE]
    if not candidates:
        raise ExportError(f"study {study.study_name!r} has no finished trial with a checkpoint yet")
    return max(complete or candidates, key=lambda t: t.value), len(trials)  # type: ignore[arg-type,return-value]


def retrain_seeds(settings: Settings, db: Engine, study: optuna.Study, study_id: int, spec: StudySpec,
                  trial: FrozenTrial, n_seeds: int, device: str,
                  log: Callable[[str], None] = print) -> tuple[SeedSpread, dict[int, str]]:
    """Train ``trial``'s configuration with ``n_seeds`` fresh seeds from the cached data; seeds already recorded
    for this trial are reused. Returns the spread and each seed's checkpoint artifact id."""
    layout = ArtifactLayout(settings.artifacts)
    seeds = [spec.seed + k for k in range(1, n_seeds + 1)]
    with session_scope(db) as session:
        done = {seed: (row.eval_accuracy, row.checkpoint_artifact_id)
                for seed, row in seed_runs(session, study_id, trial.number).items()}
    params: dict[str, Any] = trial.user_attrs.get("params", trial.params)
    engine = None
    metric = (study.user_attrs.get("task") or {}).get("metric") or spec.metric or "accuracy"
    for seed in seeds:
        if seed in done:
            log(f"seed {seed}: already retrained, eval {metric} {done[seed][0]:.4f}")
            continue
        if engine is None:
            engine = load_engine(settings.engine, artifacts=layout, device=device, log=log)
            prepared = engine.prepare(spec)  # the study's cached teacher logits (and transfer set)
        with tempfile.TemporaryDirectory(prefix="kdsearch-seed-") as tmp:
            checkpoint = Path(tmp) / "checkpoint"
            outcome = engine.run_trial(prepared, params, seed, None, checkpoint)
            artifact_id = layout.store_checkpoint(checkpoint, study)
        with session_scope(db) as session:
            # The column predates task metrics: it holds the study's metric, whatever it is.
            record_seed_run(session, study_id=study_id, trial_number=trial.number, seed=seed,
                            eval_accuracy=outcome.best_score, best_epoch=outcome.best_epoch,
                            checkpoint_artifact_id=artifact_id)
        done[seed] = (outcome.best_score, artifact_id)
        log(f"seed {seed}: eval {metric} {outcome.best_score:.4f} (best epoch {outcome.best_epoch})")
    spread = SeedSpread(trial.number, seeds, [done[s][0] for s in seeds])
    return spread, {s: done[s][1] for s in seeds}


def export_best(settings: Settings, study: str, out_dir: Path, *, force: bool = False, seeds: int = 0,
                device: str = "auto", log: Callable[[str], None] = print) -> ExportResult:
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:  # before any retraining, not after
        raise ExportError(f"{out_dir} is not empty; pass --force to overwrite")
    db = make_engine(settings.database_url)
    storage = make_optuna_storage(settings.database_url)
    try:
        if not inspect(db).has_table("kd_studies"):
            raise ExportError(f"no study {study!r}: {db.url.render_as_string()} holds no kdsearch studies")
        with session_scope(db) as session:
            row = get_study(session, study)
            if row is None:
                raise ExportError(f"no study {study!r} in {settings.database_url}")
            study_id, name, spec_json = row.id, row.name, dict(row.spec)
        optuna_study = optuna.load_study(study_name=name, storage=storage)
        best, n_trials_run = _best_trial(optuna_study)
        spread, artifact_id = None, best.user_attrs["checkpoint_artifact_id"]
        if seeds:
            spread, artifacts = retrain_seeds(settings, db, optuna_study, study_id, StudySpec.model_validate(spec_json),
                                              best, seeds, device, log)
            artifact_id = artifacts[spread.best_seed]
        layout = ArtifactLayout(settings.artifacts)
        with tempfile.TemporaryDirectory(prefix="kdsearch-export-") as tmp:
            tar_path = Path(tmp) / "checkpoint.tar"
            optuna.artifacts.download_artifact(artifact_store=layout.checkpoints, file_path=str(tar_path),
                                               artifact_id=artifact_id)
            checkpoint = Path(tmp) / "checkpoint"
            unpack_directory(tar_path, checkpoint)
            record = normalized_record(json.loads((checkpoint / TRIAL_RECORD).read_text()))
            card = model_card(name=out_dir.resolve().name, spec=spec_json, record=record, trial_number=best.number,
                              n_trials_run=n_trials_run, study_name=name,
                              seed_results=dict(zip(spread.seeds, spread.values, strict=True)) if spread else None)
            write_export(checkpoint, out_dir, card, force=force)
        return ExportResult(out_dir, best.number, record["metric"], float(record["score"]), record["metrics"], spread)
    finally:
        db.dispose()
        storage.engine.dispose()
