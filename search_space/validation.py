"""Cheap checks made before a study is queued, so a user hears of a bad spec at once, not from a worker.

Local paths are made absolute (workers may run from another directory). Hub ids are left as they are: whether
they exist is only known online, and a worker that cannot load them fails the study with the reason; on an offline
server (``HF_HUB_OFFLINE``) one must be in its Hugging Face cache. A local dataset's split files, columns and first
rows' labels are read with the workers' own reader, by ``distill.data.check_data`` (the API calls it after these).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from search_space.errors import SpecError
from search_space.schema import StrChoices, StudySpec
from search_space.shapes import student_space, teacher_dims
from search_space.tasks import MetricMismatch, TaskInfo, resolve_task

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A hub model id: owner/name, optionally @revision (branch, tag or commit).
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(@[A-Za-z0-9_./-]{1,100})?$")
DATA_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json", ".parquet")
# Sentences that exercise casing, punctuation, numbers, accents and word pieces.
TOKENIZER_PROBES = (
    "A gorgeous, witty, seductive movie.",
    "It's not THAT bad -- 3 1/2 stars out of 5!",
    "the film's unhurried pace is démodé yet oddly mesmerizing",
    "unbelievably overwrought and self-indulgent",
)


def looks_local(ref: str) -> bool:
    """A reference is a local path if it exists or is written like one (not like ``owner/name``)."""
    return ref.startswith(("/", ".", "~")) or HUB_ID.match(ref) is None or os.path.lexists(ref)


def _inside_roots(field: str, ref: str, roots: Sequence[Path] | None) -> Path:
    """The real path (symlinks followed) of ``ref``, which must lie under one of ``roots`` (None: anywhere)."""
    try:
        real = Path(ref).expanduser().resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL bytes, symlink loops, unknown ~user
        raise SpecError(field, f"not a usable path: {exc}") from exc
    if roots is not None and not _under(real, roots):
        raise SpecError(field, f"{ref!r} resolves to {real}{_resolved_from(ref)}, outside the allowed roots "
                               f"({_shown(roots)}); "
                               "set KDSEARCH_ALLOWED_ROOTS to allow more, or give a hub id owner/name")
    return real


def _resolved_from(ref: str) -> str:
    """Said of a path that was not found or not allowed: a relative one is resolved from this server's working
    directory, not from where its user stands (``kdsearch submit`` sends absolute paths)."""
    if Path(ref).expanduser().is_absolute():
        return ""
    return f" (a relative path, resolved from the server's working directory {Path.cwd()})"


def _under(real: Path, roots: Sequence[Path]) -> bool:
    return any(real.is_relative_to(root.expanduser().resolve()) for root in roots)


def _shown(roots: Sequence[Path]) -> str:
    return ", ".join(str(r) for r in roots)


def _check_model_files(field: str, ref: str, directory: Path, roots: Sequence[Path] | None) -> None:
    """Every entry of a model directory (config, weights, tokenizer files: whatever ``from_pretrained`` may read)
    must resolve under ``roots`` too: a folder inside them could hold a link to weights or a config anywhere."""
    if roots is None:
        return
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise SpecError(field, f"cannot list {ref!r}: {exc.strerror}") from exc
    for entry in entries:
        try:
            real = entry.resolve()
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise SpecError(field, f"{ref!r} holds {entry.name!r}, not a usable path: {exc}") from exc
        if not _under(real, roots):
            raise SpecError(field, f"{ref!r} holds {entry.name!r}, which resolves to {real}, outside the allowed "
                                   f"roots ({_shown(roots)})")


def split_file(directory: Path, split: str) -> Path | None:
    for ext in DATA_EXTENSIONS:
        candidate = directory / f"{split}{ext}"
        if candidate.is_file():
            return candidate
    return None


def _resolve_model_dir(field: str, ref: str, roots: Sequence[Path] | None) -> str:
    path = _inside_roots(field, ref, roots)
    if not path.is_dir():
        raise SpecError(field, f"{ref!r} is neither a local model directory nor a hub id owner/name[@revision]: "
                               f"no directory at {path}{_resolved_from(ref)}")
    if not (path / "config.json").is_file():
        raise SpecError(field, f"{ref!r} holds no config.json: not a Hugging Face model directory")
    _check_model_files(field, ref, path, roots)
    return str(path)


def confine_local_paths(spec: StudySpec, allowed_roots: Sequence[Path]) -> None:
    """Raise ``SpecError`` naming the field if a local path of a queued spec (model directories and every file in
    them, the dataset directory and its split files) now resolves outside ``allowed_roots``: a worker's check before
    it reads them, since a folder can change after the API checked it. A path that has gone missing is left to the
    loader (a share that is down for a moment is no fault of the spec)."""
    models = [("teacher", spec.teacher), ("student.model", spec.student.model)]
    for field, ref in models:
        if ref is not None and looks_local(ref):
            real = _inside_roots(field, ref, allowed_roots)
            if real.is_dir():
                _check_model_files(field, ref, real, allowed_roots)
    dataset = spec.dataset
    if dataset.path is not None:
        directory = _inside_roots("dataset.path", dataset.path, allowed_roots)
        for field, split in (("dataset.train_split", dataset.train_split), ("dataset.eval_split", dataset.eval_split)):
            found = split_file(directory, split)
            if found is not None:
                _inside_roots(field, str(found), allowed_roots)
    for index, source in enumerate(spec.predistill.corpus):
        if source.path is not None:
            field = f"predistill.corpus.{index}"
            directory = _inside_roots(f"{field}.path", source.path, allowed_roots)
            for split in source.splits:
                found = split_file(directory, split)
                if found is not None:
                    _inside_roots(f"{field}.splits", str(found), allowed_roots)


def normalize_spec(spec: StudySpec, allowed_roots: Sequence[Path] | None = None) -> StudySpec:
    """Check local paths (under ``allowed_roots`` when given) and make them absolute; returns a new spec."""
    update: dict = {}
    if looks_local(spec.teacher):
        update["teacher"] = _resolve_model_dir("teacher", spec.teacher, allowed_roots)
    student = spec.student
    if student.model is not None and looks_local(student.model):
        resolved = _resolve_model_dir("student.model", student.model, allowed_roots)
        student = student.model_copy(update={"model": resolved})
    update["student"] = student
    dataset = spec.dataset
    if dataset.path is not None:
        directory = _inside_roots("dataset.path", dataset.path, allowed_roots)
        if not directory.is_dir():
            raise SpecError("dataset.path", f"directory {dataset.path!r} does not exist: no directory at {directory}"
                                            f"{_resolved_from(dataset.path)}")
        for field, split in (("dataset.train_split", dataset.train_split), ("dataset.eval_split", dataset.eval_split)):
            found = split_file(directory, split)
            if found is None:
                raise SpecError(field, f"no {split}{{{','.join(DATA_EXTENSIONS)}}} in {dataset.path!r}")
            _inside_roots(field, str(found), allowed_roots)  # a split file may be a symlink out of the roots
        dataset = dataset.model_copy(update={"path": str(directory)})
    update["dataset"] = dataset
    sources = []
    for index, source in enumerate(spec.predistill.corpus):
        if source.path is not None:
            field = f"predistill.corpus.{index}"
            directory = _inside_roots(f"{field}.path", source.path, allowed_roots)
            if not directory.is_dir():
                raise SpecError(f"{field}.path", f"directory {source.path!r} does not exist: no directory at "
                                                 f"{directory}{_resolved_from(source.path)}")
            for split in source.splits:
                found = split_file(directory, split)
                if found is None:
                    raise SpecError(f"{field}.splits", f"no {split}{{{','.join(DATA_EXTENSIONS)}}} in {source.path!r}")
                _inside_roots(f"{field}.splits", str(found), allowed_roots)
            source = source.model_copy(update={"path": str(directory)})
        sources.append(source)
    update["predistill"] = spec.predistill.model_copy(update={"corpus": sources})
    return spec.model_copy(update=update)


def check_hub_model_offline(field: str, ref: str) -> None:
    """A hub model on a host without the network (``HF_HUB_OFFLINE``) must already be in its Hugging Face cache:
    else it could only fail to load, and workers would retry it for minutes while the study shows no progress.
    Checked by the API at submit, and by a worker before it loads a teacher."""
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return
    repo_id, _, revision = ref.partition("@")
    if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision or None), str):
        return
    raise SpecError(field, f"{ref!r} is a hub id, and this host is offline (HF_HUB_OFFLINE=1) with no copy of it "
                           f"in its Hugging Face cache ({constants.HF_HUB_CACHE}): give a local model directory, or "
                           f"download it where the server and workers run first (hf download {repo_id})")


def _load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref)


def tokenizers_compatible(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase) -> str | None:
    """None when both tokenizers give identical token ids, else a sentence saying how they differ."""
    if len(teacher_tok) != len(student_tok):
        return f"vocabulary sizes differ (teacher {len(teacher_tok)}, student {len(student_tok)})"
    for text in TOKENIZER_PROBES:
        t_ids = teacher_tok(text)["input_ids"]
        s_ids = student_tok(text)["input_ids"]
        if t_ids != s_ids:
            return f"token ids differ for {text!r}: teacher {t_ids[:12]}..., student {s_ids[:12]}..."
    return None


def check_tokenizers(spec: StudySpec) -> None:
    """A pretrained student must tokenize exactly like the teacher: distillation feeds both the same ids.

    Only checked here when both tokenizers load without the network; a worker checks again before training.
    """
    if spec.student.model is None:
        return  # fresh and truncated students use the teacher's own tokenizer
    try:
        teacher_tok = _load_tokenizer(spec.teacher)
        student_tok = _load_tokenizer(spec.student.model)
    except Exception as exc:
        if looks_local(spec.teacher) and looks_local(spec.student.model):
            raise SpecError("student.model", f"cannot load tokenizers: {exc}") from exc
        return
    problem = tokenizers_compatible(teacher_tok, student_tok)
    if problem:
        raise SpecError(
            "student.model",
            f"teacher and student tokenizers differ: {problem}. Distillation needs identical inputs; "
            "pick a student on the teacher's vocabulary, or use student.config / student.truncate_teacher.",
        )


def check_mask_token(spec: StudySpec) -> None:
    """Word masking in ``augment`` needs the teacher tokenizer's mask token (checked here for local teachers)."""
    if not spec.augment.copies or not spec.augment.p_mask or not looks_local(spec.teacher):
        return
    try:
        tokenizer = _load_tokenizer(spec.teacher)
    except Exception as exc:
        raise SpecError("teacher", f"cannot load the teacher's tokenizer: {exc}") from exc
    if not tokenizer.mask_token:
        raise SpecError("augment.p_mask", "the teacher's tokenizer has no mask token; set augment.p_mask to 0")


def _local_teacher_config(spec: StudySpec) -> Any | None:
    """The teacher's config when it is a local directory (None for a hub id: a worker reads it)."""
    if not looks_local(spec.teacher):
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec.teacher)
    except Exception as exc:
        raise SpecError("teacher", f"cannot read the teacher's config: {exc}") from exc


def local_task(spec: StudySpec, config: Any | None = None) -> TaskInfo | None:
    """The study's task when its teacher is a local directory (its config says it), else None (a worker finds out).

    Raises ``SpecError`` naming ``metric`` when the metric does not fit the task.
    """
    config = config if config is not None else _local_teacher_config(spec)
    if config is None:
        return None
    try:
        return resolve_task(config, spec.metric)
    except MetricMismatch as exc:
        raise SpecError("metric" if spec.metric else "teacher", str(exc)) from exc


def check_student_shapes(spec: StudySpec, teacher_config: Any | None) -> None:
    """Some valid student shape exists (``search_space.shapes``), against the teacher's width and depth when its
    config is known here; raises ``SpecError`` naming the field."""
    hidden, layers = teacher_dims(teacher_config) if teacher_config is not None else (None, None)
    student_space(spec.student, hidden, layers)


def check_layer_map(spec: StudySpec, teacher_config: Any | None) -> None:
    """Each explicit ``layer_map`` names one teacher layer per student layer (when the student's depth is fixed) and
    only layers the teacher has (when its config is known here); raises ``SpecError`` naming the field."""
    from kdsearch.terms.layers import NAMED_MAPPINGS, resolve_layer_map

    layer_map = spec.search_space.layer_map
    explicit = [t for t in (layer_map.choices if isinstance(layer_map, StrChoices) else [layer_map])
                if t not in NAMED_MAPPINGS]
    if not explicit:
        return
    student = spec.student
    depth = (student.config.num_hidden_layers if student.config is not None
             else student.truncate_teacher.num_layers if student.truncate_teacher is not None else None)
    _, teacher_layers = teacher_dims(teacher_config) if teacher_config is not None else (None, None)
    for text in explicit:
        named = len(text.split(","))
        try:
            resolve_layer_map(text, depth if isinstance(depth, int) else named, teacher_layers or 10**6)
        except ValueError as exc:
            raise SpecError("search_space.layer_map", str(exc)) from exc


def validate_spec(spec: StudySpec,
                  allowed_roots: Sequence[Path] | None = None) -> tuple[StudySpec, TaskInfo | None]:
    """The spec with local paths checked and made absolute, and its task when the teacher is local.

    A local dataset's files are checked by the caller next, with the workers' own reader
    (``distill.data.check_data``): distill imports this package, so it is not called from here."""
    spec = normalize_spec(spec, allowed_roots)
    if not looks_local(spec.teacher):
        check_hub_model_offline("teacher", spec.teacher)
    if spec.student.model is not None and not looks_local(spec.student.model):
        check_hub_model_offline("student.model", spec.student.model)
    teacher_config = _local_teacher_config(spec)
    task = local_task(spec, teacher_config)
    if task is not None and task.is_regression and spec.augment.match_label_mix:
        raise SpecError("augment.match_label_mix", "applies to classification tasks; this teacher is a regressor")
    check_student_shapes(spec, teacher_config)
    check_layer_map(spec, teacher_config)
    check_tokenizers(spec)
    check_mask_token(spec)
    return spec, task
