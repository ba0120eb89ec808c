"""Student quality features: the teacher-labelled transfer set, teacher-PCA embeddings, retraining over seeds."""

from __future__ import annotations

import os
import statistics
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from distill import (
    Augmenter,
    DistillationEngine,
    TextSplit,
    build_student,
    load_split,
    load_teacher,
    predict_logits,
    tokenize,
)
from kdsearch.terms import NO_LABEL
from kdsearch.testing import KDSEARCH, ROOT, tiny_spec
from search_space import AugmentSpec, StudentSpec, StudySpec
from service.api import create_app
from service.settings import Settings
from service.worker import Worker

TEXTS = ["the movie was good", "the movie was bad", "the plot was dull", "a very funny and charming film",
         "it is great"]


def test_augmenter_is_deterministic_and_seeded() -> None:
    spec = AugmentSpec(copies=4, seed=7)
    first = Augmenter(TEXTS, spec, "[MASK]").transfer_set(TEXTS)
    again = Augmenter(TEXTS, spec, "[MASK]").transfer_set(TEXTS)
    other = Augmenter(TEXTS, spec.model_copy(update={"seed": 8}), "[MASK]").transfer_set(TEXTS)
    assert first[1] is None  # single sentences: no pair texts
    first, again, other = ((v, s) for v, _, s in (first, again, other))
    assert first[0] == again[0] and first[1].tolist() == again[1].tolist()
    assert first[0] != other[0]
    variants, sources = first
    assert len(variants) == 4 * len(TEXTS)
    # In rounds of one variant per row (its first k rounds are the k-copy set: search_space.transfer_copies).
    assert sources.tolist() == [i for _ in range(4) for i in range(len(TEXTS))]


def test_each_operation_alone() -> None:
    mask_only = Augmenter(TEXTS, AugmentSpec(copies=3, p_mask=0.5, p_replace=0, p_ngram=0), "[MASK]")
    variants, _, sources = mask_only.transfer_set(TEXTS)
    for variant, source in zip(variants, sources, strict=True):
        words, original = variant.split(), TEXTS[source].split()
        assert len(words) == len(original)
        assert all(w == o or w == "[MASK]" for w, o in zip(words, original, strict=True))

    # Replacement draws another word seen between the same neighbours: ("was", end of sentence) holds good/bad/dull.
    swap = Augmenter(TEXTS, AugmentSpec(copies=5, p_mask=0, p_replace=1.0, p_ngram=0), None)
    variants, _, sources = swap.transfer_set(TEXTS)
    for variant, source in zip(variants, sources, strict=True):
        if TEXTS[source] == "the movie was good":
            assert variant.split()[3] in {"bad", "dull"}
    vocabulary = {w for t in TEXTS for w in t.split()}
    assert all(set(v.split()) <= vocabulary for v in variants)

    ngram = Augmenter(TEXTS, AugmentSpec(copies=5, p_mask=0, p_replace=0, p_ngram=1.0, max_ngram=2), None)
    variants, _, sources = ngram.transfer_set(TEXTS)
    for variant, source in zip(variants, sources, strict=True):
        assert 1 <= len(variant.split()) <= 2 and variant in TEXTS[source]


def test_masking_needs_a_mask_token() -> None:
    with pytest.raises(ValueError, match="mask token"):
        Augmenter(TEXTS, AugmentSpec(copies=1), None)


def test_transfer_set_is_teacher_labelled_cached_and_trained_on(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, augment={"copies": 3, "seed": 1}))
    built: list[str] = []
    prepared = DistillationEngine(tmp_path / "art", device="cpu", log=built.append).prepare(spec)
    n_train = prepared.cache.meta["n_train"]
    assert len(prepared.train) == 4 * n_train
    labels = prepared.train.labels
    assert (labels[:n_train] >= 0).all() and (labels[n_train:] == NO_LABEL).all()

    # The cached logits are the teacher's on the variant texts, row for row.
    texts = load_split(spec.dataset, "train").texts
    variants, _, _ = Augmenter(texts, spec.augment, "[MASK]").transfer_set(texts)
    teacher, tokenizer = load_teacher(spec.teacher)
    fresh = predict_logits(teacher, tokenize(tokenizer, TextSplit(variants, np.zeros(len(variants), dtype=np.int64)),
                                             16), 64, torch.device("cpu"))
    torch.testing.assert_close(prepared.train_logits[n_train:], fresh, rtol=1e-4, atol=1e-5)

    # Built once: a second engine (another worker) loads both entries; another copies count is another entry.
    again: list[str] = []
    DistillationEngine(tmp_path / "art", device="cpu", log=again.append).prepare(spec)
    assert not any("building" in line for line in again)
    more = spec.model_copy(update={"augment": spec.augment.model_copy(update={"copies": 1})})
    other: list[str] = []
    assert len(DistillationEngine(tmp_path / "art", device="cpu", log=other.append).prepare(more).train) == 2 * n_train
    assert any("transfer set" in line for line in other) and not any("teacher-logit cache" in line for line in other)

    outcome = DistillationEngine(tmp_path / "art", device="cpu").run_trial(
        prepared, {"learning_rate": 5e-3, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 1, "batch_size": 32},
        seed=0, on_epoch_end=None, checkpoint_dir=tmp_path / "ckpt")
    assert outcome.history[0].train_loss > 0 and 0 <= outcome.best_score <= 1


def test_teacher_pca_embeddings(tiny_assets) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_assets["teacher"])
    teacher_state = AutoModelForSequenceClassification.from_pretrained(tiny_assets["teacher"]).state_dict()
    words = teacher_state["bert.embeddings.word_embeddings.weight"]
    arch = {"num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}

    # As wide as the teacher, the projection is a rotation: distances between words are the teacher's.
    same = build_student(StudentSpec(config={**arch, "hidden_size": 32}, embedding_init="teacher_pca"), config,
                         seed=0, teacher_state=teacher_state)
    projected = same.bert.embeddings.word_embeddings.weight.detach()
    torch.testing.assert_close(torch.cdist(projected, projected), torch.cdist(words, words), rtol=1e-4, atol=1e-4)

    # Narrower, it keeps the top principal directions: more of the spread than a random projection would.
    narrow = build_student(StudentSpec(config={**arch, "hidden_size": 8}, embedding_init="teacher_pca"), config,
                           seed=0, teacher_state=teacher_state)
    kept = narrow.bert.embeddings.word_embeddings.weight.detach().var(0).sum()
    assert kept > 0.25 * (words - words.mean(0)).var(0).sum() * 8 / 32
    pos = narrow.bert.embeddings.position_embeddings.weight
    assert pos.shape == (config.max_position_embeddings, 8) and pos.abs().sum() > 0

    with pytest.raises(ValueError, match="hidden_size <= the teacher"):
        build_student(StudentSpec(config={**arch, "hidden_size": 64}, embedding_init="teacher_pca"), config,
                      seed=0, teacher_state=teacher_state)


def test_spec_rules_for_augment_and_init(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a"))) as c:
        def error_loc(**overrides) -> list:  # type: ignore[no-untyped-def]
            response = c.post("/api/studies", json=tiny_spec(tiny_assets, **overrides))
            assert response.status_code == 422, response.text
            return response.json()["detail"][0]["loc"]

        assert error_loc(augment={"copies": 2, "p_mask": 0.6, "p_replace": 0.6})[:2] == ["body", "augment"]
        assert error_loc(augment={"copies": -1})[:3] == ["body", "augment", "copies"]
        assert error_loc(augment={"copies": 50}) == ["body", "augment", "copies"]  # the server's cap (20)
        assert error_loc(student={"truncate_teacher": {"num_layers": 1}, "embedding_init": "teacher_pca"})[:2] == [
            "body", "student"]
        ok = c.post("/api/studies", json=tiny_spec(tiny_assets, augment={"copies": 2}))
        assert ok.status_code == 201 and ok.json()["spec"]["augment"]["copies"] == 2


def test_export_best_over_seeds(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(database_url=db_url, artifacts=tmp_path / "artifacts")
    spec = tiny_spec(tiny_assets, name="seeds", n_trials=2, augment={"copies": 1},
                     student={"config": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                                         "intermediate_size": 32}, "embedding_init": "teacher_pca"})
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=spec).status_code == 201
        Worker(settings, device="cpu", exit_when_idle=True).run()
        assert client.get("/api/studies/seeds").json()["seed_retrain"] is None
        etag_before = client.get("/api/studies/seeds/summary").headers["etag"]

        env = {**os.environ, "KDSEARCH_DATABASE_URL": db_url, "KDSEARCH_ARTIFACTS": str(tmp_path / "artifacts")}
        out = tmp_path / "export"
        # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
        done = subprocess.run([*KDSEARCH, "export-best", "seeds", "--out", str(out), "--seeds", "3",
                               "--device", "cpu", "--force"], env=env, capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert "retrained with 3 seeds" in done.stdout

        detail = client.get("/api/studies/seeds").json()
        retrain = detail["seed_retrain"]
        assert retrain["trial_number"] == detail["best_trial"]["number"]
        assert retrain["seeds"] == [34, 35, 36]  # fresh seeds: not the search's seed 33
        assert retrain["metric"] == "accuracy"
        assert retrain["mean"] == pytest.approx(statistics.fmean(retrain["values"]))
        assert retrain["std"] == pytest.approx(statistics.stdev(retrain["values"]))
        best_seed = retrain["seeds"][retrain["values"].index(max(retrain["values"]))]
        assert retrain["best_seed"] == best_seed
        summary = client.get("/api/studies/seeds/summary", headers={"If-None-Match": etag_before})
        assert summary.status_code == 200 and summary.json()["study"]["seed_retrain"] == retrain  # not a stale 304

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["model-index"][0]["results"][0]["metrics"][0]["value"] == round(max(retrain["values"]), 4)
    assert f"{retrain['mean']:.4f} ± {retrain['std']:.4f}" in card and "over 3 seeds" in card
    assert "2-trial kdsearch study" in card and f"This export is seed {best_seed}" in card
    assert "teacher-labelled variants" in card  # the augmentation is on the card

    # A rerun reuses the recorded seeds (resumable) and only trains the new one.
    more = subprocess.run([*KDSEARCH, "export-best", "seeds", "--out", str(out), "--force", "--seeds", "4",
                           "--device", "cpu"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert more.returncode == 0, more.stderr
    assert more.stdout.count("already retrained") == 3 and "seed 37: eval accuracy" in more.stdout

    bad = subprocess.run([*KDSEARCH, "export-best", "seeds", "--out", str(tmp_path / "x"), "--seeds", "-2"], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--seeds must be within 0..100" in bad.stderr
