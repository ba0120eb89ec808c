"""Shared fixtures: database backends (SQLite and a fresh PostgreSQL database per test) and tiny models."""

from __future__ import annotations

import os
import random
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdsearch.testing import (
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    POSTGRES_ADMIN_URL,
    Stack,
    tiny_spec,
    write_dataset,
    write_tiny_model,
)

os.environ["HF_HUB_OFFLINE"] = "1"  # no test reaches the network
# Test models and data live under the temporary directory: allow it (and only it) as a local root.
os.environ["KDSEARCH_ALLOWED_ROOTS"] = str(Path(tempfile.gettempdir()).resolve())
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Starlette's TestClient sends "Host: testserver": a name the API must be told it is known by (real servers in
# the tests are reached on 127.0.0.1, which is always trusted).
os.environ["KDSEARCH_TRUSTED_HOSTS"] = "testserver"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'kdsearch.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.pool import NullPool

    # No pool: a test may restart the server, and teardown must not reuse a dead connection.
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"kdtest_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is needed at {POSTGRES_ADMIN_URL} ({exc}); start it with "
                    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start")
    yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Every storage test runs on both backends."""
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


NLI_LABELS = ["entailment", "neutral", "contradiction"]


def _pair(rng: random.Random, kind: str) -> tuple[str, str, str]:
    """A sentence pair whose label needs both sentences: NLI-like (same / no / opposite sentiment word, as label
    names) or STS-like (a similarity score from the words the two share)."""
    first_label = rng.randint(0, 1)
    first = " ".join([*rng.sample(NEUTRAL, 3), rng.choice(POSITIVE if first_label else NEGATIVE)])
    if kind == "nli":
        relation = rng.randrange(3)
        word = {0: rng.choice(POSITIVE if first_label else NEGATIVE), 1: rng.choice(NEUTRAL),
                2: rng.choice(NEGATIVE if first_label else POSITIVE)}[relation]
        return first, " ".join([*rng.sample(NEUTRAL, 3), word]), NLI_LABELS[relation]
    second_words = rng.sample(first.split(), rng.randint(0, 4)) + rng.sample(NEUTRAL + POSITIVE, 4)
    second = " ".join(second_words[:5])
    shared = len(set(first.split()) & set(second.split()))
    return first, second, f"{max(0.0, min(5.0, 1.25 * shared + rng.uniform(-0.3, 0.3))):.2f}"


def write_pair_dataset(directory: Path, kind: str, n_train: int = 160, n_eval: int = 48, seed: int = 0) -> Path:
    """``sentence1``, ``sentence2``, ``label`` TSVs: ``kind`` "nli" (string labels) or "sts" (float scores)."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("validation", n_eval)):
        rows = [_pair(rng, kind) for _ in range(n)]
        (directory / f"{split}.tsv").write_text(
            "sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows))
    return directory


@pytest.fixture(scope="session")
def pair_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-class NLI-style pair teacher with named labels, a regression (STS-style) pair teacher, and their data."""
    root = tmp_path_factory.mktemp("pair-assets")
    return {
        "nli_teacher": write_tiny_model(root / "nli-teacher", seed=4, layers=2, labels=NLI_LABELS),
        "sts_teacher": write_tiny_model(root / "sts-teacher", seed=5, layers=2, regression=True),
        "nli_data": write_pair_dataset(root / "nli-data", "nli"),
        "sts_data": write_pair_dataset(root / "sts-data", "sts", seed=1),
    }


def pair_spec(assets: dict[str, Path], kind: str, name: str = "pairs", **overrides) -> dict:  # type: ignore[no-untyped-def]
    spec = {
        "name": name,
        "teacher": str(assets[f"{kind}_teacher"]),
        "student": {"config": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                               "intermediate_size": 32}},
        "dataset": {"path": str(assets[f"{kind}_data"]), "text_column": "sentence1",
                    "text_pair_column": "sentence2", "max_seq_length": 16},
        "search_space": {"num_train_epochs": {"low": 1, "high": 3}, "batch_size": 32,
                         "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
        "n_trials": 3,
        "pruner": "none",
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("assets")
    return {
        "teacher": write_tiny_model(root / "teacher", seed=1, layers=4),
        "student": write_tiny_model(root / "student", seed=2, layers=1),
        "other_vocab_student": write_tiny_model(root / "other", seed=3, extra_vocab=["zebra"]),
        "data": write_dataset(root / "data"),
    }


def front_spec(assets: dict[str, Path], name: str, n_trials: int = 4, **overrides) -> dict:  # type: ignore[no-untyped-def]
    """A two-objective study (the metric against parameters) over student shapes and KD hyperparameters."""
    student = {"config": {"num_hidden_layers": {"low": 1, "high": 2}, "hidden_size": {"choices": [8, 16]},
                          "num_attention_heads": 2, "intermediate_size": {"choices": [16, 32]}}}
    return tiny_spec(assets, name=name, n_trials=n_trials, objectives=["metric", "params"], student=student,
                     pruner="median", search_space={"num_train_epochs": {"low": 1, "high": 2}, "batch_size": 32,
                                                    "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
                     **overrides)


# Real worker processes on service.testing.SleepEngine (sleeps per epoch): queue and Optuna paths in seconds.
FAST = {"KDSEARCH_ENGINE": "service.testing:SleepEngine", "KDSEARCH_POLL_INTERVAL": "0.1",
        "KDSEARCH_HEARTBEAT_INTERVAL": "0.5", "KDSEARCH_GRACE_PERIOD": "3", "KDSEARCH_TEST_EPOCH_S": "0.05"}


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    """``make(db_url, **env)``: an API process on ``db_url`` with the fast test settings; stopped afterwards."""
    stacks: list[Stack] = []

    def make(db_url: str, **env: str) -> Stack:
        stack = Stack(db_url, tmp_path, **{**FAST, **env})
        stacks.append(stack)
        stack.start_api()
        return stack

    yield make
    for stack in stacks:
        stack.stop()


# Both training precisions, forced on every machine (a CPU without native bf16 runs it emulated): whatever the
# training precision, a trial's recorded metric is the one its exported fp32 model gives.
PRECISIONS = ["fp32", "bf16"]


@pytest.fixture
def precision() -> str:
    """KDSEARCH_PRECISION for the workers a test starts: ``auto`` (this machine's default) unless the test is
    parametrized over ``precision`` (``@pytest.mark.parametrize("precision", PRECISIONS)``)."""
    return "auto"


@pytest.fixture
def stack(sqlite_url: str, tmp_path: Path, precision: str) -> Iterator:  # type: ignore[type-arg]
    """An API process and one worker on a SQLite database (a module may override it, as test_e2e does)."""
    s = Stack(sqlite_url, tmp_path, KDSEARCH_PRECISION=precision)
    s.start_api()
    s.start_worker()
    yield s
    s.stop()


# Real worker processes on service.testing.FlakyEngine (faults picked by the study's name), fast.
FLAKY = {"KDSEARCH_ENGINE": "service.testing:FlakyEngine", "KDSEARCH_TEST_EPOCH_S": "0.02",
         "KDSEARCH_POLL_INTERVAL": "0.1"}


@pytest.fixture
def flaky_env() -> dict[str, str]:
    """What a module's ``flaky_stack`` adds to ``FLAKY`` (retry delays, attempts, the engine's knobs): a module
    overrides this fixture."""
    return {}


@pytest.fixture
def flaky_stack(db_url: str, tmp_path: Path, flaky_env: dict[str, str]) -> Iterator[Stack]:
    """An API process on ``FLAKY`` plus the module's ``flaky_env``, on both backends; the test starts its workers."""
    s = Stack(db_url, tmp_path, **{**FLAKY, **flaky_env})
    s.start_api()
    yield s
    s.stop()


def queue_unchecked(db_url: str, spec: dict) -> None:  # type: ignore[type-arg]
    """Queue a study straight into the store at ``db_url``, past the API's submit checks: what a worker meets when a
    study's data or models changed after it was submitted (the worker's own checks are under test)."""
    from search_space import StudySpec
    from storage import create_study, ensure_optuna_study, make_engine, make_optuna_storage

    study = StudySpec.model_validate(spec)
    as_json = study.model_dump(mode="json")
    engine, storage = make_engine(db_url), make_optuna_storage(db_url)
    try:
        create_study(engine, name=study.name, spec=as_json, n_trials=study.n_trials, priority=study.priority,
                     timeout_s=study.timeout_s)
        ensure_optuna_study(storage, study.name, {"kdsearch_spec": as_json}, directions=study.directions)
    finally:
        engine.dispose()
        storage.engine.dispose()
