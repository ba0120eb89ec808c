"""Task metrics, computed with scikit-learn and SciPy on the whole eval split once per epoch.

Every metric that fits the task is recorded; the study optimises the one its spec names. Correlations of a
constant prediction are undefined (SciPy returns NaN): they count as 0, no correlation, so an untrained student
scores worst instead of failing its trial.

**Degenerate students** (``degenerate_reason``): a student whose outputs carry (almost) nothing about the labels,
however its study's metric flatters it (on MRPC, predicting "equivalent" for every pair scores F1 0.81). A
classifier is degenerate when the Matthews correlation of its predictions with the labels is near 0, or when it
predicts one class for (nearly) every row while the labels are not so lopsided; a regression student when its
Pearson correlation with the targets is near 0, or its output is (nearly) constant. Each epoch is judged; the
trial's flag is its best epoch's.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from search_space import TaskInfo

# |MCC| or |Pearson| below this: the outputs say (almost) nothing about the labels. A real student of a GLUE task
# scores well above 0.2; an untrained or collapsed one within a few hundredths of 0.
CORRELATION_FLOOR = 0.05
# A classifier that predicts one class for at least this share of the eval rows, when that class is less common in
# the labels, has collapsed onto it (its MCC can creep just above the floor on a few lucky rows).
ONE_CLASS_SHARE = 0.99
# A regression output whose standard deviation is below this fraction of the targets' is (nearly) constant.
CONSTANT_OUTPUT_RATIO = 0.01


def _correlation(value: float) -> float:
    return 0.0 if math.isnan(value) else float(value)


def _regression_pairs(outputs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the model's scores, the gold targets), float64, from [N, 1] outputs."""
    return outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64), labels.astype(np.float64)


def _pearson(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Pearson's r; 0 for a constant input."""
    from scipy.stats import ConstantInputWarning, pearsonr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return _correlation(pearsonr(predictions, targets).statistic)


def compute_metrics(task: TaskInfo, outputs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Every metric of ``task.metrics`` for model ``outputs`` ([N, num_labels] logits) against gold ``labels``."""
    from scipy.stats import ConstantInputWarning, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    if task.is_regression:
        predictions, targets = _regression_pairs(outputs, labels)
        pearson = _pearson(predictions, targets)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
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


def degenerate_reason(task: TaskInfo, outputs: np.ndarray, labels: np.ndarray) -> str | None:
    """Why model ``outputs`` ([N, num_labels] logits) are degenerate against gold ``labels`` (module docstring),
    in words with the numbers: ``"it predicts 'equivalent' for 408 of 408 eval rows (MCC 0.00)"``; None when they
    are not."""
    from sklearn.metrics import matthews_corrcoef

    rows = len(outputs)
    if rows == 0:
        return None
    if task.is_regression:
        predictions, targets = _regression_pairs(outputs, labels)
        pearson = _pearson(predictions, targets)
        spread, target_spread = float(predictions.std()), float(targets.std())
        if spread <= CONSTANT_OUTPUT_RATIO * target_spread:
            return (f"its output is (nearly) constant: {predictions.mean():.4g} ± {spread:.2g} over {rows} eval "
                    f"rows, the targets' spread being {target_spread:.2g} (Pearson {pearson:.2f})")
        if abs(pearson) < CORRELATION_FLOOR:
            return f"its output does not correlate with the targets (Pearson {pearson:.2f} over {rows} eval rows)"
        return None
    predictions = outputs.argmax(-1)
    mcc = float(matthews_corrcoef(labels, predictions))
    counts = np.bincount(predictions, minlength=task.num_labels)
    top = int(counts.argmax())
    name = task.label_names[top] if top < len(task.label_names) else f"class {top}"
    predicted_share, gold_share = counts[top] / rows, float(np.mean(labels == top))
    one_class = predicted_share >= ONE_CLASS_SHARE and gold_share < ONE_CLASS_SHARE
    if one_class:
        return f"it predicts {name!r} for {counts[top]} of {rows} eval rows (MCC {mcc:.2f})"
    if abs(mcc) < CORRELATION_FLOOR:
        return (f"its predictions do not correlate with the labels (MCC {mcc:.2f}; it predicts {name!r} for "
                f"{counts[top]} of {rows} eval rows)")
    return None
