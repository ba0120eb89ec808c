"""The exported model card follows the Hugging Face Hub's conventions: license and language (the teacher's, or the
spec's), pipeline_tag, base_model, datasets only for Hub datasets, the Hub's metric ids, a widget, how to use it,
intended uses and limitations, the training precision, latency with its machine and load, and no local path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from distill.hub_model import model_card, model_reference, teacher_card_data

HISTORY = [{"epoch": 1, "step": 10, "train_loss": 0.5, "eval_loss": 0.4, "score": 0.8,
            "metrics": {"accuracy": 0.8, "f1": 0.79, "macro_f1": 0.78, "matthews_correlation": 0.6}}]
PROFILE = {"shape": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
                     "intermediate_size": 512}, "params": 4_400_000, "params_no_embeddings": 400_000,
           "flops": 10_000_000, "flops_seq_len": 20, "latency_ms": 1.5, "latency_rows": 64, "latency_passes": 5,
           "latency_threads": 1, "machine": "Some CPU (x86_64, 2 cores, no native bf16)", "load_1min": 1.25}


def _record(**overrides: Any) -> dict[str, Any]:
    return {"params": {"learning_rate": 1e-3, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 1},
            "metric": "macro_f1", "score": 0.78, "metrics": HISTORY[0]["metrics"], "history": HISTORY,
            "task": {"type": "classification", "num_labels": 2, "metric": "macro_f1"}, "best_epoch": 1, "seed": 7,
            "teacher_metrics": {"accuracy": 0.9}, "precision": "bf16", **overrides}


def _spec(teacher: str, **overrides: Any) -> dict[str, Any]:
    return {"teacher": teacher, "student": {"config": {"num_hidden_layers": 2}},
            "dataset": {"path": "/srv/private/data/reviews", "text_column": "sentence", "eval_split": "validation",
                        "train_split": "train", "max_seq_length": 64}, **overrides}


def _card(spec: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], str]:
    card = model_card(name="tiny-student", spec=spec, record=_record(), trial_number=3, n_trials_run=5,
                      study_name="s", profile=PROFILE, **kwargs)
    return yaml.safe_load(card.split("---")[1]), card


@pytest.fixture
def local_teacher(tmp_path: Path) -> Path:
    teacher = tmp_path / "home" / "me" / "models" / "sst2-teacher"
    teacher.mkdir(parents=True)
    (teacher / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# a teacher\n")
    return teacher


def test_a_local_teacher_gives_its_license_and_language_and_only_its_folder_name(local_teacher: Path) -> None:
    teacher_card = teacher_card_data(str(local_teacher))
    assert teacher_card["license"] == "apache-2.0" and teacher_card["language"] == "en"
    front, card = _card(_spec(str(local_teacher)), teacher_card=teacher_card, widget_text="a fine film")
    assert front["license"] == "apache-2.0" and front["language"] == ["en"]
    assert front["base_model"] == "sst2-teacher" == model_reference(str(local_teacher))
    assert front["pipeline_tag"] == "text-classification" and front["library_name"] == "transformers"
    assert "generated_from_trainer" not in front["tags"] and "knowledge-distillation" in front["tags"]
    assert "datasets" not in front, "a local folder is no Hub dataset id"
    assert front["widget"] == [{"text": "a fine film"}]
    # No local absolute path anywhere: not the teacher's, not the data's.
    assert str(local_teacher) not in card and "/srv/private" not in card and str(local_teacher.parent) not in card
    # The Hub's metric ids, the study's metric first; macro F1 is "f1" averaged "macro".
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert [(m["type"], m.get("args")) for m in metrics] == [
        ("f1", {"average": "macro"}), ("accuracy", None), ("f1", {"average": "binary"}),
        ("matthews_correlation", None)]
    assert metrics[0]["value"] == 0.78 and front["metrics"] == ["accuracy", "f1", "matthews_correlation"]
    assert "## How to use" in card and 'pipeline("text-classification", model="tiny-student")' in card
    assert 'classifier("a sentence to classify")' in card
    assert "## Intended uses & limitations" in card and "optimistic" in card
    assert "- training_precision: bf16" in card and "(measured in fp32" in card
    assert "Some CPU (x86_64, 2 cores, no native bf16) (1-minute load average 1.25 when measured)" in card


def test_the_spec_overrides_the_teacher_and_a_hub_teacher_and_dataset_are_named_as_ids(local_teacher: Path) -> None:
    spec = _spec("google/bert-teacher", card={"license": "mit", "language": ["en", "fr"]},
                 dataset={"hub": "glue", "config": "sst2", "text_column": "sentence", "eval_split": "validation",
                          "train_split": "train", "max_seq_length": 64})
    front, card = _card(spec, teacher_card={"license": "apache-2.0", "language": "de"})
    assert front["license"] == "mit" and front["language"] == ["en", "fr"]
    assert front["base_model"] == "google/bert-teacher" and front["datasets"] == ["glue"]
    assert "[google/bert-teacher](https://huggingface.co/google/bert-teacher)" in card
    assert "widget" not in front  # no example given
    # A teacher without a card (or a Hub teacher while offline) leaves license and language out.
    bare, _ = _card(_spec("google/bert-teacher"), teacher_card=teacher_card_data("./no-such-folder"))
    assert "license" not in bare and "language" not in bare


def test_a_pair_task_gets_the_pair_form_and_no_one_text_widget(local_teacher: Path) -> None:
    spec = _spec(str(local_teacher))
    spec["dataset"]["text_pair_column"] = "sentence2"
    front, card = _card(spec, widget_text="ignored for pairs")
    assert "widget" not in front
    assert 'classifier({"text": "first sentence", "text_pair": "second sentence"})' in card


def test_a_pre_distilled_student_says_how_it_started(local_teacher: Path) -> None:
    spec = _spec(str(local_teacher))
    _, plain = _card(spec)
    assert "pre-distilled" not in plain
    record = _record(predistilled={"key": "pre-0123", "sentences": 88862, "epochs": 3, "relation_heads": 8,
                                   "hidden_weight": 1.0, "build_seconds": 900.0})
    card = model_card(name="tiny-student", spec=spec, record=record, trial_number=3, n_trials_run=5,
                      study_name="s", profile=PROFILE)
    assert "its encoder was pre-distilled from the teacher on 88,862 unlabelled sentences (3 epochs)" in card
    assert "8 relation heads" in card and "last hidden states matched to the teacher's" in card


def test_a_student_pre_distilled_on_the_scored_pairs_says_its_score_is_transductive(local_teacher: Path) -> None:
    spec = _spec(str(local_teacher))
    base = {"key": "pre-0123", "sentences": 88862, "epochs": 3, "relation_heads": 8, "hidden_weight": 1.0,
            "build_seconds": 900.0, "task_pairs": 7249, "task_pair_copies": 2, "scored_split": "validation"}
    held_out = model_card(name="s", spec=spec, record=_record(predistilled={**base, "task_pair_splits": ["train"]}),
                          trial_number=3, n_trials_run=5, study_name="s", profile=PROFILE)
    assert "the task's own 7,249 pairs (train split, 2 times each)" in held_out
    assert "transductive" not in held_out
    seen = model_card(name="s", spec=spec, record=_record(predistilled={
        **base, "task_pair_splits": ["train", "validation"]}), trial_number=3, n_trials_run=5, study_name="s",
        profile=PROFILE)
    assert "(train, validation splits, 2 times each)" in seen
    assert "include the validation split it is scored on: the score above is transductive" in seen
