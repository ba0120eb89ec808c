"""export-best: pick a trial of the study, optionally retrain it over seeds, write the model directory.

Which trial, in order: ``trial`` (``--trial N``); else the most accurate COMPLETE trial whose student is within every
limit given (``--max-params``, ``--max-flops``, ``--max-latency-ms``); else, for a single-objective study, the best
trial. A study with several objectives has no one best trial: without a selector it is refused with its Pareto front
listed.

A degenerate student (``distill.task_metrics.degenerate_reason``: its best epoch predicts one class for every row, or
its MCC or Pearson is near 0) is refused, naming why, unless ``force``: the checkpoint about to be written is judged,
the trial's own or, with ``seeds``, the best seed's. Exported with ``force``, its card carries a warning.

Without ``seeds`` the best trial's own checkpoint is written out. With ``seeds=N`` its configuration is retrained
with N fresh seeds (``spec.seed + 1 .. spec.seed + N``: none is the seed the search scored, so the mean is not
inflated by the selection), each result recorded in ``kd_seed_runs`` with its checkpoint as it finishes (a rerun
resumes), and the best seed is exported with the mean and spread on its model card.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import Engine, inspect

from distill.engine import TRIAL_RECORD, load_trial_engine
from distill.hub_model import (
    ExportError,
    check_export_target,
    fill_export,
    model_card,
    normalized_record,
    record_degenerate,
    staged_export,
    teacher_card_data,
)
from kdsearch.objectives import COST_BY_FLAG, COST_BY_NAME, COSTS
from search_space import StudySpec, resolve_task
from service.redaction import mask_database_url
from service.settings import Settings
from storage import (
    SchemaMismatch,
    SeedSpread,
    best_trials,
    check_schema,
    get_study,
    make_engine,
    make_layout,
    make_optuna_storage,
    missing_sqlite_file,
    record_seed_run,
    seed_runs,
    session_scope,
    study_metric,
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
    selection: str = "the best trial"  # how the trial was chosen, as the card says it
    degenerate: str | None = None  # why the exported checkpoint is degenerate (exported with force); None: it is not


@dataclass
class Selection:
    trial: FrozenTrial
    how: str  # "the best trial", "chosen with --trial", "the most accurate trial within --max-params 5,000,000"
    n_trials_run: int  # finished trials (COMPLETE and PRUNED)
    front: list[FrozenTrial] | None  # several objectives: the Pareto front it was chosen from


# Selector flag (max_params, ... : --max-params on the command line) → the profile key it limits; the registry's.
LIMIT_FLAGS = {cost.flag: cost.name for cost in COSTS}


def _metric(trial: FrozenTrial) -> float:
    """A finished trial's metric: its first value (``FrozenTrial.value`` refuses a trial with several)."""
    return cast(list[float], trial.values)[0]


def _limits_text(limits: dict[str, float]) -> str:
    return " and ".join(f"{COST_BY_FLAG[flag].option} {COST_BY_FLAG[flag].format(limit)}"
                        for flag, limit in limits.items())


def _cost(trial: FrozenTrial, key: str) -> float:
    """A measured trial's cost ``key`` (``params``...)."""
    return COST_BY_NAME[key].read(trial.user_attrs["profile"])


def _within(trial: FrozenTrial, limits: dict[str, float]) -> bool:
    profile = trial.user_attrs.get("profile")
    return profile is not None and all(profile.get(cost.name) is not None and cost.read(profile) <= limit
                                       for flag, limit in limits.items() if (cost := COST_BY_FLAG[flag]))


def cost_limits(max_costs: dict[str, float | None]) -> dict[str, float]:
    """The limits given (``max_params=...`` → ``{"max_params": 5e6}``), in the registry's order; a ``TypeError``
    for a keyword that is no cost's flag, as for any unknown keyword."""
    if unknown := sorted(set(max_costs) - set(LIMIT_FLAGS)):
        raise TypeError(f"no cost limit {', '.join(unknown)} (the registry's: {', '.join(LIMIT_FLAGS)})")
    return {flag: float(v) for flag in LIMIT_FLAGS if (v := max_costs.get(flag)) is not None}


def _options_text() -> str:
    """``--max-params N, --max-flops N or --max-latency-ms X``: every cost's export-best option."""
    options = [f"{cost.option} {'N' if cost.is_count else 'X'}" for cost in COSTS]
    return ", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0]


def describe_trial(trial: FrozenTrial, metric: str) -> str:
    """One line: number, metric, every cost and the shape (what the front listing and the card show)."""
    line = f"trial {trial.number}: {metric} {_metric(trial):.4f}"
    profile = trial.user_attrs.get("profile")
    if profile:
        shape = profile["shape"]
        costs = ", ".join(f"{cost.format(cost.read(profile))} {cost.unit or cost.short}" for cost in COSTS
                          if profile.get(cost.name) is not None)
        line += (f", {costs}; L{shape.get('num_hidden_layers')} H{shape.get('hidden_size')} "
                 f"A{shape.get('num_attention_heads')} I{shape.get('intermediate_size')}")
    return line


def select_trial(study: optuna.Study, *, trial_number: int | None = None, metric: str = "metric",
                 **max_costs: float | None) -> Selection:
    """The trial to export (module docstring for the order); ``ExportError`` when none fits, naming why.

    ``max_costs``: a limit per cost of the registry, by its flag (``max_params=5e6``, ``max_latency_ms=2``...)."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    candidates = [t for t in trials if t.values is not None and "checkpoint_artifact_id" in t.user_attrs]
    complete = [t for t in candidates if t.state == TrialState.COMPLETE]
    several = len(study.directions) > 1
    front = best_trials(study) if several else None
    limits = cost_limits(max_costs)
    if trial_number is not None:
        chosen = next((t for t in candidates if t.number == trial_number), None)
        if chosen is None:
            state = next((t.state.name for t in study.get_trials(deepcopy=False) if t.number == trial_number), None)
            raise ExportError(f"study {study.study_name!r} has no trial {trial_number}" if state is None else
                              f"trial {trial_number} is {state} without a checkpoint: nothing to export")
        if limits and not _within(chosen, limits):
            raise ExportError(f"trial {trial_number} is not within {_limits_text(limits)} "
                              f"({describe_trial(chosen, metric)})")
        return Selection(chosen, "chosen with --trial", len(trials), front)
    if limits:
        eligible = [t for t in complete if _within(t, limits)]
        if not eligible:
            measured = {flag: [t for t in complete if (t.user_attrs.get("profile") or {}).get(LIMIT_FLAGS[flag])
                               is not None] for flag in limits}
            smallest = [f"the smallest by {LIMIT_FLAGS[flag]}: "
                        + describe_trial(min(measured[flag], key=functools.partial(_cost, key=LIMIT_FLAGS[flag])),
                                         metric)
                        for flag in limits if measured[flag]] or ["no COMPLETE trial has a measured student"]
            raise ExportError(f"no COMPLETE trial of study {study.study_name!r} is within {_limits_text(limits)} "
                              f"({'; '.join(smallest)})")
        # The most accurate; among equals the cheaper (first limit's cost), then the earlier.
        first = LIMIT_FLAGS[next(iter(limits))]
        chosen = min(eligible, key=lambda t: (-_metric(t), _cost(t, first), t.number))
        return Selection(chosen, f"the most accurate trial within {_limits_text(limits)}", len(trials), front)
    if several:
        listing = "\n".join(f"  {describe_trial(t, metric)}" for t in front or [])
        cost = study.user_attrs.get("kdsearch_spec", {}).get("objectives", ["metric", "cost"])[-1]
        raise ExportError(
            f"study {study.study_name!r} has two objectives ({metric} and {cost}): there is no one best trial. "
            f"Choose from its Pareto front with --trial N, or the most accurate within a limit with "
            f"{_options_text()}. The front ({len(front or [])} trial"
            f"{'' if len(front or []) == 1 else 's'}, ascending {cost}):\n"
            + (listing or "  (empty: no COMPLETE trial yet)"))
    if not candidates:
        raise ExportError(f"study {study.study_name!r} has no finished trial with a checkpoint yet")
    best = [t for t in best_trials(study) if "checkpoint_artifact_id" in t.user_attrs]
    # The best trial (the best PRUNED one, by its last score, if none completed): every candidate has a value.
    return Selection(best[0] if best else max(candidates, key=_metric), "the best trial", len(trials), None)


def front_entry(trial: FrozenTrial) -> dict[str, Any]:
    """A front trial as the model card lists it."""
    return {"number": trial.number, "value": _metric(trial), "profile": trial.user_attrs.get("profile")}


def retrain_seeds(settings: Settings, db: Engine, study: optuna.Study, study_id: int, spec: StudySpec,
                  trial: FrozenTrial, n_seeds: int, device: str,
                  log: Callable[[str], None] = print) -> tuple[SeedSpread, dict[int, str]]:
    """Train ``trial``'s configuration with ``n_seeds`` fresh seeds from the cached data; seeds already recorded
    for this trial are reused. Returns the spread and each seed's checkpoint artifact id."""
    layout = make_layout(settings.artifacts, settings.local_cache, db, signing_key=settings.artifact_key)
    seeds = [spec.seed + k for k in range(1, n_seeds + 1)]
    with session_scope(db) as session:
        done = {seed: (row.best_score, row.checkpoint_artifact_id)
                for seed, row in seed_runs(session, study_id, trial.number).items()}
    params: dict[str, Any] = trial.user_attrs.get("params", trial.params)
    trial_engine = None
    metric = study_metric({"metric": spec.metric}, study.user_attrs) or "accuracy"
    for seed in seeds:
        if seed in done:
            log(f"seed {seed}: already retrained, eval {metric} {done[seed][0]:.4f}")
            continue
        if trial_engine is None:
            trial_engine = load_trial_engine(settings.engine, artifacts=layout, device=device, log=log,
                                             precision=settings.precision)
            prepared = trial_engine.prepare(spec)  # the study's cached teacher logits (and transfer set)
        with tempfile.TemporaryDirectory(prefix="kdsearch-seed-") as tmp:
            checkpoint = Path(tmp) / "checkpoint"
            outcome = trial_engine.run_trial(prepared, params, seed, None, checkpoint)
            artifact_id = layout.store_checkpoint(checkpoint, study)
        record_seed_run(db, study_id=study_id, trial_number=trial.number, seed=seed, best_score=outcome.best_score,
                        best_epoch=outcome.best_epoch, checkpoint_artifact_id=artifact_id)
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


def widget_example(spec_json: dict[str, Any]) -> str | None:
    """The first evaluation text of the study's own data, the card's widget example (None for a pair task, or
    where the data cannot be read here)."""
    from distill.data import DataError, read_split

    spec = StudySpec.model_validate(spec_json)
    if spec.dataset.text_pair_column:
        return None
    try:
        rows = read_split(spec.dataset, spec.dataset.eval_split)
        return str(rows[0][spec.dataset.text_column]) if len(rows) else None
    except (DataError, OSError, KeyError):
        return None


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


def check_finite_weights(checkpoint: Path, named: int = 5) -> None:
    """``ExportError`` when any weight of a checkpoint (its safetensors files) is NaN or infinite, naming the first
    ``named`` tensors and counting the values: such a model computes NaN, whatever score its trial recorded."""
    import torch
    from safetensors.torch import load_file

    bad: dict[str, int] = {}
    for path in sorted(checkpoint.glob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            if tensor.is_floating_point() and (count := int((~torch.isfinite(tensor)).sum())):
                bad[name] = count
    if bad:
        listed = ", ".join(f"{name} ({count:,})" for name, count in list(bad.items())[:named])
        raise ExportError(f"the checkpoint holds {sum(bad.values()):,} non-finite (NaN or infinite) weights in "
                          f"{len(bad)} tensor{'' if len(bad) == 1 else 's'}: {listed}"
                          f"{', ...' if len(bad) > named else ''}; refusing to export it")


def _record_export(study: optuna.Study, entry: dict[str, Any]) -> None:
    """Keep the latest export of each (trial, seed) in the study's ``exports`` attribute (the API shows it)."""
    exports = [e for e in study.user_attrs.get("exports", [])
               if (e["trial_number"], e["seed"]) != (entry["trial_number"], entry["seed"])]
    study.set_user_attr("exports", [*exports, entry])


def export_best(settings: Settings, study: str, out_dir: Path, *, force: bool = False, seeds: int = 0,
                device: str = "auto", onnx: bool = False, quantize: str | None = None,
                trial_number: int | None = None, log: Callable[[str], None] = print,
                **max_costs: float | None) -> ExportResult:
    """Export a study's trial (the best, ``trial_number``, or the most accurate within ``max_costs``: a limit per
    cost of the registry by its flag, ``max_params=...``; ``select_trial``)."""
    cost_limits(max_costs)  # an unknown keyword fails here, before any work
    check_deploy_options(onnx, quantize)
    out_dir = Path(out_dir)
    check_export_target(out_dir, force)  # before any retraining, not after
    if (missing := missing_sqlite_file(settings.database_url)) is not None:  # connecting would create it empty
        raise ExportError(f"no database at {settings.database_url} ({missing} does not exist); set "
                          "KDSEARCH_DATABASE_URL to the database the API and workers use")
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
                raise ExportError(f"no study {study!r} in {mask_database_url(settings.database_url)}")
            study_id, name, spec_json = row.id, row.name, dict(row.spec)
        optuna_study = optuna.load_study(study_name=name, storage=storage)
        metric = study_metric(spec_json, optuna_study.user_attrs) or "metric"
        selection = select_trial(optuna_study, trial_number=trial_number, metric=metric, **max_costs)
        best = selection.trial
        spread, artifact_id = None, best.user_attrs["checkpoint_artifact_id"]
        if seeds:
            spread, artifacts = retrain_seeds(settings, db, optuna_study, study_id, StudySpec.model_validate(spec_json),
                                              best, seeds, device, log)
            artifact_id = artifacts[spread.best_seed]
        layout = make_layout(settings.artifacts, settings.local_cache, db, signing_key=settings.artifact_key)
        # The whole export, ONNX included, is built in a fresh folder beside out_dir, then swapped in for it:
        # nothing of an earlier export is left behind, and no link in out_dir is written through.
        with staged_export(out_dir, force) as staging, tempfile.TemporaryDirectory(prefix="kdsearch-export-") as tmp:
            tar_path = Path(tmp) / "checkpoint.tar"
            optuna.artifacts.download_artifact(artifact_store=layout.checkpoints, file_path=str(tar_path),
                                               artifact_id=artifact_id)
            checkpoint = Path(tmp) / "checkpoint"
            unpack_directory(tar_path, checkpoint)
            check_finite_weights(checkpoint)
            record = normalized_record(json.loads((checkpoint / TRIAL_RECORD).read_text()))
            # The checkpoint exported is judged (a retrained seed may be degenerate where the trial was not).
            if (degenerate := record_degenerate(record)) and not force:
                what = f"trial {best.number}" + (f" retrained with seed {spread.best_seed}" if spread else "")
                raise ExportError(f"{what} is degenerate: {degenerate}; pass --force to export it anyway")
            card_args: dict[str, Any] = dict(
                name=out_dir.resolve().name, spec=spec_json, record=record, trial_number=best.number,
                n_trials_run=selection.n_trials_run, study_name=name,
                seed_results=dict(zip(spread.seeds, spread.values, strict=True)) if spread else None,
                selection=selection.how, profile=best.user_attrs.get("profile"),
                teacher_profile=optuna_study.user_attrs.get("teacher_profile"),
                front=None if selection.front is None else [front_entry(t) for t in selection.front],
                teacher_card=teacher_card_data(spec_json["teacher"]), widget_text=widget_example(spec_json))
            fill_export(checkpoint, staging, model_card(**card_args))
            deployment, deploy_error = None, None
            try:
                if onnx:
                    deployment = deploy_export(staging, StudySpec.model_validate(spec_json), record, quantize, log)
                    (staging / "README.md").write_text(model_card(**card_args, deployment=deployment), encoding="utf-8")
            except Exception as exc:  # noqa: BLE001 - the Hugging Face export goes in all the same (deploy removes onnx/)
                deploy_error = exc
        if deploy_error is not None:
            raise deploy_error
        _record_export(optuna_study, {"trial_number": best.number, "seed": int(record["seed"]),
                                      "out_dir": str(out_dir.resolve()), "exported_at": utcnow().isoformat(),
                                      "deployment": deployment})
        return ExportResult(out_dir, best.number, record["metric"], float(record["score"]), record["metrics"], spread,
                            deployment, selection.how, degenerate)
    finally:
        db.dispose()
        storage.engine.dispose()
