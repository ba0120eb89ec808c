"""Progress of the long, once-per-study preparation steps: the teacher labelling the train and eval rows, then the
transfer set. An engine calls ``progress(stage, rows_done, rows_total)`` after every batch; the worker decides how
often to tell anyone (``service.preparation_progress``)."""

from __future__ import annotations

from collections.abc import Callable

TEACHER_STAGE = "teacher_logits"
TRANSFER_STAGE = "transfer_set"
PREDISTILL_STAGE = "predistill"  # pre-distilling a student shape (rows: corpus examples x epochs)

Progress = Callable[[str, int, int], None]  # (stage, rows done, rows total)
