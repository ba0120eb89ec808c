"""The siamese pair student (``student.pair_encoding: "siamese"``): each sentence encoded alone in one pass, its head
fitted to the teacher at the start, the spec's rules, packed trials, and a study end to end whose export loads
through ``transformers.pipeline`` with ``trust_remote_code=True`` in a process that never imported kdsearch."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

from distill import compute_metrics
from distill.data import TokenizedSplit
from distill.modeling_siamese import SiameseBertForSequenceClassification, segment_inputs
from distill.packed import PackMember, train_pack
from distill.student import build_student, fit_pair_head
from distill.train import TrainConfig, TrainResult, train_student
from kdsearch.testing import KDSEARCH, Stack
from search_space import StudentSpec, StudySpec, TaskInfo
from tests.conftest import pair_spec

SIAMESE = {"config": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32},
           "embedding_init": "teacher_pca", "pair_encoding": "siamese"}


def _student(assets: dict[str, Path], kind: str = "sts", seed: int = 0,
             pair_head: str = "auto") -> SiameseBertForSequenceClassification:
    teacher = BertForSequenceClassification.from_pretrained(assets[f"{kind}_teacher"])
    model = build_student(StudentSpec.model_validate({**SIAMESE, "pair_head": pair_head}), teacher.config, seed=seed,
                          teacher_state=teacher.state_dict())
    assert isinstance(model, SiameseBertForSequenceClassification)
    return model.eval()


def _pairs(assets: dict[str, Path], kind: str) -> list[dict[str, str]]:
    with open(assets[f"{kind}_data"] / "train.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _split(tokenizer, rows: list[dict[str, str]], labels: torch.Tensor) -> TokenizedSplit:  # type: ignore[no-untyped-def]
    enc = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                    return_tensors="pt")
    return TokenizedSplit(enc["input_ids"], enc["attention_mask"].sum(1), labels, tokenizer.pad_token_id,
                          enc["token_type_ids"])


def test_segments_and_positions() -> None:
    """A right-padded pair encoding [CLS] a a [SEP] b [SEP] pad: segments 0 0 0 0 1 1 -1, the second's positions
    restart at 0."""
    ids = torch.tensor([[2, 7, 8, 3, 9, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0]])
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 0]])
    segment, positions, first, second = segment_inputs(ids, mask, types)
    assert segment.tolist() == [[0, 0, 0, 0, 1, 1, -1]]
    assert positions[0, :6].tolist() == [0, 1, 2, 3, 0, 1]
    assert first.tolist() == [[True] * 4 + [False] * 3] and second.tolist() == [[False] * 4 + [True, True, False]]


def test_each_sentence_is_encoded_alone(pair_assets) -> None:  # type: ignore[no-untyped-def]
    """The pair's cosine is the cosine of the two sentences encoded one at a time (the second without its [CLS]),
    in both attention implementations; so the first side's encoding does not move when the second changes."""
    model = _student(pair_assets)
    tokenizer = AutoTokenizer.from_pretrained(pair_assets["sts_teacher"])
    rows = _pairs(pair_assets, "sts")[:6]
    first, second = [r["sentence1"] for r in rows], [r["sentence2"] for r in rows]
    pair = tokenizer(first, second, padding=True, return_tensors="pt")

    def alone(texts: list[str], drop_cls: bool) -> torch.Tensor:
        means = []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][:, 1:] if drop_cls else tokenizer(
                text, return_tensors="pt")["input_ids"]
            means.append(model.bert(input_ids=ids).last_hidden_state.mean(1))
        return torch.cat(means)

    with torch.no_grad():
        expected = torch.nn.functional.cosine_similarity(alone(first, False), alone(second, True))
        for implementation in ("sdpa", "eager"):
            model.set_attn_implementation(implementation)
            cosine, _ = model.pair_cosine(**pair)
            assert cosine == pytest.approx(expected, abs=1e-5), implementation
        swapped = tokenizer(first, list(reversed(second)), padding=True, return_tensors="pt")
        _, out = model.pair_cosine(**pair)
        _, out_swapped = model.pair_cosine(**swapped)
    for row in range(len(rows)):
        length = int((pair["token_type_ids"][row] == 0).sum() - (pair["attention_mask"][row] == 0).sum())
        assert torch.allclose(out.last_hidden_state[row, :length], out_swapped.last_hidden_state[row, :length],
                              atol=1e-5)


def test_head_is_fitted_to_the_teacher(pair_assets) -> None:  # type: ignore[no-untyped-def]
    """Regression: least squares of the teacher's score on the starting cosine (targets 3 cos + 1: weight 3,
    bias 1). Classification: a logistic fit, so the student starts on the teacher's answer where the teacher's
    classes split at a cosine, not on one class."""
    model = _student(pair_assets)
    tokenizer = AutoTokenizer.from_pretrained(pair_assets["sts_teacher"])
    rows = _pairs(pair_assets, "sts")
    split = _split(tokenizer, rows, torch.zeros(len(rows)))
    with torch.no_grad():
        cosine, _ = model.pair_cosine(**split.batch(torch.arange(len(rows))))
    fit_pair_head(model, split, (3 * cosine + 1).unsqueeze(-1))
    assert model.pair_head.weight.item() == pytest.approx(3.0, rel=1e-3)
    assert model.pair_head.bias.item() == pytest.approx(1.0, abs=1e-3)

    classifier = _student(pair_assets, "nli", pair_head="cosine")
    with torch.no_grad():
        cosine, _ = classifier.pair_cosine(**split.batch(torch.arange(len(rows))))
    classes = (cosine > cosine.median()).long()  # the teacher's answer: class 1 above the median cosine
    teacher_logits = torch.nn.functional.one_hot(classes, 3).float() * 4
    assert len(set(classifier(**split.batch(torch.arange(len(rows)))).logits.argmax(-1).tolist())) == 1
    fit_pair_head(classifier, split, teacher_logits)
    with torch.no_grad():
        predicted = classifier(**split.batch(torch.arange(len(rows)))).logits.argmax(-1)
    assert (predicted == classes).float().mean() > 0.9
    assert 2 not in predicted.tolist()  # never the teacher's answer on these rows: starts unlikely


def test_interaction_head_fits_classes_that_are_not_degrees_of_similarity(pair_assets) -> None:  # type: ignore[no-untyped-def]
    """Three classes by where the difference of the two encodings falls along one direction (as entailment and
    contradiction are not more or less similar): the interaction head (auto, for three classes) starts on the
    teacher's answer for nearly every pair; a cosine head cannot, and a regression teacher of that kind is fitted
    by least squares. The head's input is (cos, u, v, |u - v|, u * v)."""
    tokenizer = AutoTokenizer.from_pretrained(pair_assets["nli_teacher"])
    rows = _pairs(pair_assets, "sts") + _pairs(pair_assets, "nli")
    split = _split(tokenizer, rows, torch.zeros(len(rows)))
    batch = split.batch(torch.arange(len(rows)))
    interaction = _student(pair_assets, "nli")
    assert interaction.config.pair_features == "interaction"
    assert interaction.pair_head.in_features == 1 + 4 * interaction.config.hidden_size
    with torch.no_grad():
        u, v, _ = interaction.pair_encodings(**batch)
        features, _ = interaction.pair_features(**batch)
    cosine = torch.nn.functional.cosine_similarity(u, v)
    assert torch.allclose(features, torch.cat([cosine[:, None], u, v, (u - v).abs(), u * v], -1))
    direction = (u - v)[:, 0]
    low, high = direction.quantile(1 / 3), direction.quantile(2 / 3)
    classes = (direction > low).long() + (direction > high).long()
    assert abs(torch.corrcoef(torch.stack([cosine, classes.float()]))[0, 1]) < 0.5  # not an axis of similarity
    teacher_logits = torch.nn.functional.one_hot(classes, 3).float() * 4

    def agreement(model: SiameseBertForSequenceClassification) -> float:
        fit_pair_head(model, split, teacher_logits, rows=len(rows))
        with torch.no_grad():
            return float((model(**batch).logits.argmax(-1) == classes).float().mean())

    assert agreement(interaction) > 0.9
    assert agreement(_student(pair_assets, "nli", pair_head="cosine")) < 0.7
    regression = _student(pair_assets, "sts", pair_head="interaction")
    with torch.no_grad():
        u, v, _ = regression.pair_encodings(**batch)
    score = 2 * (u - v)[:, 0] + 1
    fit_pair_head(regression, split, score.unsqueeze(-1), rows=len(rows))
    with torch.no_grad():
        fitted = regression(**batch).logits[:, 0]
    assert torch.corrcoef(torch.stack([fitted, score]))[0, 1] > 0.95


def test_spec_rules(pair_assets, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match="pair_encoding siamese needs a sentence-pair dataset"):
        StudySpec.model_validate({"name": "s", "teacher": str(tiny_assets["teacher"]), "student": SIAMESE,
                                  "dataset": {"path": str(tiny_assets["data"])}})
    with pytest.raises(ValidationError, match="applies to a config or truncate_teacher student only"):
        StudentSpec.model_validate({"model": "some/model", "pair_encoding": "siamese"})
    with pytest.raises(ValidationError, match="pair_encoding"):
        StudentSpec.model_validate({**SIAMESE, "pair_encoding": "bi"})
    with pytest.raises(ValidationError, match="pair_head applies to a siamese student only"):
        StudentSpec.model_validate({**SIAMESE, "pair_encoding": "cross", "pair_head": "interaction"})
    with pytest.raises(ValidationError, match="pair_head"):
        StudentSpec.model_validate({**SIAMESE, "pair_head": "concat"})
    spec = StudentSpec.model_validate(SIAMESE)
    assert [spec.pair_features(n) for n in (1, 2, 3)] == ["cosine", "cosine", "interaction"]
    assert StudentSpec.model_validate({**SIAMESE, "pair_head": "cosine"}).pair_features(3) == "cosine"
    assert StudentSpec.model_validate({**SIAMESE, "pair_head": "interaction"}).pair_features(1) == "interaction"
    truncated = build_student(StudentSpec.model_validate({"truncate_teacher": {"num_layers": 1},
                                                          "pair_encoding": "siamese"}),
                              AutoConfig.from_pretrained(pair_assets["sts_teacher"]), seed=0,
                              teacher_state=BertForSequenceClassification.from_pretrained(
                                  pair_assets["sts_teacher"]).state_dict())
    assert isinstance(truncated, SiameseBertForSequenceClassification) and truncated.config.num_hidden_layers == 1


@pytest.mark.parametrize("pair_head", ["cosine", "interaction"])
def test_stacked_pack_equals_solo_runs(pair_assets, pair_head: str) -> None:  # type: ignore[no-untyped-def]
    """Siamese members step together under vmap (eager attention, the block mask) as they do alone, with either
    head."""
    tokenizer = AutoTokenizer.from_pretrained(pair_assets["sts_teacher"])
    rows = _pairs(pair_assets, "sts")
    gold = torch.tensor([float(r["label"]) for r in rows])
    train = _split(tokenizer, rows[:64], gold[:64])
    eval_split = _split(tokenizer, rows[64:96], gold[64:96])
    logits = gold[:64].unsqueeze(-1) + 0.1
    task = TaskInfo("regression", 1, "pearson")
    configs = [TrainConfig.from_params({"learning_rate": lr, "alpha": 0.5, "num_train_epochs": 2, "batch_size": 16},
                                       regression=True, seed=seed) for lr, seed in ((3e-3, 1), (1e-3, 2))]

    def student(seed: int) -> SiameseBertForSequenceClassification:
        model = _student(pair_assets, seed=seed, pair_head=pair_head)
        model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    packed = train_pack([PackMember(student(cfg.seed), cfg) for cfg in configs], train, logits, eval_split, 99,
                        task, step="stacked")
    for cfg, result in zip(configs, packed, strict=True):
        alone = train_student(student(cfg.seed), train, logits, eval_split, dataclasses.replace(cfg, batch_seed=99),
                              task=task)
        assert isinstance(result, TrainResult)
        for got, want in zip(result.history, alone.history, strict=True):
            assert got.train_loss == pytest.approx(want.train_loss, rel=1e-4, abs=1e-5)
            assert got.metrics == pytest.approx(want.metrics, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("kind", ["sts", "nli"])
def test_siamese_study_end_to_end(stack: Stack, pair_assets, tmp_path: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    """A siamese study through the API and a real worker, STS-style (a cosine head) and NLI-style (three named
    classes: the interaction head); ``export-best --onnx`` writes the modeling file beside the weights and an ONNX
    model verified against them, and a fresh interpreter (no kdsearch import) re-scores the export to the recorded
    Pearson or accuracy."""
    name = f"{kind}-siamese"
    stack.submit(pair_spec(pair_assets, kind, name=name, student=SIAMESE, n_trials=2,
                           search_space={"num_train_epochs": 2, "batch_size": 32, "learning_rate": 3e-3}))
    study = stack.wait_status(name)
    assert study["status"] == "finished", study
    out = tmp_path / "export"
    done = subprocess.run([*KDSEARCH, "export-best", name, "--out", str(out), "--force", "--onnx"],
                          env=stack.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "kdsearch-siamese-bert" and (out / "modeling_siamese.py").is_file()
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_siamese.SiameseBertForSequenceClassification")
    assert config["pair_features"] == {"sts": "cosine", "nli": "interaction"}[kind]
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "siamese student" in card
    assert "siamese (each sentence encoded alone" in card  # the model description
    assert ("(cos, u, v, |u - v|, u * v)" in card) == (kind == "nli")
    deployment = json.loads((out / "onnx" / "config.json").read_text()) if (out / "onnx").is_dir() else None
    assert deployment is not None and deployment["model_type"] == "kdsearch-siamese-bert"  # ONNX beside it

    with open(pair_assets[f"{kind}_data"] / "validation.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    (tmp_path / "pairs.json").write_text(json.dumps([{"text": r["sentence1"], "text_pair": r["sentence2"]}
                                                     for r in rows]))
    answer = "o['score']" if kind == "sts" else "o['label']"
    raw = ", function_to_apply='none'" if kind == "sts" else ""  # a regression's raw score
    script = ("import json, sys\nfrom transformers import pipeline\n"
              f"p = pipeline('text-classification', model={str(out)!r}, trust_remote_code=True, device='cpu')\n"
              f"out = p(json.load(open({str(tmp_path / 'pairs.json')!r})), batch_size=16{raw})\n"
              f"print(json.dumps([{answer} for o in out]))\nassert 'kdsearch' not in sys.modules "
              "and 'distill' not in sys.modules\n")
    scored = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**stack.env, "PYTHONPATH": ""})
    assert scored.returncode == 0, scored.stderr
    answers = json.loads(scored.stdout.strip().splitlines()[-1])
    if kind == "sts":
        gold = np.array([float(r["label"]) for r in rows])
        rescored = compute_metrics(TaskInfo("regression", 1, "pearson"), np.array(answers)[:, None], gold)["pearson"]
        assert rescored == pytest.approx(study["best_trial"]["value"], abs=1e-4)
    else:
        accuracy = float(np.mean([a == r["label"] for a, r in zip(answers, rows, strict=True)]))
        assert accuracy == pytest.approx(study["best_trial"]["value"], abs=1e-6)


def test_a_siamese_student_of_many_classes_is_noted() -> None:
    """Three classes (NLI): the study says what the siamese head reads (interaction, auto) and names the
    cross-encoder; a cosine head asked for says the classes lie along one axis; two classes or a regression say
    nothing."""
    from service.api.routes.studies import _notes

    siamese = {"student": SIAMESE}
    nli = TaskInfo("classification", 3, "accuracy", ("entailment", "neutral", "contradiction"))
    assert any("pair_head interaction" in n and "pair_encoding cross" in n for n in _notes(nli, siamese))
    cosine = {"student": {**SIAMESE, "pair_head": "cosine"}}
    assert any("student.pair_head cosine scores a pair by one cosine" in n for n in _notes(nli, cosine))
    assert _notes(nli, {"student": {**SIAMESE, "pair_encoding": "cross"}}) == []
    assert _notes(TaskInfo("classification", 2, "accuracy", ("no", "yes")), siamese) == []
    assert not any("siamese" in n or "pair_head" in n for n in _notes(TaskInfo("regression", 1, "pearson"), siamese))
