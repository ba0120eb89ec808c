"""Response schemas (request bodies are ``search_space.StudySpec``); separate from the table models."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, create_model

from kdsearch.objectives import COSTS, ObjectiveInfo


class ErrorOut(BaseModel):
    detail: Any


class TrialCounts(BaseModel):
    complete: int = 0
    pruned: int = 0
    running: int = 0
    waiting: int = 0
    failed: int = 0


class BestTrial(BaseModel):
    number: int
    params: dict[str, Any]
    value: float  # the study's metric
    epoch: int | None
    metrics: dict[str, float] = {}  # every metric of the task at the best epoch, scored in fp32
    precision: str | None = None  # what the student's forward pass trained in: fp32 or bf16
    degenerate: str | None = None  # why its best epoch's outputs are degenerate (export-best refuses it); None: not


class _ProfileDetails(BaseModel):
    """What a profile records beside its costs: the shape and how the costs were measured."""

    shape: dict[str, int]  # num_hidden_layers, hidden_size, num_attention_heads, intermediate_size
    params_no_embeddings: int  # without the embedding tables
    flops_seq_len: int  # the eval split's median tokenized length
    latency_rows: int
    latency_passes: int
    latency_threads: int
    machine: str  # the CPU it was measured on
    host: str | None = None


def _cost_field(cost: ObjectiveInfo) -> tuple[Any, Any]:
    """A cost as a profile holds it (None in a profile recorded before kdsearch measured it)."""
    kind: Any = int if cost.is_count else float
    return kind | None, Field(None, description=f"{cost.title}, {cost.name} in a trial's profile")


if TYPE_CHECKING:
    StudentProfileOut = _ProfileDetails
else:
    # One field per cost of the registry (params, flops, latency_ms), as distill.profile measures them.
    StudentProfileOut = create_model(
        "StudentProfileOut", __base__=_ProfileDetails, __module__=__name__,
        __doc__="A student's (or the teacher's) cost, measured before training on the architecture "
                "(``distill.profile``): each cost of the registry (``GET /api/objectives``) under its name.",
        **{cost.name: _cost_field(cost) for cost in COSTS})


class MetricObjectiveOut(BaseModel):
    name: str  # "metric": a spec's first objective
    title: str
    direction: str  # maximize


class CostOut(BaseModel):
    """A cost of the registry (``search_space.objectives.ObjectiveInfo``), for a front end to name and format it."""

    name: str  # the second objective, the profile key and the pareto endpoint's ?cost=
    title: str
    direction: str  # minimize
    column: str
    short: str
    unit: str  # after a measured value ("ms"); empty for a count
    decimals: int  # 0: a count
    is_count: bool
    log_axis: bool
    limit_help: str
    measured: str
    extra_columns: list[list[str]]  # [column, profile key]
    flag: str  # its constraint: max_params
    option: str  # its export-best option: --max-params


class HyperparameterOut(BaseModel):
    """``GET /api/hyperparameters``: one hyperparameter a trial's row shows."""

    name: str
    symbol: str
    classification_only: bool


class ObjectivesOut(BaseModel):
    """``GET /api/objectives``: what a study can optimise: the metric, and the costs a Pareto front is drawn on."""

    metric: MetricObjectiveOut
    costs: list[CostOut]


class ParetoPointOut(BaseModel):
    """A trial on the Pareto front: no other COMPLETE trial has a metric at least as high at a cost at least as low
    (and is better on one of the two)."""

    number: int
    value: float  # the study's metric
    cost: float  # the front's cost axis: the profile's params, flops, latency_ms... (GET /api/objectives)
    metrics: dict[str, float] = {}  # every metric of the task at the trial's best epoch
    params: dict[str, Any]  # KD hyperparameters and the searched shape's dimensions
    profile: StudentProfileOut


class ParetoOut(BaseModel):
    """``GET /api/studies/{id}/pareto``: the non-dominated COMPLETE trials, metric (maximised) against a cost
    (minimised), ascending cost."""

    objectives: list[str]
    metric: str | None
    cost: str  # a cost of the registry: params, flops, latency_ms...
    n_complete: int  # COMPLETE trials with a profile: what the front was computed over
    front: list[ParetoPointOut]
    dominated: list[ParetoPointOut] | None = None  # the other trials counted in n_complete, when asked for
    teacher_metric: float | None  # the reference point: the teacher's metric and profile
    teacher_profile: StudentProfileOut | None


class TaskOut(BaseModel):
    """The task the teacher solves (read off its config) and the metric the study maximises."""

    type: str  # classification or regression
    num_labels: int
    metric: str
    metrics: list[str]  # every metric recorded each epoch
    label_names: list[str]
    ignored_params: list[str]  # search-space parameters that mean nothing for the task (not sampled)


class PreparingOut(BaseModel):
    """A preparation under way: the teacher labelling rows (``teacher_logits``) or the transfer set
    (``transfer_set``)."""

    stage: str
    done: int
    total: int
    rate: float | None  # rows per second so far
    eta_s: float | None  # (total - done) / rate: rows, rate and ETA are all as of updated_at
    updated_at: datetime
    age_s: float  # seconds since the worker reported them (on the database's clock)


class PrepareRetryOut(BaseModel):
    """Consecutive failed preparations that were nobody's data error; the study is retried, not failed."""

    attempts: int
    last_error: str | None
    retry_at: datetime | None


class StudyOut(BaseModel):
    id: int
    name: str
    status: str
    priority: int
    n_trials: int
    metric: str | None  # the metric the study maximises; None until a worker has read a hub teacher's config
    counts: TrialCounts
    finished: int
    best_value: float | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    elapsed_s: float | None = None  # since the first claim
    eta_s: float | None = None  # to the last trial, from the pace so far (computed here, not by clients)
    preparing: PreparingOut | None = None
    prepare_retry: PrepareRetryOut | None = None


class SeedSpreadOut(BaseModel):
    """The chosen configuration retrained with fresh seeds (``export-best --seeds N``)."""

    trial_number: int
    metric: str | None
    seeds: list[int]
    values: list[float]  # the study's metric, per seed
    mean: float
    std: float | None  # sample standard deviation; None for one seed
    best_seed: int


class VariantOut(BaseModel):
    """One exported form of the student, re-scored on the eval split and timed on the CPU."""

    file: str
    metrics: dict[str, float]
    ms_batch1: float  # per sequence
    ms_batch32: float


class DeploymentOut(BaseModel):
    """``export-best --onnx``: PyTorch fp32, ONNX fp32 and (``--quantize int8``) ONNX int8, and the teacher."""

    metric: str
    eval_rows: int
    threads: int
    machine: str
    latency_rows: dict[str, int]
    tolerance: dict[str, float]  # ONNX fp32 logits vs PyTorch's: numpy.allclose(atol, rtol)
    max_abs_logit_diff: float
    variants: dict[str, VariantOut]  # pytorch_fp32, onnx_fp32, onnx_int8
    teacher: dict[str, float] | None  # ms_batch1, ms_batch32 of the teacher in PyTorch
    int8_drop_points: float | None = None
    int8_flagged: bool | None = None  # int8 more than 1 point (metric x 100) below fp32


class ExportOut(BaseModel):
    trial_number: int
    seed: int
    out_dir: str
    exported_at: datetime
    deployment: DeploymentOut | None


class StudyDetailOut(StudyOut):
    spec: dict[str, Any]
    best_trial: BestTrial | None
    task: TaskOut | None  # None until known (a hub teacher: once a worker has loaded it)
    teacher_metrics: dict[str, float] | None  # the teacher on the eval split, every metric of the task
    teacher_metric: float | None  # the teacher on the study's metric: the reference line on the charts
    notes: list[str] = []  # what the spec asked that the task ignores, and why
    seed_retrain: SeedSpreadOut | None = None
    exports: list[ExportOut] = []  # export-best runs, latest per (trial, seed), with their ONNX deployment
    objectives: list[str] = ["metric"]  # ["metric"] or ["metric", a cost of GET /api/objectives]
    constraints: dict[str, float] | None = None  # max_<cost>: max_params... (single objective)
    teacher_profile: StudentProfileOut | None = None  # the teacher's size, FLOPs and latency, measured as a trial's
    front: list[ParetoPointOut] | None = None  # several objectives: the Pareto front (there is no one best trial)
    shape_searched: bool = False  # the student's shape is searched: trials differ in size, FLOPs and latency


class EpochOut(BaseModel):
    epoch: int
    score: float  # the study's metric
    metrics: dict[str, float] = {}
    train_loss: float | None = None
    eval_loss: float | None = None
    seconds: float | None = None
    degenerate: str | None = None  # why this epoch's eval outputs are degenerate; None: not (or not recorded)


class TrialOut(BaseModel):
    number: int
    state: str
    params: dict[str, Any]
    value: float | None
    metrics: dict[str, float]  # every metric of the task at the best epoch
    intermediate: dict[int, float]
    epochs: list[EpochOut]
    best_epoch: int | None
    duration_s: float | None
    worker: str | None
    started_at: datetime | None
    completed_at: datetime | None
    stop_reason: str | None
    fail_reason: str | None
    values: list[float] | None = None  # every objective's value (the metric, then the cost) of a COMPLETE trial
    profile: StudentProfileOut | None = None  # the student's shape, size, FLOPs and latency
    precision: str | None = None  # what the student's forward pass trained in: fp32 or bf16
    # Why its best epoch's eval outputs are degenerate (one class for every row, MCC or Pearson near 0:
    # distill.task_metrics), so export-best refuses it without --force; None: not (or trained before the check).
    degenerate: str | None = None


class TrialLogLineOut(BaseModel):
    """A line the worker logged about the trial (``service.trial_log``), on the worker's clock."""

    at: datetime
    level: str
    message: str


class ArtifactOut(BaseModel):
    """A file stored with the trial in the artifact store (Optuna's artifact metadata)."""

    artifact_id: str
    filename: str
    mimetype: str
    kind: str  # checkpoint (the trained student, what export-best reads) or other


class TrialDetailOut(TrialOut):
    """``GET /api/studies/{id}/trials/{number}``: one trial with what the trial page shows."""

    study: str
    metric: str | None
    log: list[TrialLogLineOut]  # empty for trials run before workers kept their lines
    artifacts: list[ArtifactOut]
    exports: list[ExportOut]  # export-best runs of this trial
    export_command: str | None  # the command that exports it; None without a stored checkpoint


class TrialPoint(BaseModel):
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    started_at: datetime | None
    completed_at: datetime | None
    profile: StudentProfileOut | None = None
    worker: str | None = None  # the worker that ran it (the timeline's rows)


class StudySummary(BaseModel):
    """Everything the study page draws, aggregated in SQL (one request, even for thousands of trials)."""

    study: StudyDetailOut
    points: list[TrialPoint]
    curves: dict[int, list[tuple[int, float]]]
    elapsed_s: float | None
    eta_s: float | None


class Importances(BaseModel):
    evaluator: str
    n_trials: int
    importances: dict[str, float]


class TrialPage(BaseModel):
    total: int
    offset: int
    limit: int
    trials: list[TrialOut]


class WorkerOut(BaseModel):
    id: str
    host: str
    pid: int
    device: str
    status: str
    current_study_id: int | None
    current_study_name: str | None = None
    current_trial_number: int | None
    heartbeat_at: datetime
    heartbeat_age_s: float


class Health(BaseModel):
    status: str
    database: str
    version: str
