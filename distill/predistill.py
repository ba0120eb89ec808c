"""Pre-distilled students: the teacher's self-attention relations distilled into the student's shape on unlabelled
text, once per (teacher, student shape, corpus, recipe), before any trial trains.

The method is MiniLMv2's (Wang et al., 2021): the queries, keys and values of one teacher layer (the last by
default) and of the student's last layer are split into the same number of relation heads, and the student learns
the teacher's query-query, key-key and value-value relations (``kdsearch.terms.relations``), a KL divergence per
token. The relations are [tokens x tokens] whatever the widths, so a 128-wide student learns from a 384-wide teacher
with no projection to learn and throw away. Beside them (``hidden_weight``, TinyBERT's general distillation), the
student's last hidden states go through a learned linear projection onto the teacher's width and are matched to the
teacher's by MSE; the projection is thrown away after. No labels are read: the corpus is text only (by default
every split of the task, both sides of a pair), and the result serves every study and trial of the same key.

An example is one corpus sentence, or (``pair_share`` of them) two sentences in the tokenizer's pair encoding, so
the student also sees segment ids and the longer inputs a pair task feeds it.

The entry is built like the teacher cache (``distill.cache.build_once``: the artifact store, local or S3, one
builder in the cluster under the build lock). The builder saves its progress after every epoch beside the entry
(``<key>.resume``): a worker killed mid-build leaves it, and the next builder on that host goes on from the last
finished epoch rather than from scratch. The builder uses every core of its host while it builds.

    weights = build_or_load_predistilled(layout, spec, student, teacher_config, device, "fp32")
    model.load_state_dict(weights, strict=False)  # the encoder; the classifier head stays the trial's own
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, get_linear_schedule_with_warmup

from distill.cache import Entry, build_once
from distill.data import (
    DataError,
    TextSplit,
    TokenizedSplit,
    concat_splits,
    length_bucketed_batches,
    read_split,
    tokenize,
)
from distill.internals import attention_projections, capture_qkv
from distill.models import fingerprint, load_teacher
from distill.precision import Precision, autocast
from distill.progress import PREDISTILL_STAGE, Progress
from distill.student import build_student
from kdsearch.terms.layers import Projection, masked_mse
from kdsearch.terms.relations import relation_loss
from search_space import CorpusSource, DatasetSpec, PredistillSpec, StudentSpec, StudySpec
from storage import ArtifactLayout

PREDISTILL_FORMAT = 1  # bumped whenever the method or the stored weights change meaning


def corpus_texts(spec: StudySpec) -> list[str]:
    """The pre-distillation corpus: the task's texts (``predistill.task_splits``, by default its train and eval
    splits; both sides of a pair; labels never read) when ``predistill.task_texts``, and every extra source's: each
    distinct non-empty sentence once, sorted (the same corpus on every host)."""
    recipe = spec.predistill
    texts: list[str] = []
    if recipe.task_texts:
        for split in _task_splits(spec):
            texts.extend(_column_texts(spec.dataset, split, _task_columns(spec)))
    for index, source in enumerate(recipe.corpus):
        for split in source.splits:
            try:
                texts.extend(_column_texts(_as_dataset(source), split, source.text_columns, source.max_rows))
            except DataError as exc:
                raise DataError(f"predistill.corpus[{index}]: {exc}") from exc
    # Sorted: the same sentences make the same corpus (and key) whatever their sources' order.
    unique = sorted({t.strip() for t in texts if t and t.strip()})
    if not unique:
        raise DataError("predistill: the corpus has no text (no non-empty sentence in its sources)")
    if recipe.max_sentences is not None and len(unique) > recipe.max_sentences:
        keep = np.sort(np.random.default_rng(recipe.seed).permutation(len(unique))[: recipe.max_sentences])
        unique = [unique[i] for i in keep]
    return unique


def _task_columns(spec: StudySpec) -> list[str]:
    """The task's text columns: both sides of a pair."""
    pair = spec.dataset.text_pair_column
    return [spec.dataset.text_column, *([pair] if pair else [])]


def _task_splits(spec: StudySpec) -> list[str]:
    """The task's splits pre-distillation reads: ``predistill.task_splits``, else the train and the eval split."""
    return list(dict.fromkeys(spec.predistill.task_splits or (spec.dataset.train_split, spec.dataset.eval_split)))


def scored_texts(spec: StudySpec) -> frozenset[str]:
    """The eval split's texts when the corpus holds them and ``pair_partners`` is "lexical": never paired with each
    other (their nearest neighbours are often their own pairs, which the study is scored on). Empty otherwise."""
    recipe = spec.predistill
    if recipe.pair_partners != "lexical" or not recipe.task_texts or spec.dataset.eval_split not in _task_splits(spec):
        return frozenset()
    texts = _column_texts(spec.dataset, spec.dataset.eval_split, _task_columns(spec))
    return frozenset(t.strip() for t in texts if t.strip())


def task_pair_splits(spec: StudySpec) -> list[str]:
    """The task's splits whose pairs pre-distillation reads: ``predistill.task_pair_splits``, else the train split
    alone (the eval split's pairs would fit the student to what it is scored on)."""
    return list(dict.fromkeys(spec.predistill.task_pair_splits or (spec.dataset.train_split,)))


def task_pairs(spec: StudySpec) -> list[tuple[str, str]]:
    """A pair task's own pairs, split by split in file order (labels never read), when ``predistill.task_pairs``;
    those with an empty side left out."""
    pair = spec.dataset.text_pair_column
    if not spec.predistill.task_pairs or pair is None:
        return []
    out: list[tuple[str, str]] = []
    for split in task_pair_splits(spec):
        firsts = _column_texts(spec.dataset, split, [spec.dataset.text_column])
        seconds = _column_texts(spec.dataset, split, [pair])
        out.extend((a.strip(), b.strip()) for a, b in zip(firsts, seconds, strict=True) if a.strip() and b.strip())
    return out


def _as_dataset(source: CorpusSource) -> DatasetSpec:
    """A corpus source in the shape ``distill.data.read_split`` reads (its label column is never read)."""
    return DatasetSpec(hub=source.hub, config=source.config, path=source.path, text_column=source.text_columns[0],
                       label_column="\x00unused")


def _column_texts(dataset: DatasetSpec, split: str, columns: list[str], max_rows: int | None = None) -> list[str]:
    rows = read_split(dataset, split)
    if max_rows is not None and len(rows) > max_rows:
        rows = rows.select(range(max_rows))
    out: list[str] = []
    for column in columns:
        if column not in rows.column_names:
            raise DataError(f"split {split!r} has no text column {column!r}")
        out.extend("" if t is None else str(t) for t in rows[column])
    return out


def predistill_key(spec: StudySpec, student: StudentSpec, corpus: list[str],
                   pairs: list[tuple[str, str]] | None = None, apart: frozenset[str] = frozenset()) -> str:
    """Everything that changes the pre-distilled weights: the teacher, the student's fixed shape and initialisation,
    the corpus's sentences (their hash: the same text from other files or sources shares the entry), the task's
    pairs with their copies, and the recipe. Not the task, its labels or the study's search: every study of that
    teacher and shape shares it."""
    # The corpus and the pairs say the rest (task_pairs only when there are pairs, so that other keys stay).
    recipe = spec.predistill.model_dump(exclude={"task_texts", "corpus", "max_sentences", "task_pairs",
                                                 "task_splits", "task_pair_splits", "pair_partners"})
    if spec.predistill.pair_partners != "random":  # (in the key only when not the default, so that other keys stay)
        recipe["pair_partners"] = {"kind": spec.predistill.pair_partners, "pool": LEXICAL_POOL,
                                   "apart": hashlib.sha256("\n".join(sorted(apart)).encode()).hexdigest()}
    if pairs:
        recipe["task_pairs"] = {"copies": spec.predistill.task_pairs,
                                "sha": hashlib.sha256("\n".join(f"{a}\t{b}" for a, b in pairs).encode()).hexdigest()}
    payload = {
        "format": PREDISTILL_FORMAT,
        "teacher": fingerprint(spec.teacher),
        # Not the pair encoding or head: the encoder is pre-distilled alone (cross and siamese students share it).
        "student": student.model_dump(mode="json", exclude={"pair_encoding", "pair_head"}),
        "corpus": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
        "recipe": recipe,
    }
    return "pre-" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


LEXICAL_POOL = 5  # pair_partners "lexical": a partner is one of a sentence's this many nearest by TF-IDF cosine


def corpus_split(tokenizer: Any, corpus: list[str], recipe: PredistillSpec,
                 pairs: list[tuple[str, str]] | None = None, apart: frozenset[str] = frozenset()) -> TokenizedSplit:
    """The corpus as training examples: every sentence once, ``pair_share`` of them joined two by two in the
    tokenizer's pair encoding (``pair_partners``: a random partner, or with "lexical" one of the sentence's
    ``LEXICAL_POOL`` nearest corpus sentences by TF-IDF cosine, never two of ``apart``), then each of the task's
    ``pairs`` ``recipe.task_pairs`` times. Deterministic for (corpus, pairs, recipe, apart)."""
    rng = np.random.default_rng(recipe.seed)
    order = rng.permutation(len(corpus))
    n_pairs = int(len(corpus) * recipe.pair_share) // 2
    if recipe.pair_partners == "lexical":  # every sentence once, n_pairs of them first of a related pair
        firsts, single = order[:n_pairs], order[n_pairs:]
        seconds = lexical_partners(corpus, firsts, apart, rng)
    else:
        paired, single = order[: 2 * n_pairs], order[2 * n_pairs:]
        firsts, seconds = paired[0::2], paired[1::2]
    parts = []
    if len(single):
        parts.append(tokenize(tokenizer, TextSplit([corpus[i] for i in single], np.zeros(len(single), np.int64)),
                              recipe.max_seq_length))
    if n_pairs:
        parts.append(tokenize(tokenizer, TextSplit([corpus[i] for i in firsts], np.zeros(n_pairs, np.int64),
                                                   [corpus[i] for i in seconds]), recipe.max_seq_length))
    if pairs and recipe.task_pairs:
        repeated = pairs * recipe.task_pairs
        parts.append(tokenize(tokenizer, TextSplit([a for a, _ in repeated], np.zeros(len(repeated), np.int64),
                                                   [b for _, b in repeated]), recipe.max_seq_length))
    split = parts[0]
    for part in parts[1:]:
        split = concat_splits(split, part)
    return split


def lexical_partners(corpus: list[str], anchors: np.ndarray, apart: frozenset[str],
                     rng: np.random.Generator) -> np.ndarray:
    """A partner for each of ``anchors`` (corpus indices): one of its ``LEXICAL_POOL`` nearest other sentences by
    TF-IDF cosine, picked by ``rng``; never a sentence of ``apart`` for an anchor of ``apart`` (the eval split's
    texts: their own pairs would come back). A random sentence under that rule when none shares a word with it."""
    from sklearn.neighbors import NearestNeighbors

    from distill.pair_corpus import tfidf_rows

    matrix = tfidf_rows(corpus)
    pool = min(LEXICAL_POOL + 1 + (4 * LEXICAL_POOL if apart else 0), len(corpus))
    # The costly step: the anchors against the whole corpus, brute force on the sparse rows (chunked by sklearn).
    distances, nearest = NearestNeighbors(n_neighbors=pool, metric="cosine", algorithm="brute").fit(
        matrix).kneighbors(matrix[anchors])
    in_apart = np.fromiter((text in apart for text in corpus), bool, len(corpus))
    partners = np.empty(len(anchors), np.int64)
    for row, anchor in enumerate(anchors):
        candidates = [int(j) for j, d in zip(nearest[row], distances[row], strict=True)
                      if j != anchor and d < 1.0 and not (in_apart[anchor] and in_apart[j])][:LEXICAL_POOL]
        if not candidates:  # a random partner under the same rule; the sentence itself when none is left
            allowed = ~in_apart if in_apart[anchor] else np.ones(len(corpus), bool)
            allowed[anchor] = False
            candidates = np.flatnonzero(allowed).tolist() or [int(anchor)]
        partners[row] = candidates[int(rng.integers(len(candidates)))]
    return partners


def _teacher_layer(teacher: torch.nn.Module, index: int | None) -> int:
    """The teacher layer whose relations are distilled (``predistill.teacher_layer``; None: the last)."""
    depth = len(_projections(teacher, "teacher"))
    if index is None:
        return depth - 1
    if not -depth <= index < depth:
        raise DataError(f"predistill.teacher_layer {index} is outside the teacher's {depth} layers")
    return index % depth


def _projections(model: torch.nn.Module, what: str) -> list[Any]:
    try:
        return attention_projections(model)
    except ValueError as exc:
        raise DataError(f"pre-distillation needs a BERT-style {what} (query, key and value projections per layer)"
                        ) from exc


def check_relation_heads(recipe: PredistillSpec, student_config: PretrainedConfig,
                         teacher_config: PretrainedConfig) -> None:
    """A ``DataError`` naming the field when the relation heads do not divide both widths."""
    for who, width in (("student", student_config.hidden_size), ("teacher", teacher_config.hidden_size)):
        if width % recipe.relation_heads:
            raise DataError(f"predistill.relation_heads ({recipe.relation_heads}) must divide the {who}'s hidden "
                            f"size ({width})")


@dataclasses.dataclass
class PredistillResult:
    """What a build measured (kept in the entry's meta.json)."""

    examples: int
    epochs: int
    final_loss: float
    seconds: float


def predistill(student: PreTrainedModel, teacher: PreTrainedModel, corpus: TokenizedSplit, recipe: PredistillSpec,
               device: torch.device, precision: Precision, progress: Progress | None = None,
               resume: dict[str, Any] | None = None,
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> PredistillResult:
    """Train ``student``'s encoder to the teacher's relations on ``corpus`` (in place). ``resume`` (a state
    ``on_epoch`` was given) goes on after its epoch; ``on_epoch(state)`` hears each finished epoch's state."""
    started = time.perf_counter()
    teacher_layer = _teacher_layer(teacher, recipe.teacher_layer)
    _projections(student, "student")
    teacher.eval().to(device)
    student.train().to(device)
    # TinyBERT's hidden-state loss beside the relations: the student's last layer through a learned projection onto
    # the teacher's width (trained here, thrown away after), MSE to the teacher's last layer.
    project = Projection(student.config.hidden_size, teacher.config.hidden_size).to(device)
    params = [p for name, p in student.named_parameters() if not name.startswith(_HEAD_PREFIXES)]
    if recipe.hidden_weight > 0:
        params += list(project.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.learning_rate, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(corpus) / recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(0.05 * total_steps), total_steps)
    generator = torch.Generator().manual_seed(recipe.seed)
    first_epoch = 1
    if resume is not None:
        student.load_state_dict(resume["student"])
        project.load_state_dict(resume["projection"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        first_epoch = int(resume["epoch"]) + 1
    total_rows = len(corpus) * recipe.epochs
    mean_loss = float(resume["loss"]) if resume is not None else math.nan
    loss_sum = torch.zeros((), device=device)
    for epoch in range(first_epoch, recipe.epochs + 1):
        loss_sum.zero_()
        batches = length_bucketed_batches(corpus.lengths, recipe.batch_size, generator)
        done = 0
        with capture_qkv(teacher) as teacher_out, capture_qkv(student) as student_out:
            for idx in batches:
                inputs = corpus.batch(idx.to(corpus.input_ids.device))
                inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                mask = inputs["attention_mask"]
                with torch.no_grad(), autocast(device, precision):
                    # The costly line: the teacher's forward, every step.
                    teacher_last = teacher.base_model(**inputs).last_hidden_state
                with autocast(device, precision):
                    student_last = student.base_model(**inputs).last_hidden_state
                # Q-Q, K-K and V-V relations of the chosen teacher layer and the student's last layer.
                loss = sum((relation_loss(t, s, recipe.relation_heads, mask)
                            for t, s in zip(teacher_out[teacher_layer], student_out[-1], strict=True)),
                           torch.zeros((), device=device))
                if recipe.hidden_weight > 0:
                    loss = loss + recipe.hidden_weight * masked_mse(project(student_last), teacher_last, mask)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()  # no .item(): one host sync per epoch
                done += len(idx)
                if progress is not None:
                    progress(PREDISTILL_STAGE, (epoch - 1) * len(corpus) + done, total_rows)
        mean_loss = loss_sum.item() / steps_per_epoch  # the epoch's host sync
        if not math.isfinite(mean_loss):
            raise ArithmeticError(f"pre-distillation diverged at epoch {epoch} (loss {mean_loss})")
        if on_epoch is not None:
            on_epoch({"epoch": epoch, "loss": mean_loss, "student": student.state_dict(),
                      "projection": project.state_dict(),
                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                      "generator": generator.get_state()})
    return PredistillResult(len(corpus), recipe.epochs, mean_loss, time.perf_counter() - started)


# The classification head (and pooler) are not the encoder's: pre-distillation neither trains nor keeps them.
_HEAD_PREFIXES = ("classifier.", "pooler.", "bert.pooler.", "score.")


def encoder_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The weights pre-distillation trained: everything but the classification head and the pooler."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(_HEAD_PREFIXES) and "position_ids" not in k}


@contextmanager
def _every_core() -> Iterator[None]:
    """Torch on every core this process may use while inside: a build is paid once and every trial of its key waits
    for it, so the worker building it (single-threaded per core otherwise) takes the host's other cores too."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(before, len(os.sched_getaffinity(0))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclasses.dataclass
class Predistilled:
    """A pre-distilled student shape: its cache key, encoder weights and the build's record (``meta.json``)."""

    key: str
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]


def build_or_load_predistilled(layout: ArtifactLayout, spec: StudySpec, student: StudentSpec,
                               teacher_config: PretrainedConfig, device: torch.device, precision: Precision,
                               teacher_state: dict[str, torch.Tensor] | None = None,
                               log: Callable[[str], None] = print,
                               progress: Progress | None = None) -> Predistilled:
    """The pre-distilled encoder of ``student`` (a fixed shape), built once per key in the cluster."""
    corpus = corpus_texts(spec)
    pairs = task_pairs(spec)
    apart = scored_texts(spec)
    key = predistill_key(spec, student, corpus, pairs, apart)
    recipe = spec.predistill
    resume_path = layout.cache_root / f"{key}.resume"

    def build() -> Entry:
        from distill.student import student_config

        # The key's student: its encoder alone.
        encoder = student.model_copy(update={"pair_encoding": "cross", "pair_head": "auto"})
        model = build_student(encoder, teacher_config, seed=recipe.seed, teacher_state=teacher_state)
        check_relation_heads(recipe, student_config(encoder, teacher_config), teacher_config)
        teacher, tokenizer = load_teacher(spec.teacher)
        examples = corpus_split(tokenizer, corpus, recipe, pairs, apart)
        resume = None
        if resume_path.is_file():
            try:
                resume = torch.load(resume_path, map_location="cpu", weights_only=False)
                log(f"pre-distillation {key}: resuming after epoch {resume['epoch']} of {recipe.epochs}")
            except Exception as exc:  # noqa: BLE001 - a torn save: start again
                log(f"pre-distillation {key}: cannot resume ({type(exc).__name__}), starting again")
                resume = None
        log(f"pre-distilling {key}: {len(corpus)} sentences and {len(pairs)} task pairs, {len(examples)} examples, "
            f"{recipe.epochs} epochs")

        def save_progress(state: dict[str, Any]) -> None:
            tmp = resume_path.with_suffix(".tmp")
            resume_path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp)
            tmp.replace(resume_path)

        with _every_core():
            result = predistill(model, teacher, examples, recipe, device, precision, progress, resume, save_progress)
        meta = {
            "format": PREDISTILL_FORMAT,
            "teacher": spec.teacher,
            "student": student.model_dump(mode="json"),
            "recipe": recipe.model_dump(mode="json"),
            "sentences": len(corpus),
            "task_pairs": len(pairs),
            "task_pair_splits": task_pair_splits(spec) if pairs else [],
            "examples": result.examples,
            "final_loss": result.final_loss,
            "build_seconds": round(result.seconds, 2),
            "device": str(device),
            "precision": precision,
        }
        log(f"pre-distillation {key}: {len(corpus)} sentences x {recipe.epochs} epochs in {meta['build_seconds']} s, "
            f"final relation loss {result.final_loss:.4f}")
        return encoder_state(model), meta

    tensors, meta = build_once(layout, key, build)
    resume_path.unlink(missing_ok=True)
    return Predistilled(key, tensors, meta)
