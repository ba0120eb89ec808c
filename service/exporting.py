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
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, inspect

from distill.engine import TRIAL_RECORD, load_engine
from distill.export import ExportError, model_card, normalized_record, write_export
from search_space import StudySpec, resolve_task
from service.settings import Settings
from storage import (
    SchemaMismatch,
    SeedSpread,
    check_schema,
    get_study,
    make_engine,
    make_layout,
    make_optuna_storage,
    record_seed_run,
    seed_runs,
    session_scope,
    unpack_directory,
    utcnow,
)


@dataclass
class ExportResult:
    out_dir: Path
    trial_number: int
    metric: str  # the study's metric
    score: float  # of the exported checkpoint, on the study's metric
    metrics: dict[str, float]  # every metric of the task, of the exported checkpoint
    spread: SeedSpread | None = None
    deployment: dict[str, Any] | None = None  # the ONNX variants, their metrics and latency (--onnx)


def _best_trial(study: optuna.Study) -> tuple[FrozenTrial, int]:
    """The best COMPLETE trial (best PRUNED one if none completed), and how many trials finished."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    candidates = [t for t in trials if t.value is not None and "checkpoint_artifact_id" in t.user_attrs]
    complete = [t for t in candidates if t.state == TrialState.COMPLETE]
    if not candidates:
        raise ExportError(f"study {study.study_name!r} has no finished trial with a checkpoint yet")
    # Every candidate has a value (filtered above).
    return max(complete or candidates, key=lambda t: cast(float, t.value)), len(trials)


def retrain_seeds(settings: Settings, db: Engine, study: optuna.Study, study_id: int, spec: StudySpec,
                  trial: FrozenTrial, n_seeds: int, device: str,
                  log: Callable[[str], None] = print) -> tuple[SeedSpread, dict[int, str]]:
    """Train ``trial``'s configuration with ``n_seeds`` fresh seeds from the cached data; seeds already recorded
    for this trial are reused. Returns the spread and each seed's checkpoint artifact id."""
    layout = make_layout(settings.artifacts, settings.local_cache, db)
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


QUANTIZATIONS = ("int8",)


def check_deploy_options(onnx: bool, quantize: str | None) -> None:
    """Refuse impossible ONNX options before any work (one-line ``ExportError``)."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ExportError(f"--quantize: {quantize!r} is not supported (choose {', '.join(QUANTIZATIONS)})")
    if quantize is not None and not onnx:
        raise ExportError(f"--quantize {quantize} quantizes the ONNX model: add --onnx")


def deploy_export(out_dir: Path, spec: StudySpec, record: dict[str, Any], quantize: str | None,
                  log: Callable[[str], None] = print, latency_rows: tuple[int, int] = (200, 512)) -> dict[str, Any]:
    """ONNX (and int8) beside the Hugging Face export in ``out_dir``, verified and timed on the study's eval split
    (``distill.deploy``)."""
    from transformers import AutoConfig, AutoTokenizer

    from distill import load_split, load_teacher, tokenize
    from distill.deploy import deploy

    task = resolve_task(AutoConfig.from_pretrained(out_dir), record["metric"])
    text = load_split(spec.dataset, spec.dataset.eval_split, task)
    split = tokenize(AutoTokenizer.from_pretrained(out_dir), text, spec.dataset.max_seq_length)
    teacher = None
    try:
        teacher = load_teacher(spec.teacher)[0]
    except Exception as exc:  # noqa: BLE001 - the teacher is only a latency reference
        log(f"teacher latency not measured: cannot load {spec.teacher} ({type(exc).__name__}: {exc})")
    return deploy(out_dir, eval_split=split, texts=text.texts, pairs=text.text_pairs, task=task, quantize=quantize,
                  teacher=teacher, max_length=spec.dataset.max_seq_length, latency_rows=latency_rows, log=log)


def _record_export(study: optuna.Study, entry: dict[str, Any]) -> None:
    """Keep the latest export of each (trial, seed) in the study's ``exports`` attribute (the API shows it)."""
    exports = [e for e in study.user_attrs.get("exports", [])
               if (e["trial_number"], e["seed"]) != (entry["trial_number"], entry["seed"])]
    study.set_user_attr("exports", [*exports, entry])


def export_best(settings: Settings, study: str, out_dir: Path, *, force: bool = False, seeds: int = 0,
                device: str = "auto", onnx: bool = False, quantize: str | None = None,
                log: Callable[[str], None] = print) -> ExportResult:
    check_deploy_options(onnx, quantize)
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:  # before any retraining, not after
        raise ExportError(f"{out_dir} is not empty; pass --force to overwrite")
    db = make_engine(settings.database_url)
    storage = make_optuna_storage(settings.database_url)
    try:
        if not inspect(db).has_table("kd_studies"):
            raise ExportError(f"no study {study!r}: {db.url.render_as_string()} holds no kdsearch studies")
        try:
            check_schema(db)
        except SchemaMismatch as exc:
            raise ExportError(str(exc)) from exc
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
        layout = make_layout(settings.artifacts, settings.local_cache, db)
        with tempfile.TemporaryDirectory(prefix="kdsearch-export-") as tmp:
            tar_path = Path(tmp) / "checkpoint.tar"
            optuna.artifacts.download_artifact(artifact_store=layout.checkpoints, file_path=str(tar_path),
                                               artifact_id=artifact_id)
            checkpoint = Path(tmp) / "checkpoint"
            unpack_directory(tar_path, checkpoint)
            record = normalized_record(json.loads((checkpoint / TRIAL_RECORD).read_text()))
            card_args: dict[str, Any] = dict(
                name=out_dir.resolve().name, spec=spec_json, record=record, trial_number=best.number,
                n_trials_run=n_trials_run, study_name=name,
                seed_results=dict(zip(spread.seeds, spread.values, strict=True)) if spread else None)
            write_export(checkpoint, out_dir, model_card(**card_args), force=force)
        deployment = None
        if onnx:  # the Hugging Face export is written first and stays, whatever happens here
            deployment = deploy_export(out_dir, StudySpec.model_validate(spec_json), record, quantize, log)
            (out_dir / "README.md").write_text(model_card(**card_args, deployment=deployment), encoding="utf-8")
        _record_export(optuna_study, {"trial_number": best.number, "seed": int(record["seed"]),
                                      "out_dir": str(out_dir.resolve()), "exported_at": utcnow().isoformat(),
                                      "deployment": deployment})
        return ExportResult(out_dir, best.number, record["metric"], float(record["score"]), record["metrics"], spread,
                            deployment)
    finally:
        db.dispose()
        storage.engine.dispose()
