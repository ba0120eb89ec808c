"""Model references: hub ids (``owner/name@revision``) or local directories; loading the teacher; identity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill.data import DataError
from search_space import looks_local
from search_space.validation import check_hub_model_offline


def split_revision(ref: str) -> tuple[str, str | None]:
    """``owner/name@rev`` → (``owner/name``, ``rev``); local paths are returned as they are."""
    if looks_local(ref) or "@" not in ref:
        return ref, None
    name, revision = ref.split("@", 1)
    return name, revision


def load_config(ref: str) -> Any:
    """The teacher's config. A hub id on an offline host without a cached copy is the spec's fault (``SpecError``,
    a study fault): the study fails at once, not after minutes of retried preparations."""
    from transformers import AutoConfig

    if not looks_local(ref):
        check_hub_model_offline("teacher", ref)
    name, revision = split_revision(ref)
    return AutoConfig.from_pretrained(name, revision=revision)


def load_tokenizer(ref: str) -> Any:
    from transformers import AutoTokenizer

    name, revision = split_revision(ref)
    return AutoTokenizer.from_pretrained(name, revision=revision)


def load_teacher(ref: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a sequence-classification teacher; anything else is a ``DataError``."""
    from transformers import AutoModelForSequenceClassification

    name, revision = split_revision(ref)
    config = load_config(ref)
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise DataError(f"teacher {ref!r} is not a sequence classifier (architectures: {architectures})")
    model = AutoModelForSequenceClassification.from_pretrained(name, revision=revision)
    return model, load_tokenizer(ref)


def fingerprint(ref: str) -> str:
    """Identity of a model reference: hub id (with revision) or a local directory's file sizes and times."""
    if not looks_local(ref):
        return ref
    path = Path(ref)
    parts = [str(path.resolve())]
    for item in sorted(path.iterdir()):
        if item.is_file():
            stat = item.stat()
            parts.append(f"{item.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return "|".join(parts)
