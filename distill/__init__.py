"""How one trial trains: data, teacher logits, student, loss, loop, export."""

from distill.data import DataError, TextSplit, TokenizedSplit, length_bucketed_batches, load_split, tokenize
from distill.engine import (
    TRIAL_RECORD,
    DistillationEngine,
    PreparedStudy,
    TrialEngine,
    TrialOutcome,
    load_engine,
    resolve_device,
    save_checkpoint,
)
from distill.loss import distillation_loss
from distill.student import build_student, truncated_layer_indices
from distill.teacher import TeacherCache, build_or_load_cache, cache_key
from distill.train import EpochResult, TrainConfig, TrainResult, evaluate, train_student

__all__ = [
    "TRIAL_RECORD",
    "DataError",
    "DistillationEngine",
    "EpochResult",
    "PreparedStudy",
    "TeacherCache",
    "TextSplit",
    "TokenizedSplit",
    "TrainConfig",
    "TrainResult",
    "TrialEngine",
    "TrialOutcome",
    "build_or_load_cache",
    "build_student",
    "cache_key",
    "distillation_loss",
    "evaluate",
    "length_bucketed_batches",
    "load_engine",
    "load_split",
    "resolve_device",
    "save_checkpoint",
    "tokenize",
    "train_student",
    "truncated_layer_indices",
]
