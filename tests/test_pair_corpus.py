"""Teacher-labelled pair corpora (issue 25): recombined and perturbed pairs, built in rounds, labelled once, and
trials that train on a searched number of copies."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill import DistillationEngine, TrainConfig, load_teacher
from distill.data import DataError
from distill.pair_corpus import (
    HARD_NEGATIVE,
    PERTURBED,
    RANDOM_PAIR,
    SIDE,
    STRATEGIES,
    LexicalNeighbours,
    WordNeighbours,
    build_corpus,
)
from distill.transfer import label_mix_rows, transfer_key
from kdsearch.testing import tiny_spec, write_tiny_model
from kdsearch.testing.fixtures import NEGATIVE, NEUTRAL, POSITIVE
from search_space import AugmentSpec, StudySpec, optuna_distributions, trial_params
from tests.conftest import pair_spec

MIX = {"hard_negatives": 0.3, "random_pairs": 0.2, "perturbed": 0.3}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_teacher(str(write_tiny_model(tmp_path_factory.mktemp("tok"), seed=0)))[1]


def topic_pairs(n: int = 240, topics: int = 24, seed: int = 0) -> tuple[list[str], list[str]]:
    """Pairs on one topic each: three of the topic's five words and three common words per sentence."""
    rng = random.Random(seed)
    common = [f"c{i}" for i in range(8)]
    firsts, seconds = [], []
    for row in range(n):
        topic = [f"t{row % topics}w{i}" for i in range(5)]
        for side in (firsts, seconds):
            words = rng.sample(topic, 3) + rng.sample(common, 3)
            rng.shuffle(words)
            side.append(" ".join(words))
    return firsts, seconds


def shared(a: str, b: str) -> int:
    return len(set(a.split()) & set(b.split()))


# --------------------------------------------------------------------------------------------- the generator


def test_corpus_is_deterministic_and_its_first_rounds_are_the_smaller_corpus(tokenizer: Any) -> None:
    firsts, seconds = topic_pairs()
    embeddings = torch.randn(len(tokenizer), 8, generator=torch.Generator().manual_seed(0))
    spec = AugmentSpec(copies=4, seed=7, pairs=MIX)
    one = build_corpus(firsts, seconds, spec, tokenizer, embeddings)
    two = build_corpus(firsts, seconds, spec, tokenizer, embeddings)
    assert (one.texts, one.pairs, one.sources.tolist(), one.strategies.tolist()) == (
        two.texts, two.pairs, two.sources.tolist(), two.strategies.tolist())
    n = len(firsts)
    assert one.round_ends == [n, 2 * n, 3 * n, 4 * n] and one.sources.tolist() == list(range(n)) * 4
    counts = one.strategy_rows()
    assert set(counts) == set(STRATEGIES) and all(counts.values()), counts  # every strategy drawn
    assert abs(counts["hard_negative"] / (4 * n) - 0.3) < 0.06 and abs(counts["side"] / (4 * n) - 0.2) < 0.06

    smaller = build_corpus(firsts, seconds, spec.model_copy(update={"copies": 2}), tokenizer, embeddings)
    k = one.round_ends[1]
    assert smaller.texts == one.texts[:k] and smaller.pairs == (one.pairs or [])[:k]
    assert smaller.strategies.tolist() == one.strategies[:k].tolist()
    other_seed = build_corpus(firsts, seconds, spec.model_copy(update={"seed": 8}), tokenizer, embeddings)
    assert other_seed.texts != one.texts


def test_single_texts_come_in_rounds_too(tokenizer: Any) -> None:
    texts = ["the movie was good", "a plot", "", "very dull film"]  # an empty row gets no variant
    corpus = build_corpus(texts, None, AugmentSpec(copies=3, seed=2), tokenizer)
    assert corpus.pairs is None and corpus.round_ends == [3, 6, 9]
    assert corpus.sources.tolist() == [0, 1, 3] * 3 and set(corpus.strategies.tolist()) == {SIDE}
    first = build_corpus(texts, None, AugmentSpec(copies=1, seed=2), tokenizer)
    assert first.texts == corpus.texts[:3]


def test_hard_negatives_are_lexically_close_and_never_the_partner(tokenizer: Any) -> None:
    firsts, seconds = topic_pairs()
    firsts[1] = firsts[0]  # a first sentence paired twice: neither of its partners is a hard negative
    hard = build_corpus(firsts, seconds, AugmentSpec(copies=3, pairs={"hard_negatives": 1.0}), tokenizer)
    rand = build_corpus(firsts, seconds, AugmentSpec(copies=3, pairs={"random_pairs": 1.0}), tokenizer)
    assert set(hard.strategies.tolist()) == {HARD_NEGATIVE} and set(rand.strategies.tolist()) == {RANDOM_PAIR}
    for corpus in (hard, rand):
        for a, b, row in zip(corpus.texts, corpus.pairs or [], corpus.sources, strict=True):
            assert a == firsts[row] and b not in (firsts[row], seconds[row])
            assert not (row in (0, 1) and b in (seconds[0], seconds[1]))
    hard_overlap = np.mean([shared(a, b) for a, b in zip(hard.texts, hard.pairs or [], strict=True)])
    rand_overlap = np.mean([shared(a, b) for a, b in zip(rand.texts, rand.pairs or [], strict=True)])
    assert hard_overlap > rand_overlap + 1.0, (hard_overlap, rand_overlap)
    # A hard negative is one of the anchor's nearest: a sentence of its own topic (three topic words shared at best).
    topic_of = lambda text: {w.split("w")[0] for w in text.split() if w.startswith("t")}  # noqa: E731
    assert np.mean([topic_of(a) == topic_of(b) for a, b in zip(hard.texts, hard.pairs or [], strict=True)]) > 0.95


def test_lexical_neighbours_rank_by_overlap() -> None:
    firsts = ["red apple pie", "blue sky", "green tea"]
    seconds = ["apple pie recipe", "clear blue sky today", "tea time"]
    lexical = LexicalNeighbours([*firsts, "red apple tart"], [*seconds, "apple"], pool=2)
    nearest = [lexical.sentences[i] for i in lexical.nearest(lexical.sentences.index("red apple pie"))]
    # Its partner ("apple pie recipe") is excluded; the sentence sharing two words comes first.
    assert nearest == ["red apple tart", "apple"]
    assert [lexical.sentences[i] for i in lexical.nearest(lexical.sentences.index("green tea"))] == []


def test_order_swap_swaps_and_word_perturbations_stay_in_their_sentence(tokenizer: Any) -> None:
    firsts, seconds = topic_pairs(n=60)
    order = AugmentSpec(copies=2, pairs={"perturbed": 1.0, "p_neighbour": 0, "p_delete": 0, "p_swap": 0,
                                         "p_order": 1.0})
    corpus = build_corpus(firsts, seconds, order, tokenizer)
    assert set(corpus.strategies.tolist()) == {PERTURBED}
    assert all((a, b) == (seconds[row], firsts[row])
               for a, b, row in zip(corpus.texts, corpus.pairs or [], corpus.sources, strict=True))

    swaps = AugmentSpec(copies=2, pairs={"perturbed": 1.0, "p_neighbour": 0, "p_delete": 0, "p_swap": 0.3,
                                         "p_order": 0})
    corpus = build_corpus(firsts, seconds, swaps, tokenizer)
    changed = 0
    for a, b, row in zip(corpus.texts, corpus.pairs or [], corpus.sources, strict=True):
        assert Counter(a.split()) == Counter(firsts[row].split())
        assert Counter(b.split()) == Counter(seconds[row].split())
        changed += a != firsts[row]
    assert changed > len(corpus.texts) // 2

    deletes = AugmentSpec(copies=1, pairs={"perturbed": 1.0, "p_neighbour": 0, "p_delete": 1.0, "p_swap": 0,
                                           "p_order": 0})
    corpus = build_corpus(firsts, seconds, deletes, tokenizer)
    assert all(len(a.split()) == 1 and a in firsts[row].split()
               for a, row in zip(corpus.texts, corpus.sources, strict=True))


def _teacher_with_neighbours(directory: Path) -> tuple[Path, dict[str, str]]:
    """A tiny teacher whose word embeddings put designed words next to each other (and the rest far apart)."""
    from transformers import AutoModelForSequenceClassification

    path = write_tiny_model(directory, seed=3)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tokenizer = load_teacher(str(path))[1]
    weight = model.get_input_embeddings().weight
    designed = {"good": "great", "bad": "awful", "movie": "film", "plot": "story", "boring": "dull"}
    with torch.no_grad():
        basis = torch.linalg.qr(torch.randn(weight.shape[1], weight.shape[1],
                                            generator=torch.Generator().manual_seed(0)))[0]
        words = [w for w in [*POSITIVE, *NEGATIVE, *NEUTRAL] if w not in designed.values()]
        for i, word in enumerate(words):  # orthogonal directions: every other word is far
            weight[tokenizer.convert_tokens_to_ids(word)] = basis[i % weight.shape[1]] * (1 + i // weight.shape[1])
        for word, twin in designed.items():
            weight[tokenizer.convert_tokens_to_ids(twin)] = weight[tokenizer.convert_tokens_to_ids(word)] * 2 + 0.01
        weight[tokenizer.convert_tokens_to_ids("[MASK]")] = weight[tokenizer.convert_tokens_to_ids("good")]  # special
    model.save_pretrained(path)
    return path, designed | {twin: word for word, twin in designed.items()}


def test_word_neighbours_are_the_teachers(tmp_path: Path) -> None:
    path, designed = _teacher_with_neighbours(tmp_path / "teacher")
    model, tokenizer = load_teacher(str(path))
    embeddings = model.get_input_embeddings().weight
    corpus_words = ["Good", "bad", "movie", "plot", "boring", "zebra", "the", "was"]
    neighbours = WordNeighbours(corpus_words, embeddings, tokenizer, k=3)
    assert set(neighbours.table) == {"Good", "bad", "movie", "plot", "boring", "the", "was"}  # the corpus's words
    assert neighbours.get("Good")[0] == "great" and neighbours.get("boring")[0] == "dull"
    assert all(neighbours.get(word)[0] == designed[word.lower()]
               for word in corpus_words if word.lower() in designed)
    assert neighbours.get("zebra") == []  # not a whole word of the teacher's vocabulary: never replaced
    specials = set(tokenizer.all_special_tokens)
    assert all(not specials & set(n) and word.lower() not in n for word, n in neighbours.table.items())
    # The same ranking as cosine over the whole-word vocabulary (in id order: ties go to the lower id), computed
    # independently.
    unit = torch.nn.functional.normalize(embeddings.detach().double(), dim=1)
    vocab = [*POSITIVE, *NEGATIVE, *NEUTRAL]
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(vocab))
    assert ids.tolist() == sorted(ids.tolist())
    for word in ("the", "movie", "was"):
        sims = torch.round(unit[ids] @ unit[tokenizer.convert_tokens_to_ids(word)], decimals=9)
        ranked = torch.argsort(-sims, stable=True)
        assert neighbours.get(word) == [vocab[int(i)] for i in ranked if vocab[int(i)] != word][:3]

    # Through a perturbed corpus: every word replaced by its nearest neighbour.
    firsts, seconds = ["good movie", "the plot was boring"], ["bad film", "a dull story"]
    spec = AugmentSpec(copies=2, pairs={"perturbed": 1.0, "p_neighbour": 1.0, "p_delete": 0, "p_swap": 0,
                                        "p_order": 0, "neighbours": 1})
    corpus = build_corpus(firsts, seconds, spec, tokenizer, embeddings)
    assert corpus.texts[:2] == ["great film", f"{neighbours.get('the')[0]} story {neighbours.get('was')[0]} dull"]
    assert corpus.pairs is not None and corpus.pairs[0] == "awful movie"
    with pytest.raises(ValueError, match="input embeddings"):
        build_corpus(firsts, seconds, spec, tokenizer)


# ------------------------------------------------------------------------------------------- the engine


def test_transfer_set_is_labelled_once_and_trials_take_its_rounds(pair_assets, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.transfer

    labelled: list[int] = []
    real = distill.transfer.predict_logits
    monkeypatch.setattr(distill.transfer, "predict_logits",
                        lambda model, split, *a, **k: labelled.append(len(split)) or real(model, split, *a, **k))
    augment = {"copies": 3, "seed": 4, "pairs": {**MIX, "p_neighbour": 0.3}}
    spec = StudySpec.model_validate(pair_spec(pair_assets, "sts", augment=augment))
    prepared = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    n = prepared.cache.meta["n_train"]
    assert labelled == [3 * n] and prepared.train_rows == (n, 2 * n, 3 * n, 4 * n)
    # Another worker, and a study that searches the copies: the same entry, not labelled again.
    searched = StudySpec.model_validate(pair_spec(pair_assets, "sts", name="other", augment=augment, search_space={
        **pair_spec(pair_assets, "sts")["search_space"], "transfer_copies": {"low": 0, "high": 3}}))
    assert transfer_key(searched, prepared.task) == transfer_key(spec, prepared.task)
    again = DistillationEngine(tmp_path / "art", device="cpu").prepare(searched)
    assert labelled == [3 * n]
    torch.testing.assert_close(again.train_logits, prepared.train_logits)

    engine = DistillationEngine(tmp_path / "art", device="cpu")
    params = {"learning_rate": 1e-3, "alpha": 0.5, "num_train_epochs": 1, "batch_size": 32}
    for copies, rows in ((0, n), (1, 2 * n), (None, 4 * n)):
        cfg = TrainConfig.from_params({**params, "transfer_copies": copies}, regression=True, seed=1)
        assert cfg.transfer_copies == copies
        split, logits = engine.train_split(again, cfg)
        assert len(split) == len(logits) == rows
        torch.testing.assert_close(logits, again.train_logits[:rows])
    with pytest.raises(ValueError, match="transfer set has 3 copies"):
        engine.train_split(again, TrainConfig.from_params({**params, "transfer_copies": 4}, regression=True, seed=1))

    # The first round of the 3-copy set is the 1-copy set, labelled the same.
    one = DistillationEngine(tmp_path / "art", device="cpu").prepare(
        StudySpec.model_validate(pair_spec(pair_assets, "sts", augment={**augment, "copies": 1})))
    assert labelled == [3 * n, n]
    first, first_logits = engine.train_split(again, TrainConfig.from_params({**params, "transfer_copies": 1},
                                                                          regression=True, seed=1))
    width = int(one.train.lengths.max())
    assert torch.equal(first.input_ids[:, :width], one.train.input_ids[:, :width])
    torch.testing.assert_close(first_logits, one.train_logits, rtol=1e-4, atol=1e-5)


def test_label_mix_rows_keep_each_rounds_largest_sample_at_the_target_mix() -> None:
    # Round 1 (rows 0-9): 8 of class 0, 2 of class 1; round 2 (rows 10-15): 3 and 3. Target 50/50.
    predicted = np.array([0] * 8 + [1] * 2 + [0, 1, 0, 1, 0, 1])
    keep, ends = label_mix_rows(predicted, [10, 16], np.array([0.5, 0.5]), seed=0)
    assert ends == [4, 10]
    assert set(keep[:4]) >= {8, 9} and np.bincount(predicted[keep[:4]]).tolist() == [2, 2]
    assert keep[4:].tolist() == list(range(10, 16))  # already at the mix: every row, in order
    assert keep.tolist() == sorted(keep.tolist())
    again, _ = label_mix_rows(predicted, [10, 16], np.array([0.5, 0.5]), seed=0)
    assert again.tolist() == keep.tolist()  # seeded
    # 68/32 from a round of 50 class-0 and 50 class-1 rows: class 0 binds (50 / 0.68 = 73 rows).
    keep, ends = label_mix_rows(np.repeat([0, 1], 50), [100], np.array([0.68, 0.32]), seed=1)
    assert ends == [len(keep)] and np.bincount(np.repeat([0, 1], 50)[keep]).tolist() == [50, 23]
    # A class the train split lacks is dropped; a round without a wanted class keeps nothing.
    keep, ends = label_mix_rows(np.array([0, 1, 2, 0, 0]), [3, 5], np.array([0.5, 0.5, 0.0]), seed=0)
    assert keep.tolist() == [0, 1] and ends == [2, 2]


def test_transfer_set_matches_the_train_label_mix(pair_assets, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.transfer

    # A teacher that calls 4 of every 6 transfer rows "contradiction" (class 2), whatever the train mix.
    def skewed(model: Any, split: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        classes = torch.tensor([2, 2, 0, 2, 1, 2]).repeat(len(split) // 6 + 1)[:len(split)]
        return torch.nn.functional.one_hot(classes, 3).float() * 5

    monkeypatch.setattr(distill.transfer, "predict_logits", skewed)
    augment = {"copies": 3, "seed": 4, "pairs": MIX}
    plain = DistillationEngine(tmp_path / "art", device="cpu").prepare(
        StudySpec.model_validate(pair_spec(pair_assets, "nli", augment=augment)))
    spec = StudySpec.model_validate(pair_spec(pair_assets, "nli", augment={**augment, "match_label_mix": True}))
    assert transfer_key(spec, plain.task) != transfer_key(StudySpec.model_validate(
        pair_spec(pair_assets, "nli", augment=augment)), plain.task)
    prepared = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    n = prepared.cache.meta["n_train"]
    gold = np.bincount(prepared.train.labels[:n].numpy(), minlength=3) / n
    ends = prepared.train_rows
    assert len(ends) == 4 and ends[0] == n and all(b > a for a, b in itertools.pairwise(ends))
    assert ends[-1] - n < len(plain.train) - n  # rows were dropped
    for start, end in itertools.pairwise(ends):  # each round at the train split's mix, within a row per class
        counts = np.bincount(prepared.train_logits[start:end].argmax(-1).numpy(), minlength=3)
        assert np.all(np.abs(counts - gold * (end - start)) <= 1.5), (counts, gold)
    engine = DistillationEngine(tmp_path / "art", device="cpu")
    cached = distill.transfer.build_or_load_transfer_set(engine.layout, spec, prepared.task, engine.device)
    assert cached is not None and cached.round_ends == [end - n for end in ends[1:]]
    mix = cached.meta["label_mix"]
    assert mix["rows_kept"] == ends[-1] - n and mix["rows_before"] == len(plain.train) - n
    assert mix["labelled"][2] == pytest.approx(4 / 6, abs=0.01) and mix["train"] == pytest.approx(gold, abs=1e-4)
    assert sum(cached.meta["strategy_rows"].values()) == mix["rows_kept"]
    # The kept rows are rows of the unbalanced set, with their logits.
    plain_rows = {tuple(row.tolist()) for row in plain.train.input_ids[n:]}
    assert all(tuple(row.tolist()) in plain_rows for row in prepared.train.input_ids[n:])

    # Regression has no class mix: refused naming the field.
    with pytest.raises(DataError, match="match_label_mix applies to classification"):
        DistillationEngine(tmp_path / "art", device="cpu").prepare(StudySpec.model_validate(
            pair_spec(pair_assets, "sts", augment={**augment, "match_label_mix": True})))


def test_pair_options_are_validated_naming_the_field(tiny_assets, pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings

    assert not AugmentSpec().pairs.active
    assert StudySpec.model_validate(tiny_spec(tiny_assets)).search_space.transfer_copies is None
    base = pair_spec(pair_assets, "sts")["search_space"]
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a")
    with TestClient(create_app(settings)) as client:
        def refused(spec: dict[str, Any]) -> tuple[str, str]:
            response = client.post("/api/studies", json=spec)
            assert response.status_code == 422, response.text
            error = response.json()["detail"][0]
            return ".".join(str(p) for p in error["loc"][1:]), error["msg"]

        loc, msg = refused(tiny_spec(tiny_assets, augment={"copies": 2, "pairs": {"random_pairs": 0.5}}))
        assert loc == "augment" and "dataset.text_pair_column" in msg
        loc, msg = refused(pair_spec(pair_assets, "sts", augment={"copies": 2, "pairs": {"hard_negatives": 0.6,
                                                                                         "perturbed": 0.6}}))
        assert loc == "augment.pairs" and "hard_negatives + random_pairs + perturbed must be <= 1" in msg
        loc, _ = refused(pair_spec(pair_assets, "sts", augment={"copies": 2, "pairs": {"p_order": 2}}))
        assert loc == "augment.pairs.p_order"
        loc, msg = refused(pair_spec(pair_assets, "sts", augment={"copies": 2},
                                     search_space={**base, "transfer_copies": {"choices": [1, 3]}}))
        assert loc == "search_space" and "transfer_copies must be <= augment.copies (2)" in msg
        loc, msg = refused(pair_spec(pair_assets, "sts", search_space={**base, "transfer_copies": 1}))
        assert loc == "search_space" and "augment.copies (0)" in msg
        loc, msg = refused(pair_spec(pair_assets, "sts", augment={"copies": 2},
                                     search_space={**base, "transfer_copies": {"low": 0, "high": 1.5}}))
        assert loc == "search_space.transfer_copies" and "integer" in msg
        loc, msg = refused(pair_spec(pair_assets, "sts", augment={"copies": 2, "match_label_mix": True}))
        assert loc == "augment.match_label_mix" and "classification" in msg
        loc, msg = refused(pair_spec(pair_assets, "sts", predistill={"task_pair_splits": ["train"]}))
        assert loc == "predistill" and "set task_pairs too" in msg
        loc, _ = refused(pair_spec(pair_assets, "sts", predistill={"task_pairs": 1, "task_pair_splits": ["a b"]}))
        assert loc == "predistill.task_pair_splits.0"
        ok = client.post("/api/studies", json=pair_spec(pair_assets, "sts", name="ok", augment={
            "copies": 2, "p_mask": 0, "p_replace": 0, "p_ngram": 0, "pairs": {"hard_negatives": 0.5, "perturbed": 0.5}},
            search_space={**base, "transfer_copies": {"low": 0, "high": 2}}))
        assert ok.status_code == 201, ok.text


def test_transfer_copies_is_an_integer_parameter_and_packs_apart() -> None:
    from search_space import SearchSpace
    from service.trial_runner import pack_groups

    space = SearchSpace(transfer_copies={"low": 0, "high": 4})
    assert optuna_distributions(space)["transfer_copies"].__class__.__name__ == "IntDistribution"
    assert trial_params(SearchSpace(transfer_copies=2), {})["transfer_copies"] == 2
    assert "transfer_copies" not in trial_params(SearchSpace(), {})  # unset: all copies built
    params = [{"batch_size": 32, "transfer_copies": 1}, {"batch_size": 32, "transfer_copies": 2},
              {"batch_size": 32, "transfer_copies": 1}, {"batch_size": 32}]
    assert pack_groups(params, set()) == [[0, 2], [1], [3]]


def test_tiny_pair_study_searches_transfer_copies(pair_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A packed worker (pack 3, in this process) on a pair study with a 2-copy pair corpus and transfer_copies
    searched: every trial completes, trains on its own prefix, and packs only trials of one transfer size."""
    import optuna
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings
    from service.worker import Worker

    seen: list[tuple[int | None, int]] = []

    class Spy(DistillationEngine):
        def train_split(self, prepared: Any, cfg: TrainConfig) -> Any:
            split, logits = super().train_split(prepared, cfg)
            seen.append((cfg.transfer_copies, len(split)))
            return split, logits

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=str(tmp_path / "artifacts"), pack="3")
    spec = pair_spec(pair_assets, "sts", name="copies", n_trials=6, sampler="random", seed=3,
                     augment={"copies": 2, "pairs": MIX},
                     search_space={"num_train_epochs": 1, "batch_size": 32, "learning_rate": 5e-3,
                                   "transfer_copies": {"low": 0, "high": 2}})
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=spec).status_code == 201
        Worker(settings, device="cpu", trial_engine=Spy(settings.artifacts), exit_when_idle=True).run()
        detail = client.get("/api/studies/copies").json()
        trials = optuna.load_study(study_name="copies", storage=client.app.state.optuna_storage).trials  # type: ignore[attr-defined]
    assert detail["status"] == "finished" and detail["finished"] == 6, detail
    assert all(t.state.name == "COMPLETE" for t in trials)
    copies = [t.params["transfer_copies"] for t in trials]
    assert len(set(copies)) > 1, copies  # seed 3 samples several sizes
    n = 160  # train rows; each copy adds as many
    assert all(rows == n * (1 + c) for c, rows in seen) and {c for c, _ in seen} == set(copies), seen
    by_number = {t.number: t for t in trials}
    for t in trials:
        members = t.user_attrs.get("pack", {}).get("members", [t.number])
        assert {by_number[m].params["transfer_copies"] for m in members} == {t.params["transfer_copies"]}


def test_model_card_names_the_pair_strategies() -> None:
    from distill.hub_model import _augment_sentence

    mixed = _augment_sentence(AugmentSpec(copies=3, pairs={"hard_negatives": 0.25, "perturbed": 0.4}).model_dump())
    assert "0.25 paired the first sentence with a lexically close sentence" in mixed
    assert "0.4 were perturbed copies" in mixed and "sentence order swapped p=0.5" in mixed
    assert "hard negatives" not in _augment_sentence(AugmentSpec(copies=3).model_dump())
