"""Pre-distilled students (issue 25): the relation loss against a hand computation, the corpus, the cache key, the
build shared once by racing processes, a build killed mid-way and resumed, the trial starting from the weights, and
the spec's rules."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill import DistillationEngine
from distill.data import DataError
from distill.models import load_config, load_teacher
from distill.predistill import (
    build_or_load_predistilled,
    corpus_split,
    corpus_texts,
    encoder_state,
    lexical_partners,
    predistill,
    predistill_key,
    scored_texts,
    task_pairs,
)
from distill.student import build_student
from kdsearch.terms.relations import relation_log_probs, relation_loss
from kdsearch.testing import tiny_spec, write_dataset, write_tiny_model
from search_space import StudySpec
from storage import make_layout

PAIRS = [("the movie was good", "a film that is good", 1), ("it was dull", "the plot is great", 0),
         ("actors were funny", "the actors are funny", 1), ("a boring story", "very charming and smart", 0)]


def _pair_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", PAIRS[:3]), ("validation", PAIRS[3:])):
        (directory / f"{split}.tsv").write_text("sentence1\tsentence2\tlabel\n"
                                                + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows))
    return directory


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predistill")
    return {"teacher": write_tiny_model(root / "teacher", seed=1, layers=2), "data": write_dataset(root / "data"),
            "other_teacher": write_tiny_model(root / "other", seed=5, layers=2), "pairs": _pair_data(root / "pairs")}


def _spec(assets: dict[str, Path], **overrides: Any) -> StudySpec:
    predistill = {"epochs": 2, **overrides.pop("predistill", {})}
    search = {"num_train_epochs": 1, "batch_size": 32, "learning_rate": 1e-2, "predistilled": 1,
              **overrides.pop("search_space", {})}
    return StudySpec.model_validate(tiny_spec(assets, predistill=predistill, search_space=search, **overrides))


# -- the relation loss -----------------------------------------------------------------------------------------------


def test_the_relation_loss_matches_a_hand_computation() -> None:
    teacher = torch.tensor([[[1.0, 0.0, 2.0, -1.0], [0.5, 1.0, 0.0, 0.0], [3.0, 3.0, 3.0, 3.0]]])  # [1, 3, 4]
    student = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [9.0, 9.0]]])  # [1, 3, 2]: another width
    mask = torch.tensor([[1, 1, 0]])  # the third token is padding
    heads = 2

    def relations(x: list[list[float]], head: int, width: int) -> list[list[float]]:
        d = width // heads
        part = [row[head * d:(head + 1) * d] for row in x[:2]]  # real tokens only
        out = []
        for q in part:
            scores = [sum(a * b for a, b in zip(q, k, strict=True)) / math.sqrt(d) for k in part]
            total = sum(math.exp(v) for v in scores)
            out.append([math.exp(v) / total for v in scores])
        return out

    expected = 0.0
    for head in range(heads):
        t, s = relations(teacher[0].tolist(), head, 4), relations(student[0].tolist(), head, 2)
        for t_row, s_row in zip(t, s, strict=True):
            expected += sum(p * math.log(p / q) for p, q in zip(t_row, s_row, strict=True))
    expected /= 2 * heads  # two real query tokens, two heads
    assert relation_loss(teacher, student, heads, mask).item() == pytest.approx(expected, rel=1e-5)
    # A padded key gets no probability; a student with the teacher's relations has no loss.
    assert relation_log_probs(teacher, heads, mask)[0, :, :, 2].exp().max().item() == 0.0
    assert relation_loss(teacher, teacher, heads, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_relation_heads_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="multiple of the relation heads"):
        relation_log_probs(torch.zeros(1, 2, 6), 4, torch.ones(1, 2))


# -- the corpus and the key ------------------------------------------------------------------------------------------


def test_the_corpus_is_every_split_both_sides_and_extra_sources_without_labels(assets: dict[str, Path],
                                                                             tmp_path: Path) -> None:
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "train.jsonl").write_text('{"text": "an unlabelled line"}\n{"text": "the movie was good"}\n{"text": ""}\n')
    spec = _spec(assets, dataset={"path": str(assets["pairs"]), "text_column": "sentence1",
                                  "text_pair_column": "sentence2", "max_seq_length": 16},
                 predistill={"corpus": [{"path": str(extra), "text_columns": ["text"]}]})
    corpus = corpus_texts(spec)
    expected = {t for a, b, _ in PAIRS for t in (a, b)} | {"an unlabelled line"}
    assert corpus == sorted(expected)  # both sides, train and validation, the extra source, each sentence once
    only_extra = spec.model_copy(update={"predistill": spec.predistill.model_copy(update={"task_texts": False})})
    assert corpus_texts(only_extra) == ["an unlabelled line", "the movie was good"]
    capped = spec.model_copy(update={"predistill": spec.predistill.model_copy(update={"max_sentences": 3})})
    assert len(corpus_texts(capped)) == 3 and set(corpus_texts(capped)) <= expected
    missing = spec.model_copy(update={"predistill": spec.predistill.model_copy(update={"corpus": [
        spec.predistill.corpus[0].model_copy(update={"text_columns": ["body"]})]})})
    with pytest.raises(DataError, match=r"predistill.corpus\[0\]: .*no text column 'body'"):
        corpus_texts(missing)


def test_pairs_are_joined_in_the_pair_encoding(assets: dict[str, Path]) -> None:
    spec = _spec(assets, predistill={"pair_share": 0.5})
    corpus = corpus_texts(spec)
    _, tokenizer = load_teacher(spec.teacher)
    split = corpus_split(tokenizer, corpus, spec.predistill)
    assert split.token_type_ids is not None
    paired = int((split.token_type_ids.sum(1) > 0).sum())
    n_pairs = int(len(corpus) * 0.5) // 2
    assert paired == n_pairs and len(split) == len(corpus) - n_pairs


def test_a_pair_tasks_own_pairs_join_the_examples_and_the_key(assets: dict[str, Path]) -> None:
    pair_dataset = {"path": str(assets["pairs"]), "text_column": "sentence1", "text_pair_column": "sentence2",
                    "max_seq_length": 16}
    # By default the train split's pairs alone: the eval split's would fit the student to what it is scored on.
    default = _spec(assets, dataset=pair_dataset, predistill={"task_pairs": 2, "pair_share": 0.0})
    assert task_pairs(default) == [(a, b) for a, b, _ in PAIRS[:3]]
    spec = _spec(assets, dataset=pair_dataset, predistill={"task_pairs": 2, "pair_share": 0.0,
                                                           "task_pair_splits": ["train", "validation"]})
    pairs = task_pairs(spec)
    assert pairs == [(a, b) for a, b, _ in PAIRS]  # the splits named, in file order; labels never read
    assert predistill_key(default, spec.student, corpus_texts(default), task_pairs(default)) != predistill_key(
        spec, spec.student, corpus_texts(spec), pairs)
    corpus = corpus_texts(spec)
    _, tokenizer = load_teacher(spec.teacher)
    split = corpus_split(tokenizer, corpus, spec.predistill, pairs)
    assert len(split) == len(corpus) + 2 * len(pairs) and split.token_type_ids is not None
    assert int((split.token_type_ids.sum(1) > 0).sum()) == 2 * len(pairs)  # only the task's pairs are pairs
    first = tokenizer(pairs[0][0], pairs[0][1])["input_ids"]
    assert split.input_ids[len(corpus), :len(first)].tolist() == first
    # The key follows the pairs and their copies; without pairs, task_pairs leaves the key as it was.
    none = spec.model_copy(update={"predistill": spec.predistill.model_copy(update={"task_pairs": 0})})
    assert task_pairs(none) == []
    keys = {predistill_key(spec, spec.student, corpus, pairs),
            predistill_key(spec.model_copy(update={"predistill": spec.predistill.model_copy(
                update={"task_pairs": 3})}), spec.student, corpus, pairs),
            predistill_key(spec, spec.student, corpus, pairs[:-1]),
            predistill_key(none, spec.student, corpus, [])}
    assert len(keys) == 4
    assert predistill_key(none, spec.student, corpus, []) == predistill_key(none, spec.student, corpus)
    # task_splits ["train"] with the default pair splits: nothing the study is scored on (texts or pairs) is read.
    train_only = default.model_copy(update={"predistill": default.predistill.model_copy(
        update={"task_splits": ["train"]})})
    assert task_pairs(train_only) == [(a, b) for a, b, _ in PAIRS[:3]]
    assert corpus_texts(train_only) == sorted({t for a, b, _ in PAIRS[:3] for t in (a, b)})
    assert predistill_key(train_only, spec.student, corpus_texts(train_only), task_pairs(train_only)) not in keys
    with pytest.raises(ValueError, match="task_pair_splits names where task_pairs come from"):
        _spec(assets, dataset=pair_dataset, predistill={"task_pair_splits": ["train"]})
    # A single-text dataset has no pairs to add: refused naming the field.
    with pytest.raises(ValueError, match="task_pairs needs a sentence-pair dataset"):
        _spec(assets, predistill={"task_pairs": 1})


def test_lexical_partners_are_related_sentences_and_never_two_scored_texts(assets: dict[str, Path]) -> None:
    corpus = ["a cat sat down", "dogs bark loudly", "quantum", "the cat sat", "the dogs bark", "zebra"]
    for seed in range(5):
        rng = np.random.default_rng(seed)
        partners = lexical_partners(corpus, np.array([3, 1, 5]), frozenset(), rng)
        assert partners[0] in (0, 4)  # shares "cat sat" or "the"; never itself
        assert partners[1] == 4  # the one sentence sharing a word
        assert partners[2] != 5  # no shared word: a random other sentence
        # The eval split's texts are never paired together, even when they are each other's nearest.
        scored = frozenset({"dogs bark loudly", "the dogs bark"})
        apart = lexical_partners(corpus, np.array([1, 4]), scored, np.random.default_rng(seed))
        assert apart[0] not in (1, 4) and apart[1] in (3,)  # "the dogs bark" may pair with "the cat sat"
    # In the examples: n_pairs first sentences with a partner, every sentence once; and a key of its own.
    pair_dataset = {"path": str(assets["pairs"]), "text_column": "sentence1", "text_pair_column": "sentence2",
                    "max_seq_length": 16}
    spec = _spec(assets, dataset=pair_dataset, predistill={"pair_share": 1.0, "pair_partners": "lexical"})
    corpus_of_task = corpus_texts(spec)
    _, tokenizer = load_teacher(spec.teacher)
    split = corpus_split(tokenizer, corpus_of_task, spec.predistill, [], scored_texts(spec))
    n_pairs = len(corpus_of_task) // 2
    assert len(split) == len(corpus_of_task) and split.token_type_ids is not None
    assert int((split.token_type_ids.sum(1) > 0).sum()) == n_pairs
    assert scored_texts(spec) == {"a boring story", "very charming and smart"}  # the validation split's texts
    random_partners = spec.model_copy(update={"predistill": spec.predistill.model_copy(
        update={"pair_partners": "random"})})
    assert scored_texts(random_partners) == frozenset()
    assert predistill_key(spec, spec.student, corpus_of_task, [], scored_texts(spec)) != predistill_key(
        random_partners, spec.student, corpus_of_task)


def test_the_key_covers_what_changes_the_weights_and_nothing_else(assets: dict[str, Path]) -> None:
    spec = _spec(assets)
    corpus = corpus_texts(spec)
    key = predistill_key(spec, spec.student, corpus)
    wider = spec.student.model_copy(update={"config": spec.student.config.model_copy(  # type: ignore[union-attr]
        update={"hidden_size": 32})})
    changed = [
        predistill_key(spec.model_copy(update={"teacher": str(assets["other_teacher"])}), spec.student, corpus),
        predistill_key(spec, wider, corpus),
        predistill_key(spec, spec.student.model_copy(update={"embedding_init": "teacher_pca"}), corpus),
        predistill_key(spec, spec.student, corpus[:-1]),
        predistill_key(spec.model_copy(update={"predistill": spec.predistill.model_copy(update={"epochs": 3})}),
                       spec.student, corpus),
        predistill_key(spec.model_copy(update={"predistill": spec.predistill.model_copy(
            update={"relation_heads": 4})}), spec.student, corpus),
        predistill_key(spec.model_copy(update={"predistill": spec.predistill.model_copy(
            update={"hidden_weight": 0.0})}), spec.student, corpus),
    ]
    assert key not in changed and len(set(changed)) == len(changed)
    # Not the study: its name, metric, search, trials or seed.
    other_study = spec.model_copy(update={"name": "another", "n_trials": 9, "seed": 1, "metric": "f1"})
    assert predistill_key(other_study, spec.student, corpus) == key
    # Nor the pair encoding or head: a siamese student of the shape starts from the same pre-distilled encoder.
    assert predistill_key(spec, spec.student.model_copy(update={"pair_encoding": "siamese"}), corpus) == key
    assert predistill_key(spec, spec.student.model_copy(update={"pair_encoding": "siamese",
                                                                "pair_head": "interaction"}), corpus) == key


# -- training and the build ------------------------------------------------------------------------------------------


def _relation_loss_on(model: Any, teacher: Any, split: Any, heads: int) -> float:
    from distill.internals import capture_qkv

    idx = torch.arange(len(split))
    inputs = split.batch(idx)
    with torch.no_grad(), capture_qkv(teacher) as t, capture_qkv(model) as s:
        teacher.base_model(**inputs)
        model.base_model(**inputs)
        return sum(relation_loss(a, b, heads, inputs["attention_mask"]).item() for a, b in zip(t[-1], s[-1],
                                                                                                  strict=True))


def test_predistillation_brings_the_students_relations_to_the_teachers(assets: dict[str, Path]) -> None:
    spec = _spec(assets, predistill={"epochs": 30, "learning_rate": 5e-3, "batch_size": 16})
    teacher, tokenizer = load_teacher(spec.teacher)
    split = corpus_split(tokenizer, corpus_texts(spec), spec.predistill)
    student = build_student(spec.student, load_config(spec.teacher), seed=0)
    before = _relation_loss_on(student, teacher, split, spec.predistill.relation_heads)
    head = student.state_dict()["classifier.weight"].clone()
    result = predistill(student, teacher, split, spec.predistill, torch.device("cpu"), "fp32")
    after = _relation_loss_on(student.eval(), teacher, split, spec.predistill.relation_heads)
    assert after < 0.5 * before, (before, after)
    assert math.isfinite(result.final_loss) and result.examples == len(split)
    assert torch.equal(student.state_dict()["classifier.weight"], head)  # the head is not pre-distilled
    assert not any(k.startswith("classifier.") for k in encoder_state(student))


def test_the_hidden_state_loss_brings_the_last_layer_to_the_teachers(assets: dict[str, Path]) -> None:
    spec = _spec(assets, predistill={"epochs": 15, "learning_rate": 5e-3, "batch_size": 16})
    teacher, tokenizer = load_teacher(spec.teacher)
    split = corpus_split(tokenizer, corpus_texts(spec), spec.predistill)
    inputs = split.batch(torch.arange(len(split)))

    def fitted_error(model: Any) -> float:
        """The least-squares error of the teacher's last layer from the student's (the best projection)."""
        with torch.no_grad():
            s = model.eval().base_model(**inputs).last_hidden_state[inputs["attention_mask"].bool()]
            t = teacher.base_model(**inputs).last_hidden_state[inputs["attention_mask"].bool()]
        s = torch.cat([s, torch.ones(len(s), 1)], dim=1)
        solution = torch.linalg.lstsq(s, t).solution
        return float(((s @ solution - t) ** 2).mean())

    errors = {}
    for weight in (0.0, 1.0):
        recipe = spec.predistill.model_copy(update={"hidden_weight": weight})
        student = build_student(spec.student, load_config(spec.teacher), seed=0)
        predistill(student, teacher, split, recipe, torch.device("cpu"), "fp32")
        errors[weight] = fitted_error(student)
    # With the MSE on, the student's last layer carries more of the teacher's (about 10% less error here).
    assert errors[1.0] < 0.95 * errors[0.0], errors


def test_a_trial_starts_from_the_pre_distilled_encoder(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(assets, search_space={"predistilled": {"choices": [0, 1]}})
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", precision="fp32", log=lambda _: None)
    stages: list[str] = []
    prepared = engine.prepare(spec, progress=lambda stage, done, total: stages.append(stage))
    assert "predistill" in stages  # one fixed shape: built while preparing, with its progress
    (built,) = prepared.predistilled.values()
    params = {"learning_rate": 1e-2, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 1, "batch_size": 32}
    on = engine._student(prepared, {**params, "predistilled": 1}, seed=3)
    off = engine._student(prepared, {**params, "predistilled": 0}, seed=3)
    state_on, state_off = on.state_dict(), off.state_dict()
    for name, weight in built.weights.items():
        assert torch.equal(state_on[name], weight), name
    assert any(not torch.equal(state_off[name], w) for name, w in built.weights.items())
    assert torch.equal(state_on["classifier.weight"], state_off["classifier.weight"])  # the head: the seed's
    outcome = engine.run_trial(prepared, {**params, "predistilled": 1}, 3, None, tmp_path / "ckpt")
    assert math.isfinite(outcome.best_score)
    import json

    record = json.loads((tmp_path / "ckpt" / "kdsearch_trial.json").read_text())
    assert record["predistilled"]["key"] == built.key and record["predistilled"]["sentences"] == built.meta[
        "sentences"]


def test_a_siamese_trial_starts_from_the_same_pre_distilled_encoder(assets: dict[str, Path], tmp_path: Path) -> None:
    """The encoder is pre-distilled alone: a siamese student of the shape loads the cross student's build (one key,
    one build), keeps its own head, and trains."""
    pair_dataset = {"path": str(assets["pairs"]), "text_column": "sentence1", "text_pair_column": "sentence2",
                    "max_seq_length": 16}
    cross = _spec(assets, dataset=pair_dataset)
    siamese = _spec(assets, dataset=pair_dataset,
                    student={**cross.student.model_dump(exclude_none=True), "pair_encoding": "siamese"})
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", precision="fp32", log=lambda _: None)
    (built_cross,) = engine.prepare(cross).predistilled.values()
    prepared = engine.prepare(siamese)
    (built,) = prepared.predistilled.values()
    assert built.key == built_cross.key
    params = {"learning_rate": 1e-2, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 1, "batch_size": 32,
              "predistilled": 1}
    model = engine._student(prepared, params, seed=3)
    state = model.state_dict()
    assert "pair_head.weight" in state and not any(k.startswith("classifier.") for k in state)
    for name, weight in built.weights.items():
        assert torch.equal(state[name], weight), name
    outcome = engine.run_trial(prepared, params, 3, None, tmp_path / "ckpt")
    assert math.isfinite(outcome.best_score)


def test_relation_heads_that_do_not_divide_the_student_fail_the_study(assets: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    spec = _spec(assets, predistill={"relation_heads": 3})
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", precision="fp32", log=lambda _: None)
    with pytest.raises(DataError, match=r"predistill.relation_heads \(3\) must divide the student's hidden size"):
        engine.prepare(spec)


def _build_in_child(spec_json: str, artifacts: str, log_path: str, pause_s: float) -> None:
    """A worker's build of one key, logging to ``log_path``; ``pause_s`` slows each epoch (to be killed in)."""
    from distill import predistill as module

    if pause_s:
        original = module.predistill

        def slow(*args: Any) -> Any:  # build_or_load_predistilled's call: on_epoch is the ninth argument
            on_epoch = args[8]

            def paused(state: dict[str, Any]) -> None:
                on_epoch(state)
                time.sleep(pause_s)

            return original(*args[:8], paused)  # type: ignore[call-arg]

        module.predistill = slow  # type: ignore[assignment]
    spec = StudySpec.model_validate_json(spec_json)

    def log(line: str) -> None:
        with open(log_path, "a") as out:
            out.write(line + "\n")

    build_or_load_predistilled(make_layout(artifacts), spec, spec.student, load_config(spec.teacher),
                               torch.device("cpu"), "fp32", log=log)


def test_racing_workers_build_a_key_once(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(assets, predistill={"epochs": 5})
    ctx = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [ctx.Process(target=_build_in_child, args=(spec.model_dump_json(), str(tmp_path / "artifacts"),
                                                         str(log), 0.0)) for log in logs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    text = "".join(log.read_text() if log.is_file() else "" for log in logs)
    assert text.count("pre-distilling pre-") == 1, text
    built = build_or_load_predistilled(make_layout(tmp_path / "artifacts"), spec, spec.student,
                                       load_config(spec.teacher), torch.device("cpu"), "fp32",
                                       log=lambda line: pytest.fail(f"built again: {line}"))
    assert built.meta["sentences"] == len(corpus_texts(spec))


def test_a_build_killed_mid_way_resumes_from_its_last_epoch(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(assets, predistill={"epochs": 6})
    key = predistill_key(spec, spec.student, corpus_texts(spec))
    resume = tmp_path / "artifacts" / "cache" / f"{key}.resume"
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_build_in_child, args=(spec.model_dump_json(), str(tmp_path / "artifacts"),
                                                      str(tmp_path / "killed.log"), 3.0))
    child.start()
    deadline = time.monotonic() + 120
    while not resume.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert resume.is_file(), "the build saved no progress"
    assert child.pid is not None
    os.kill(child.pid, signal.SIGKILL)  # mid-build, holding the build lock
    child.join(30)
    lines: list[str] = []
    built = build_or_load_predistilled(make_layout(tmp_path / "artifacts"), spec, spec.student,
                                       load_config(spec.teacher), torch.device("cpu"), "fp32", log=lines.append)
    assert any("resuming after epoch" in line for line in lines), lines
    assert built.meta["recipe"]["epochs"] == 6 and math.isfinite(built.meta["final_loss"])
    assert not resume.exists()  # the finished entry replaced it


# -- the spec ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "field"), [
    ({"search_space": {"predistilled": 2}}, "search_space.predistilled"),
    ({"predistill": {"epochs": 0}}, "predistill.epochs"),
    ({"predistill": {"corpus": [{"path": "/x", "hub": "glue"}]}}, "predistill.corpus.0"),
    ({"predistill": {"task_texts": False}}, "predistill"),
])
def test_bad_pre_distillation_settings_name_their_field(assets: dict[str, Path], change: dict[str, Any],
                                                        field: str) -> None:
    from pydantic import ValidationError

    spec = tiny_spec(assets)
    for block, values in change.items():
        spec[block] = {**spec.get(block, {}), **values}
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(spec)
    fields = [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]
    assert any(f.startswith(field) for f in fields), fields


def test_a_pretrained_student_is_not_pre_distilled(assets: dict[str, Path]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"search_space\.predistilled: a pretrained student"):
        StudySpec.model_validate(tiny_spec(assets, student={"model": str(assets["teacher"])},
                                           search_space={"predistilled": True}))
    spec = StudySpec.model_validate(tiny_spec(assets, search_space={"predistilled": {"choices": [False, True]}}))
    assert spec.search_space.predistilled.choices == [0, 1]  # type: ignore[union-attr]



def test_each_searched_shape_gets_its_own_pre_distilled_student(assets: dict[str, Path], tmp_path: Path) -> None:
    spec = _spec(assets, student={"config": {"num_hidden_layers": 1, "hidden_size": {"choices": [16, 32]},
                                             "num_attention_heads": 2, "intermediate_size": 32}})
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", precision="fp32", log=lambda _: None)
    prepared = engine.prepare(spec)
    assert prepared.predistilled == {}  # a searched shape: built on a trial's first use of it, not while preparing
    params = {"learning_rate": 1e-2, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 1, "batch_size": 32,
              "predistilled": 1}
    narrow = engine._student(prepared, {**params, "hidden_size": 16}, seed=1)
    wide = engine._student(prepared, {**params, "hidden_size": 32}, seed=1)
    engine._student(prepared, {**params, "hidden_size": 16}, seed=2)  # the same shape again: no new build
    assert narrow.config.hidden_size == 16 and wide.config.hidden_size == 32
    keys = {built.key for built in prepared.predistilled.values()}
    assert len(keys) == 2
    assert sorted(p.name for p in (tmp_path / "artifacts" / "cache").iterdir() if p.is_dir()
                  and p.name.startswith("pre-")) == sorted(keys)


def test_a_corrupt_object_in_the_bucket_is_rebuilt(assets: dict[str, Path], tmp_path: Path) -> None:
    import boto3
    from moto import mock_aws

    from storage import ENTRY_TENSORS, ObjectStoreLayout

    spec = _spec(assets)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="kdsearch-predistill")

        def build(host: str) -> tuple[Any, list[str]]:
            lines: list[str] = []
            layout = ObjectStoreLayout("s3://kdsearch-predistill/team", tmp_path / host, client=client)
            return build_or_load_predistilled(layout, spec, spec.student, load_config(spec.teacher),
                                              torch.device("cpu"), "fp32", log=lines.append), lines

        first, lines = build("host-a")
        assert any("pre-distilling" in line for line in lines)
        data_key = f"team/cache/{first.key}/{ENTRY_TENSORS}"
        whole = client.get_object(Bucket="kdsearch-predistill", Key=data_key)["Body"].read()
        # Truncated, its manifest unchanged.
        client.put_object(Bucket="kdsearch-predistill", Key=data_key, Body=whole[: len(whole) // 2])
        second, lines = build("host-b")  # an empty local cache: downloads, finds the checksum wrong, rebuilds
        assert any("pre-distilling" in line for line in lines), lines
        assert len(client.get_object(Bucket="kdsearch-predistill", Key=data_key)["Body"].read()) == len(whole)
        for name, weight in first.weights.items():
            assert torch.equal(second.weights[name], weight), name  # the same recipe, the same weights
        third, lines = build("host-c")
        assert lines == [] and third.key == first.key  # a good entry is only downloaded


def test_submit_sends_corpus_directories_as_absolute_paths(tmp_path: Path) -> None:
    from service.cli import absolute_paths

    (tmp_path / "texts").mkdir()
    spec = {"predistill": {"corpus": [{"path": "texts"}, {"path": "not-here"}, {"hub": "glue", "config": "sst2"}]}}
    sent = absolute_paths(spec, tmp_path)
    assert sent["predistill"]["corpus"] == [{"path": str(tmp_path / "texts")}, {"path": "not-here"},
                                            {"hub": "glue", "config": "sst2"}]
