"""How one trial trains: data, teacher logits, student, loop, export (its loss terms: ``kdsearch.terms``)."""

from distill.augment import Augmenter
from distill.data import (
    DataError,
    TextSplit,
    TokenizedSplit,
    concat_splits,
    length_bucketed_batches,
    load_split,
    read_split,
    tokenize,
)
from distill.engine import (
    TRIAL_RECORD,
    DistillationEngine,
    PreparedStudy,
    TrialEngine,
    TrialOutcome,
    load_trial_engine,
    resolve_device,
    save_checkpoint,
)
from distill.models import load_teacher, split_revision
from distill.student import build_student, truncated_layer_indices
from distill.task_metrics import compute_metrics
from distill.teacher import TeacherCache, build_or_load_cache, cache_key, predict_logits
from distill.train import EpochResult, TrainConfig, TrainResult, evaluate, predict, train_student
from distill.transfer import TransferSet, build_or_load_transfer_set, transfer_key

__all__ = [
    "TRIAL_RECORD",
    "Augmenter",
    "DataError",
    "DistillationEngine",
    "EpochResult",
    "PreparedStudy",
    "TeacherCache",
    "TextSplit",
    "TokenizedSplit",
    "TrainConfig",
    "TrainResult",
    "TransferSet",
    "TrialEngine",
    "TrialOutcome",
    "build_or_load_cache",
    "build_or_load_transfer_set",
    "build_student",
    "cache_key",
    "compute_metrics",
    "concat_splits",
    "evaluate",
    "length_bucketed_batches",
    "load_split",
    "load_teacher",
    "load_trial_engine",
    "predict",
    "predict_logits",
    "read_split",
    "resolve_device",
    "save_checkpoint",
    "split_revision",
    "tokenize",
    "train_student",
    "transfer_key",
    "truncated_layer_indices",
]
