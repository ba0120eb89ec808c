"""storage's boundary: its public functions are the only way in; the study's metric and its best trial are decided
once, and the SQL reading of the best trial agrees with the one over a loaded Optuna study."""

from __future__ import annotations

import ast
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from storage import best_trial, best_trials, make_engine, session_scope, study_metric

ROOT = Path(__file__).resolve().parent.parent


def _private_storage_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("storage"):
            if node.module != "storage":
                found.append(node.module or "")
            found += [f"storage.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("storage.")]
    return found


def test_nothing_outside_storage_imports_its_private_names() -> None:
    offenders = {str(path.relative_to(ROOT)): names for path in ROOT.rglob("*.py")
                 if path.relative_to(ROOT).parts[0] not in ("storage", ".venv", "build")
                 and (names := _private_storage_imports(path.read_text(encoding="utf-8")))}
    assert offenders == {}


def test_the_study_metric() -> None:
    task = {"type": "classification", "num_labels": 3, "metric": "macro_f1"}
    assert study_metric({"metric": "accuracy"}, {"task": task}) == "macro_f1"  # resolved against the teacher
    assert study_metric({"metric": None}, {"teacher_accuracy": 0.9}) == "accuracy"  # before task metrics
    assert study_metric({"metric": "pearson"}, {}) == "pearson"  # not resolved yet: as the spec names it
    assert study_metric(None, {}) is None and study_metric({}, {"exports": []}) is None


def _add(study: optuna.Study, state: TrialState, value: float | None, constraints: dict | None = None) -> None:
    system = {f"constraints:{k}": v for k, v in (constraints or {}).items()}
    study.add_trial(create_trial(state=state, value=value if state != TrialState.FAIL else None,
                                 params={}, distributions={}, system_attrs=system,
                                 user_attrs={"params": {"n": len(study.trials)}, "best_epoch": 2,
                                             "metrics": {"accuracy": value}}))


def test_best_trial_in_sql_is_best_trials(db_url: str) -> None:
    """Ties go to the earliest trial; infeasible, PRUNED and FAILED trials are never best; several objectives have
    no one best trial (the front instead); the SQL reading and the loaded study's agree."""
    storage = optuna.storages.RDBStorage(db_url)
    engine = make_engine(db_url)
    try:
        study = optuna.create_study(study_name="one", storage=storage, direction="maximize")
        with session_scope(engine) as session:
            assert best_trial(session, "one") is None and best_trials(study) == []
            assert best_trial(session, "nope") is None
        _add(study, TrialState.PRUNED, 0.99)  # 0: pruned, never best
        _add(study, TrialState.COMPLETE, 0.7)  # 1
        _add(study, TrialState.COMPLETE, 0.95, {"max_params": 0.4})  # 2: infeasible
        _add(study, TrialState.COMPLETE, 0.8, {"max_params": -0.1})  # 3: the best, feasible
        _add(study, TrialState.FAIL, None)  # 4
        _add(study, TrialState.COMPLETE, 0.8, {"max_params": 0.0})  # 5: ties with 3, later
        with session_scope(engine) as session:
            best = best_trial(session, "one")
        assert best is not None and best.number == 3 and best.value == pytest.approx(0.8)
        assert best.params == {"n": 3} and best.epoch == 2 and best.metrics == {"accuracy": 0.8}
        assert [t.number for t in best_trials(study)] == [3]
        assert study.best_trial.value == pytest.approx(0.8)  # Optuna agrees on the value (its tie order is its own)

        several = optuna.create_study(study_name="two", storage=storage, directions=["maximize", "minimize"])
        for metric, cost in [(0.8, 3.0), (0.9, 5.0), (0.7, 4.0), (0.9, 2.0), (0.6, 1.0)]:
            several.add_trial(create_trial(state=TrialState.COMPLETE, values=[metric, cost]))
        with session_scope(engine) as session:
            assert best_trial(session, "two") is None
        assert [t.number for t in best_trials(several)] == [4, 3]
        assert {t.number for t in best_trials(several)} == {t.number for t in several.best_trials}
    finally:
        engine.dispose()
        storage.engine.dispose()
