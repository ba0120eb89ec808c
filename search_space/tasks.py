"""What a study optimises: the task its teacher solves and the metrics that fit it.

The task is read off the teacher's config, never declared twice: ``problem_type: "regression"`` or ``num_labels: 1``
makes a regression study (one output, float labels, MSE distillation, no temperature); anything else with
``num_labels >= 2`` a single-label classification study. Every metric is "higher is better", so every study
maximises.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from kdsearch.errors import UserError
from kdsearch.terms import classification_only_params

TaskType = Literal["classification", "regression"]
MetricName = Literal["accuracy", "f1", "macro_f1", "matthews_correlation", "pearson", "spearmanr",
                     "pearson_spearman"]

CLASSIFICATION_METRICS: tuple[str, ...] = ("accuracy", "f1", "macro_f1", "matthews_correlation")
REGRESSION_METRICS: tuple[str, ...] = ("pearson", "spearmanr", "pearson_spearman")
METRIC_NAMES: tuple[str, ...] = (*CLASSIFICATION_METRICS, *REGRESSION_METRICS)
METRIC_TITLES = {
    "accuracy": "accuracy", "f1": "F1", "macro_f1": "macro F1", "matthews_correlation": "Matthews correlation",
    "pearson": "Pearson", "spearmanr": "Spearman", "pearson_spearman": "mean of Pearson and Spearman",
}
# Each metric as the Hugging Face Hub's model-index names it (the `evaluate` metric id, with its arguments);
# pearson_spearman, their mean, has no Hub id: model cards state it in their text alone.
HUB_METRIC_IDS: dict[str, tuple[str, dict[str, str] | None]] = {
    "accuracy": ("accuracy", None), "f1": ("f1", {"average": "binary"}), "macro_f1": ("f1", {"average": "macro"}),
    "matthews_correlation": ("matthews_correlation", None), "pearson": ("pearsonr", None),
    "spearmanr": ("spearmanr", None),
}
# Search-space parameters that have no meaning for a task (the distillation terms' that need class probabilities,
# such as the temperature, for a regression head): not sampled, not shown.
IGNORED_PARAMS: dict[str, tuple[str, ...]] = {"classification": (), "regression": classification_only_params()}


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """The task a study's teacher solves, and the metric the study optimises."""

    type: TaskType
    num_labels: int
    metric: str
    label_names: tuple[str, ...] = ()  # id order; empty for regression

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric that fits the task (each epoch records them all)."""
        return fitting_metrics(self.type, self.num_labels)

    @property
    def ignored_params(self) -> tuple[str, ...]:
        return IGNORED_PARAMS[self.type]

    @property
    def is_regression(self) -> bool:
        return self.type == "regression"

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "num_labels": self.num_labels, "metric": self.metric,
                "metrics": list(self.metrics), "label_names": list(self.label_names),
                "ignored_params": list(self.ignored_params)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskInfo:
        return cls(data["type"], int(data["num_labels"]), data["metric"], tuple(data.get("label_names") or ()))


def fitting_metrics(task_type: str, num_labels: int) -> tuple[str, ...]:
    if task_type == "regression":
        return REGRESSION_METRICS
    # Binary F1 scores the positive class (id 1); with more classes only macro F1 means something.
    return tuple(m for m in CLASSIFICATION_METRICS if m != "f1" or num_labels == 2)


def default_metric(task_type: str) -> str:
    return "pearson" if task_type == "regression" else "accuracy"


def task_type_of(config: Any) -> TaskType:
    """``regression`` for a teacher whose config says so (or has one output), else ``classification``."""
    if getattr(config, "problem_type", None) == "regression" or int(config.num_labels) == 1:
        return "regression"
    return "classification"


class MetricMismatch(UserError):
    """The metric asked for does not fit the teacher's task.

    ``Fault.USER``: the spec's metric, or a teacher kdsearch cannot distil; the study fails with the reason. A
    ``ValueError`` still (through ``UserError``)."""


def resolve_task(config: Any, metric: str | None) -> TaskInfo:
    """The task of a teacher config, with ``metric`` (or the task's default) checked against it."""
    task_type = task_type_of(config)
    num_labels = int(config.num_labels)
    if task_type == "classification" and getattr(config, "problem_type", None) == "multi_label_classification":
        raise MetricMismatch("multi-label teachers (problem_type multi_label_classification) are not supported: "
                             "kdsearch distils single-label classification and regression")
    chosen = metric or default_metric(task_type)
    fitting = fitting_metrics(task_type, num_labels)
    if chosen not in fitting:
        kind = "regression" if task_type == "regression" else f"{num_labels}-class classification"
        raise MetricMismatch(f"{chosen!r} does not fit the teacher's task ({kind}); use one of {', '.join(fitting)}")
    names: tuple[str, ...] = ()
    if task_type == "classification":
        id2label = getattr(config, "id2label", None) or {}
        names = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels))
    return TaskInfo(task_type, num_labels, chosen, names)
