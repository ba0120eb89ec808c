"""Assets for tests and benches: a tiny word-level BERT (teacher or student), a sentiment dataset it can learn in
seconds, a study spec over them, and the PostgreSQL server the tests and benches make their databases on."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

# The server tests and benches create (and drop) their own databases on.
POSTGRES_ADMIN_URL = os.environ.get("KDSEARCH_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# The tiny models' vocabulary, and the words the sentiment data is made of.
POSITIVE = ["good", "great", "wonderful", "moving", "funny", "brilliant", "charming", "smart"]
NEGATIVE = ["bad", "awful", "boring", "dull", "stupid", "tedious", "clumsy", "flat"]
NEUTRAL = ["the", "a", "movie", "film", "plot", "actors", "story", "is", "was", "very", "quite", "and", "it"]


def _sentence(rng: random.Random) -> tuple[str, int]:
    label = rng.randint(0, 1)
    words = [*rng.sample(NEUTRAL, 4), rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words), label


def write_dataset(directory: Path, n_train: int = 160, n_eval: int = 48, seed: int = 0) -> Path:
    """``train.tsv`` and ``validation.tsv`` (``sentence``, ``label``): five words, one of them a sentiment word that
    decides the label (0 or 1)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = [_sentence(rng) for _ in range(n)]
        (directory / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    return directory


def write_tiny_model(directory: Path, *, seed: int = 0, layers: int = 2, extra_vocab: list[str] | None = None,
                     num_labels: int = 2, classifier: bool = True, labels: list[str] | None = None,
                     regression: bool = False) -> Path:
    """A randomly initialised BERT sequence classifier with a word-level vocabulary, saved as a HF model.

    ``labels`` names the classes (default negative, positive, neutral); ``regression`` makes a one-output
    ``problem_type: regression`` head.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    # Extra words go right after the special tokens, so every later id shifts: a different vocabulary.
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(extra_vocab or []), *POSITIVE, *NEGATIVE, *NEUTRAL]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)}, do_lower_case=True)
    tokenizer.save_pretrained(directory)
    torch.manual_seed(seed)
    if regression:
        labels, num_labels = ["LABEL_0"], 1
    elif labels is not None:
        num_labels = len(labels)
    else:
        labels = ["negative", "positive", "neutral"][:num_labels]
    # num_labels: PretrainedConfig's, missing from BertConfig's typed signature.
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,  # type: ignore[call-arg]
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
                        problem_type="regression" if regression else None,
                        architectures=["BertForSequenceClassification" if classifier else "BertModel"])
    (BertForSequenceClassification if classifier else BertModel)(config).save_pretrained(directory)
    return directory


def tiny_spec(assets: dict[str, Path], name: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """A study spec over ``assets`` (``teacher``: a ``write_tiny_model`` directory, ``data``: a ``write_dataset``
    one) with a tiny configured student that trains in seconds on a CPU; ``overrides`` replace top-level fields."""
    spec: dict[str, Any] = {
        "name": name,
        "teacher": str(assets["teacher"]),
        "student": {"config": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                               "intermediate_size": 32}},
        "dataset": {"path": str(assets["data"]), "max_seq_length": 16},
        "search_space": {"num_train_epochs": {"low": 1, "high": 3}, "batch_size": 32,
                         "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
        "n_trials": 4,
        "pruner": "none",
    }
    spec.update(overrides)
    return spec


