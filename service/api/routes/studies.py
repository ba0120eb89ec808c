"""Studies: launch, list, inspect, list trials, cancel, retry, delete."""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import datetime
from typing import Annotated, Any, Literal, cast

import optuna
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response, status
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from kdsearch.objectives import COST_BY_NAME, COSTS
from search_space import (
    SpecError,
    StudentSpec,
    StudySpec,
    TaskInfo,
    encoder_parameters,
    max_epochs,
    student_space,
    validate_spec,
    values_of,
)
from search_space.objectives import pareto_front
from search_space.schema import CostName
from service.api.deps import (
    TOKEN_RESPONSES,
    DbDep,
    OptunaStorageDep,
    SessionDep,
    SettingsDep,
    TokenDep,
    require_read_access,
)
from service.api.schemas import (
    BestTrial,
    EpochOut,
    ErrorOut,
    ExportOut,
    Importances,
    ParetoOut,
    ParetoPointOut,
    PrepareRetryOut,
    PreparingOut,
    SeedSpreadOut,
    StudentProfileOut,
    StudyDetailOut,
    StudyOut,
    StudySummary,
    TaskOut,
    TrialCounts,
    TrialOut,
    TrialPage,
    TrialPoint,
)
from service.notifier import host_allowed
from service.redaction import redact_webhook_url
from service.settings import Settings
from storage import (
    METRIC_ATTRS,
    NothingToRetryError,
    SlotState,
    StudyBusyError,
    StudyExistsError,
    StudyRow,
    StudyStatus,
    all_studies,
    best_trial,
    cancel_study,
    complete_trials,
    count_seed_runs,
    create_study,
    db_now,
    delete_study,
    ensure_optuna_study,
    get_study,
    latest_seed_spread,
    learning_curves,
    make_layout,
    optuna_study_exists,
    optuna_study_id,
    page_trial_ids,
    preparations,
    preparing,
    retry_study,
    slot_counts,
    study_fingerprint,
    study_metric,
    study_user_attrs,
    trial_points,
    trial_summaries,
)

log = logging.getLogger("kdsearch.api")
audit = logging.getLogger("kdsearch.audit")  # one line per destructive request: who, what, what it removed
router = APIRouter(prefix="/studies", tags=["studies"], dependencies=[Depends(require_read_access)],
                   responses={401: {"model": ErrorOut, "description": "Missing or wrong bearer token"}})
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorOut, "description": "No such study"}}


def spec_error(exc: SpecError) -> HTTPException:
    loc = ["body", *exc.field.split(".")]
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT,
                         [{"type": "value_error", "loc": loc, "msg": exc.message, "input": None}])


def check_limits(spec: StudySpec, settings: Settings) -> None:
    """The operator's caps (``KDSEARCH_MAX_*``) on what one study may ask for."""
    if spec.n_trials > settings.max_n_trials:
        raise SpecError("n_trials", f"at most {settings.max_n_trials} on this server")
    if spec.timeout_s is not None and spec.timeout_s > settings.max_timeout_s:
        raise SpecError("timeout_s", f"at most {settings.max_timeout_s:g} s on this server")
    if spec.dataset.max_seq_length > settings.max_seq_length:
        raise SpecError("dataset.max_seq_length", f"at most {settings.max_seq_length} on this server")
    if max(values_of(spec.search_space.batch_size)) > settings.max_batch_size:
        raise SpecError("search_space.batch_size", f"at most {settings.max_batch_size} on this server")
    if 1 in values_of(spec.search_space.predistilled):  # the pre-distillation's own caps, when it runs
        if spec.predistill.max_seq_length > settings.max_seq_length:
            raise SpecError("predistill.max_seq_length", f"at most {settings.max_seq_length} on this server")
        if spec.predistill.epochs > settings.max_epochs:
            raise SpecError("predistill.epochs", f"at most {settings.max_epochs} on this server")
    if spec.augment.copies > settings.max_augment_copies:
        raise SpecError("augment.copies", f"at most {settings.max_augment_copies} on this server")
    if max_epochs(spec.search_space) > settings.max_epochs:
        raise SpecError("search_space.num_train_epochs", f"at most {settings.max_epochs} on this server")
    if not settings.min_priority <= spec.priority <= settings.max_priority:
        raise SpecError("priority", f"within {settings.min_priority}..{settings.max_priority} on this server")
    if spec.student.config is not None:
        largest = student_space(spec.student).largest()
        params = encoder_parameters(largest)
        if params > settings.max_student_params:
            raise SpecError("student.config", f"its largest shape (num_hidden_layers {largest['num_hidden_layers']}, "
                                              f"hidden_size {largest['hidden_size']}, intermediate_size "
                                              f"{largest['intermediate_size']}) has {params:,} encoder parameters: "
                                              f"at most {settings.max_student_params:,} on this server")
    if spec.notify is not None and not host_allowed(spec.notify.webhook, settings.webhook_allowed_hosts):
        allowed = ", ".join(settings.webhook_allowed_hosts) or "none"
        raise SpecError("notify.webhook", f"this server only calls webhooks on the hosts in "
                                          f"KDSEARCH_WEBHOOK_ALLOWED_HOSTS ({allowed})")


def _summaries(session: Session, rows: list[StudyRow]) -> list[StudyOut]:
    optuna_side = trial_summaries(session, [r.name for r in rows])
    slots = slot_counts(session, [r.id for r in rows])
    attrs = study_user_attrs(session, [r.name for r in rows], list(METRIC_ATTRS))
    preps = preparations(session, [r.id for r in rows])
    now = db_now(session)  # started_at and progress stamps are the database's: so is this clock
    out = []
    for row in rows:
        states, best = optuna_side[row.name]
        counts = TrialCounts(
            complete=states.get("COMPLETE", 0),
            pruned=states.get("PRUNED", 0),
            running=states.get("RUNNING", 0),
            # Trials still to run: slots nobody has claimed yet. A WAITING Optuna trial (given back after an
            # infrastructure fault) is run by one of them, so it is not counted again.
            waiting=slots[row.id].get(SlotState.PENDING, 0),
            failed=states.get("FAIL", 0),
        )
        finished = counts.complete + counts.pruned
        elapsed = eta = None
        if row.started_at is not None:
            elapsed = ((row.finished_at or now) - row.started_at).total_seconds()
            if finished and row.status in StudyStatus.ACTIVE:
                eta = elapsed / finished * (row.n_trials - finished)
        prep = preps.get(row.id)
        under_way = preparing(prep, now) if row.status in StudyStatus.ACTIVE else None
        retry = None
        if prep is not None and prep.attempts and row.status in StudyStatus.ACTIVE:
            retry = PrepareRetryOut(attempts=prep.attempts, last_error=prep.last_error, retry_at=prep.retry_at)
        out.append(StudyOut(
            id=row.id, name=row.name, status=row.status, priority=row.priority, n_trials=row.n_trials,
            metric=study_metric(row.spec, attrs[row.name]), counts=counts, finished=finished,
            best_value=best, error=row.error,
            created_at=row.created_at, updated_at=row.updated_at, started_at=row.started_at,
            finished_at=row.finished_at, elapsed_s=elapsed, eta_s=eta,
            preparing=None if under_way is None else PreparingOut(**dataclasses.asdict(under_way)),
            prepare_retry=retry,
        ))
    return out


def _load(session: Session, id_or_name: str) -> StudyRow:
    row = get_study(session, id_or_name)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {id_or_name!r}")
    return row


def _fresh_snapshot(session: Session) -> None:
    """End the request's read transaction so it sees what was just committed through other sessions
    (SQLite's WAL keeps a reader on the snapshot it started with)."""
    session.commit()
    session.expire_all()


def _epoch_out(epoch: dict[str, Any]) -> EpochOut:
    """One recorded epoch; epochs recorded before task metrics existed held ``eval_accuracy`` alone."""
    legacy = {"accuracy": epoch["eval_accuracy"]} if "eval_accuracy" in epoch else {}
    # One of the two is always recorded (pydantic still rejects an epoch that holds neither).
    score = cast(float, epoch.get("score", epoch.get("eval_accuracy")))
    return EpochOut(epoch=epoch["epoch"], score=score,
                    metrics=epoch.get("metrics") or legacy, train_loss=epoch.get("train_loss"),
                    eval_loss=epoch.get("eval_loss"), seconds=epoch.get("seconds"),
                    degenerate=epoch.get("degenerate"))


def _objectives(row: StudyRow) -> list[str]:
    """The study's objectives as its spec gives them (studies from before objectives had the metric alone)."""
    return list(row.spec.get("objectives") or ["metric"])


def _cost_axis(row: StudyRow, cost: str | None) -> str:
    """The cost a front is computed on: as asked, else the study's second objective, else the registry's first
    (parameters)."""
    objectives = _objectives(row)
    return cost or (objectives[1] if len(objectives) > 1 else COSTS[0].name)


def _profile_out(profile: dict[str, Any] | None) -> StudentProfileOut | None:
    return None if profile is None else StudentProfileOut.model_validate(profile)


def _front(session: Session, study_id: int | None, cost: str) -> tuple[list[ParetoPointOut], list[ParetoPointOut]]:
    """The Pareto front (metric maximised, ``cost`` minimised) over COMPLETE trials with a profile, and the trials
    it dominates, each ascending cost; read in four queries, computed in one sort."""
    if study_id is None:
        return [], []
    axis = COST_BY_NAME[cost]
    trials = [{**t, "profile": profile} for t in complete_trials(session, study_id)
              if t["profile"] and (profile := json.loads(t["profile"])).get(cost) is not None]
    on_front = set(pareto_front((i, t["value"], axis.read(t["profile"])) for i, t in enumerate(trials)))
    points = [ParetoPointOut(number=t["number"], value=t["value"], cost=axis.read(t["profile"]),
                             metrics=json.loads(t["metrics"]) if t["metrics"] else {},
                             params=json.loads(t["params"]) if t["params"] else {},
                             profile=StudentProfileOut.model_validate(t["profile"]))
              for t in trials]
    points.sort(key=lambda p: (p.cost, -p.value, p.number))
    front_numbers = {trials[i]["number"] for i in on_front}
    return ([p for p in points if p.number in front_numbers], [p for p in points if p.number not in front_numbers])


def _trial_out(trial: FrozenTrial) -> TrialOut:
    attrs = trial.user_attrs
    epochs = [_epoch_out(e) for e in attrs.get("epochs", [])]
    if not epochs:
        epochs = [EpochOut(epoch=step, score=v) for step, v in sorted(trial.intermediate_values.items())]
    best_epoch = attrs.get("best_epoch")
    metrics = attrs.get("metrics") or next((e.metrics for e in epochs if e.epoch == best_epoch), {})
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    # FrozenTrial.value refuses a trial with several values: the metric is the first of them.
    value = trial.values[0] if trial.values and trial.state in (TrialState.COMPLETE, TrialState.PRUNED) else None
    return TrialOut(
        number=trial.number, state=trial.state.name, params=attrs.get("params", trial.params),
        value=value, values=trial.values if trial.state == TrialState.COMPLETE else None,
        profile=_profile_out(attrs.get("profile")), metrics=metrics,
        intermediate=dict(trial.intermediate_values), epochs=epochs, best_epoch=attrs.get("best_epoch"),
        duration_s=duration, worker=attrs.get("worker"), started_at=trial.datetime_start,
        completed_at=trial.datetime_complete, stop_reason=attrs.get("stop_reason"),
        fail_reason=attrs.get("fail_reason") or trial.system_attrs.get("fail_reason"),
        precision=attrs.get("precision"), degenerate=attrs.get("degenerate"),
    )


def name_taken(name: str) -> HTTPException:
    """The 409 for a name in use, with the ways out."""
    return HTTPException(status.HTTP_409_CONFLICT,
                         f"a study named {name!r} already exists: give this one another name (kdsearch submit "
                         f"--name), or delete the old one once it is not running (kdsearch delete {name}; "
                         f"DELETE /api/studies/{name}), or queue its failed trials again (kdsearch retry {name})")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyDetailOut, responses={
    400: {"model": ErrorOut, "description": "The body is not valid JSON"},
    409: {"model": ErrorOut, "description": "A study of that name exists"},
    413: {"model": ErrorOut, "description": "Request body too large"}, **TOKEN_RESPONSES,
})
def launch_study(spec: StudySpec, db: DbDep, optuna_storage: OptunaStorageDep, session: SessionDep,
                 settings: SettingsDep, _auth: TokenDep) -> StudyDetailOut:
    """Queue a study. Local paths are checked and made absolute; a pretrained student's tokenizer is compared
    with the teacher's (distillation needs identical token ids).

    A plain ``def``: FastAPI runs it in its thread pool, so loading tokenizers or waiting on a slow database write
    never stalls the event loop (every dashboard poll)."""
    from distill.data import check_data  # torch and datasets: imported when the app starts (init_state), not here

    try:
        check_limits(spec, settings)
        spec, task = validate_spec(spec, settings.allowed_roots)
        check_data(spec, task)  # the workers' reader on the data's first rows
    except SpecError as exc:
        raise spec_error(exc) from exc
    if get_study(session, spec.name) is not None or optuna_study_exists(optuna_storage, spec.name):
        raise name_taken(spec.name)
    try:
        row = create_study(db, name=spec.name, spec=spec.model_dump(mode="json"), n_trials=spec.n_trials,
                           priority=spec.priority, timeout_s=spec.timeout_s)
    except StudyExistsError as exc:
        raise name_taken(spec.name) from exc
    attrs: dict[str, Any] = {"kdsearch_spec": spec.model_dump(mode="json")}
    if task is not None:  # a local teacher: the task is known now; a worker records it for a hub teacher
        attrs["task"] = task.to_json()
    ensure_optuna_study(optuna_storage, spec.name, attrs, directions=spec.directions)
    _fresh_snapshot(session)
    return _detail(session, optuna_storage, row)


@router.get("", response_model=list[StudyOut])
def list_studies(session: SessionDep) -> list[StudyOut]:
    return _summaries(session, all_studies(session))


def _notes(task: TaskInfo | None, spec: dict[str, Any]) -> list[str]:
    """What the spec asked that the task ignores, or that fits the task poorly, and why."""
    notes = []
    if task is not None and task.ignored_params:
        names = ", ".join(task.ignored_params)
        notes.append(f"{names}: not searched and not used: a {task.type} study has no {names} (a value or range "
                     "given in the spec is ignored)")
    siamese = (spec.get("student") or {}).get("pair_encoding") == "siamese"
    if task is not None and task.num_labels > 2 and siamese:
        if StudentSpec.model_validate(spec["student"]).pair_features(task.num_labels) == "cosine":
            notes.append(f"student.pair_head cosine scores a pair by one cosine, so its {task.num_labels} classes lie "
                         "along one axis of similarity: classes that are not degrees of similarity (entailment, "
                         "neutral, contradiction) need pair_head interaction (the default for them) or the "
                         "cross-encoder (pair_encoding cross)")
        else:
            notes.append(f"student.pair_encoding siamese on {task.num_labels} classes: its head reads the two "
                         "sentences' encodings u and v as (cos, u, v, |u - v|, u * v) (pair_head interaction); the "
                         "cross-encoder (pair_encoding cross) reads the pair jointly and may suit classes that are not "
                         "degrees of similarity (entailment) better: a study of each compares them")
    return notes


def _shown_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the API shows it: the webhook URL redacted (the stored spec keeps it, for delivery)."""
    notify = spec.get("notify") or {}
    if not notify.get("webhook"):
        return spec
    return {**spec, "notify": {**notify, "webhook": redact_webhook_url(notify["webhook"])}}


def _detail(session: Session, storage: optuna.storages.RDBStorage, row: StudyRow) -> StudyDetailOut:
    summary = _summaries(session, [row])[0]
    attrs = study_user_attrs(session, [row.name], ["task", "teacher_metrics", "teacher_accuracy", "exports",
                                                   "teacher_profile"])[row.name]
    task = TaskInfo.from_json(attrs["task"]) if "task" in attrs else None
    objectives = _objectives(row)
    best_out = front = None
    if len(objectives) > 1:  # no one best trial: the front
        front, _ = _front(session, optuna_study_id(session, row.name), _cost_axis(row, None))
    elif summary.best_value is not None and (best := best_trial(session, row.name)) is not None:
        best_out = BestTrial(**dataclasses.asdict(best))
    # Studies recorded before task metrics held the teacher's accuracy alone.
    teacher_metrics = attrs.get("teacher_metrics") or (
        {"accuracy": attrs["teacher_accuracy"]} if "teacher_accuracy" in attrs else None)
    metric = summary.metric
    spread = latest_seed_spread(session, row.id)
    seed_retrain = None if spread is None else SeedSpreadOut(
        trial_number=spread.trial_number, metric=metric, seeds=spread.seeds, values=spread.values, mean=spread.mean,
        std=spread.std, best_seed=spread.best_seed)
    return StudyDetailOut(
        **summary.model_dump(), spec=_shown_spec(row.spec), best_trial=best_out,
        task=None if task is None else TaskOut(**task.to_json()), teacher_metrics=teacher_metrics,
        teacher_metric=(teacher_metrics or {}).get(metric or ""), notes=_notes(task, row.spec),
        seed_retrain=seed_retrain,
        exports=[ExportOut.model_validate(e) for e in attrs.get("exports", [])], objectives=objectives,
        constraints={k: v for k, v in (row.spec.get("constraints") or {}).items() if v is not None} or None,
        teacher_profile=_profile_out(attrs.get("teacher_profile")), front=front,
        shape_searched=StudySpec.model_validate(row.spec).student.searched)


@router.get("/{id_or_name}", response_model=StudyDetailOut, responses=NOT_FOUND)
def read_study(id_or_name: str, session: SessionDep, optuna_storage: OptunaStorageDep) -> StudyDetailOut:
    return _detail(session, optuna_storage, _load(session, id_or_name))


@router.get("/{id_or_name}/trials", response_model=TrialPage, responses=NOT_FOUND)
def list_trials(id_or_name: str, session: SessionDep, optuna_storage: OptunaStorageDep,
                offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                sort: Annotated[Literal["number", "value", "state", "started", "duration"], Query()] = "number",
                order: Annotated[Literal["asc", "desc"], Query()] = "asc",
                state: Annotated[Literal["COMPLETE", "PRUNED", "RUNNING", "WAITING", "FAIL"] | None, Query()] = None,
                since: Annotated[datetime | None, Query(description="only trials started, finished or running "
                                                                    "since then (incremental polling)")] = None,
                ) -> TrialPage:
    """Trials, paged and sorted in SQL."""
    row = _load(session, id_or_name)
    study_id = optuna_study_id(session, row.name)
    if study_id is None:
        return TrialPage(total=0, offset=offset, limit=limit, trials=[])
    total, ids = page_trial_ids(session, study_id, offset=offset, limit=limit, sort=sort,
                                descending=order == "desc", state=state, changed_since=since)
    return TrialPage(total=total, offset=offset, limit=limit,
                     trials=[_trial_out(optuna_storage.get_trial(trial_id)) for trial_id in ids])


@router.get("/{id_or_name}/summary", response_model=StudySummary,
            responses={**NOT_FOUND, 304: {"description": "Unchanged since the ETag given in If-None-Match"}})
def study_summary(id_or_name: str, session: SessionDep, optuna_storage: OptunaStorageDep, request: Request,
                  response: Response) -> StudySummary | Response:
    """The study page's data: the study, every trial's params and value, and every learning curve.

    Poll it with ``If-None-Match``: while nothing changed the answer is an empty 304.
    """
    row = _load(session, id_or_name)
    study_id = optuna_study_id(session, row.name)
    several = len(_objectives(row)) > 1  # epochs are in the trials' attributes, not Optuna's intermediate values
    fingerprint = study_fingerprint(session, study_id, from_epochs=several) if study_id is not None else "none"
    prep = preparations(session, [row.id]).get(row.id)
    prep_mark = f"{prep.updated_at.timestamp() if prep.updated_at else 0}.{prep.attempts}" if prep else "-"
    etag = f'"{row.status}.{row.updated_at.timestamp()}.{fingerprint}.{count_seed_runs(session, row.id)}.{prep_mark}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers={"ETag": etag})
    response.headers["ETag"] = etag
    detail = _detail(session, optuna_storage, row)
    points = trial_points(session, study_id) if study_id is not None else []
    curves = learning_curves(session, study_id, from_epochs=several) if study_id is not None else {}
    return StudySummary(study=detail, points=[TrialPoint(**p) for p in points], curves=curves,
                        elapsed_s=detail.elapsed_s, eta_s=detail.eta_s)


@router.get("/{id_or_name}/pareto", response_model=ParetoOut, responses=NOT_FOUND)
def pareto(id_or_name: str, session: SessionDep,
           cost: Annotated[CostName | None,
                           Query(description="the cost axis, a cost of GET /api/objectives (default: the study's "
                                             "second objective, else params)")]
           = None,
           dominated: Annotated[bool, Query(description="also list the trials off the front (the dashboard's chart "
                                                        "draws from this one answer, so front and the rest agree)")]
           = False) -> ParetoOut:
    """The Pareto front: COMPLETE trials no other trial beats on both the metric (higher) and the cost (lower),
    with their shapes, parameters, FLOPs, latency and KD hyperparameters; the teacher as the reference point.

    Any study has one (every trial records its student's profile); for a study with several objectives, on its
    second objective it is Optuna's ``best_trials``."""
    row = _load(session, id_or_name)
    axis = _cost_axis(row, cost)
    front, off_front = _front(session, optuna_study_id(session, row.name), axis)
    attrs = study_user_attrs(session, [row.name], [*METRIC_ATTRS, "teacher_metrics", "teacher_profile"])
    metric = study_metric(row.spec, attrs[row.name])
    teacher_metrics = attrs[row.name].get("teacher_metrics") or {}
    return ParetoOut(objectives=_objectives(row), metric=metric, cost=axis, n_complete=len(front) + len(off_front),
                     front=front, dominated=off_front if dominated else None,
                     teacher_metric=teacher_metrics.get(metric or ""),
                     teacher_profile=_profile_out(attrs[row.name].get("teacher_profile")))


@router.get("/{id_or_name}/importances", response_model=Importances, responses=NOT_FOUND)
def importances(id_or_name: str, session: SessionDep, optuna_storage: OptunaStorageDep) -> Importances:
    """Hyperparameter importances (Optuna's PED-ANOVA evaluator) over COMPLETE trials; cached per trial count."""
    row = _load(session, id_or_name)
    counts, _ = trial_summaries(session, [row.name])[row.name]
    return _importances(optuna_storage, row.name, counts.get("COMPLETE", 0))


_IMPORTANCE_CACHE: dict[tuple[str, int], Importances] = {}


def _importances(storage: optuna.storages.RDBStorage, name: str, n_complete: int) -> Importances:
    key = (name, n_complete)
    if key not in _IMPORTANCE_CACHE:
        values: dict[str, float] = {}
        if n_complete >= 2:
            study = optuna.load_study(study_name=name, storage=storage)
            try:
                # PED-ANOVA: Optuna's own evaluator, no scikit-learn needed, fast on thousands of trials; with
                # several objectives it scores the importance of reaching the Pareto front.
                values = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
            except Exception:  # a chart must never fail the page (logged)
                log.warning("importances for %s failed", name, exc_info=True)
                values = {}
        if len(_IMPORTANCE_CACHE) > 64:
            _IMPORTANCE_CACHE.clear()
        _IMPORTANCE_CACHE[key] = Importances(evaluator="ped-anova", n_trials=n_complete,
                                             importances={k: float(v) for k, v in values.items()})
    return _IMPORTANCE_CACHE[key]


@router.post("/{id_or_name}/cancel", response_model=StudyDetailOut, responses={**NOT_FOUND, **TOKEN_RESPONSES})
def cancel(id_or_name: str, db: DbDep, session: SessionDep, optuna_storage: OptunaStorageDep,
           _auth: TokenDep) -> StudyDetailOut:
    """No new trials start; running ones stop at their next epoch boundary."""
    row = _load(session, id_or_name)
    cancel_study(db, row.id)
    _fresh_snapshot(session)
    return _detail(session, optuna_storage, _load(session, str(row.id)))




def _client(request: Request) -> str:
    """Who made a request, for the audit line: the client's address."""
    return request.client.host if request.client else "unknown"


@router.post("/{id_or_name}/retry", response_model=StudyDetailOut, responses={
    **NOT_FOUND, **TOKEN_RESPONSES, 409: {"model": ErrorOut, "description": "No failed trial to retry"}})
def retry(id_or_name: str, request: Request, db: DbDep, session: SessionDep, optuna_storage: OptunaStorageDep,
          _auth: TokenDep) -> StudyDetailOut:
    """Queue the failed trials again (for a failed study, also the trials its failure stopped before they ran); the
    study is queued again when it had ended."""
    row = _load(session, id_or_name)
    try:
        queued = retry_study(db, row.id)
    except NothingToRetryError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    audit.info("RETRY study id=%d name=%r (was %s) by %s: %d trial slots queued again", row.id, row.name, row.status,
               _client(request), queued)
    _fresh_snapshot(session)
    return _detail(session, optuna_storage, _load(session, str(row.id)))


@router.delete("/{id_or_name}", status_code=status.HTTP_204_NO_CONTENT, responses={
    **NOT_FOUND, **TOKEN_RESPONSES,
    409: {"model": ErrorOut, "description": "The study is queued or running, or a trial still stops"}})
def delete(id_or_name: str, request: Request, db: DbDep, session: SessionDep, optuna_storage: OptunaStorageDep,
           settings: SettingsDep, _auth: TokenDep) -> Response:
    """Delete a study that is not running: its trial slots, its checkpoints, its Optuna study and its rows. Data
    caches shared with other studies stay. Its name can be used again."""
    row = _load(session, id_or_name)
    study_id = row.id
    _fresh_snapshot(session)
    try:
        deleted = delete_study(db, optuna_storage, make_layout(settings.artifacts, settings.local_cache, db), study_id)
    except StudyBusyError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    except LookupError as exc:  # deleted meanwhile by another request
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study {id_or_name!r}") from exc
    audit.info("DELETE study id=%d name=%r status=%s by %s: %d slots, %d checkpoints removed", deleted.study_id,
               deleted.name, deleted.status, _client(request), deleted.slots, deleted.artifacts)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
