"""Task metrics, computed with scikit-learn and SciPy on the whole eval split once per epoch.

Every metric that fits the task is recorded; the study optimises the one its spec names. Correlations of a
constant prediction are undefined (SciPy returns NaN): they count as 0, no correlation, so an untrained student
scores worst instead of failing its trial.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from search_space import TaskInfo


def _correlation(value: float) -> float:
    return 0.0 if math.isnan(value) else float(value)


def compute_metrics(task: TaskInfo, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of ``task.metrics`` for model ``outputs`` ([N, num_labels] logits) against gold ``labels``."""
    from scipy.stats import ConstantInputWarning, pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.is_regression:
        predictions = outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64)
        targets = labels.astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            pearson = _correlation(pearsonr(predictions, targets).statistic)
            spearman = _correlation(spearmanr(predictions, targets).statistic)
        return {"pearson": pearson, "spearmanr": spearman, "pearson_spearman": (pearson + spearman) / 2}
    predictions = outputs.argmax(-1)
    all_labels = list(range(task.num_labels))
    out = {"accuracy": float(accuracy_score(labels, predictions))}
    if task.num_labels == 2:
        out["f1"] = float(f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0))
    out["macro_f1"] = float(f1_score(labels, predictions, labels=all_labels, average="macro", zero_division=0))
    out["matthews_correlation"] = float(matthews_corrcoef(labels, predictions))
    return out
