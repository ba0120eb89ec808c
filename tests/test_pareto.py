"""Student shape and KD hyperparameters searched together: only valid shapes sampled, 422s for impossible ones,
profiles checked against an independent count, constraints, the Pareto front against brute force, pruning on several
objectives, and the export-best selectors."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import torch
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from distill.data import TokenizedSplit
from distill.hub_model import ExportError
from kdsearch.testing import tiny_spec
from search_space import JOINT_ATTENTION, SpecError, StudentSpec, StudySpec, student_space
from search_space.objectives import pareto_front, same_shape_should_prune
from service.api import create_app
from service.export_best import select_trial
from service.settings import Settings

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _student(**config: object) -> StudentSpec:
    base: dict[str, object] = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                               "intermediate_size": 32}
    return StudentSpec.model_validate({"config": {**base, **config}})


# ------------------------------------------------------------------------------------------------ valid shapes


@pytest.mark.parametrize(("config", "joint"), [
    # Every pair valid: hidden size and head count are two independent parameters.
    ({"hidden_size": {"low": 16, "high": 64, "step": 16}, "num_attention_heads": {"choices": [1, 2, 4]}}, False),
    # Some pairs invalid (18 / 4, 16 / 3): the valid pairs are one categorical parameter.
    ({"hidden_size": {"choices": [12, 16, 18]}, "num_attention_heads": {"choices": [3, 4]}}, True),
    ({"hidden_size": {"low": 8, "high": 20}, "num_attention_heads": {"low": 2, "high": 3},
      "num_hidden_layers": {"low": 1, "high": 3}}, True),
])
@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_only_valid_shapes_are_sampled(config: dict, joint: bool, sampler: str) -> None:
    student = _student(**config)
    space = student_space(student)
    assert (JOINT_ATTENTION in space.distributions) is joint
    valid = {(h, a) for h in range(8, 65) for a in range(1, 5) if h % a == 0}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1) if sampler == "random" else
                                optuna.samplers.TPESampler(seed=1, n_startup_trials=10, multivariate=True))
    seen = set()
    for _ in range(120 if sampler == "random" else 40):
        trial = study.ask(space.distributions)
        shape = space.student_for(student, space.shape_params(trial.params)).config
        assert shape is not None and not shape.searched
        assert shape.hidden_size % shape.num_attention_heads == 0  # type: ignore[operator]
        assert (shape.hidden_size, shape.num_attention_heads) in valid
        seen.add((shape.hidden_size, shape.num_attention_heads))
        study.tell(trial, float(shape.hidden_size) / float(shape.num_attention_heads))  # type: ignore[arg-type]
    if sampler == "random":  # every valid pair is reachable
        reachable = {(h, a) for h, a in valid
                     if h in _values(config["hidden_size"]) and a in _values(config["num_attention_heads"])}
        assert seen == reachable


def _values(spec: dict) -> set[int]:
    if "choices" in spec:
        return set(spec["choices"])
    return set(range(spec["low"], spec["high"] + 1, spec.get("step") or 1))


def test_the_teacher_narrows_the_space() -> None:
    pca = StudentSpec.model_validate({"config": {"num_hidden_layers": 1, "hidden_size": {"choices": [16, 32, 64]},
                                                 "num_attention_heads": 2, "intermediate_size": 32},
                                      "embedding_init": "teacher_pca"})
    assert student_space(pca, teacher_hidden=32).distributions["hidden_size"] == CategoricalDistribution([16, 32])
    assert student_space(pca).distributions["hidden_size"] == CategoricalDistribution([16, 32, 64])
    # A range cut at the teacher's width stays a range.
    ranged = StudentSpec.model_validate({**pca.model_dump(), "config": {
        **pca.model_dump()["config"], "hidden_size": {"low": 8, "high": 64, "step": 8}}})
    assert student_space(ranged, teacher_hidden=32).distributions["hidden_size"] == IntDistribution(8, 32, step=8)
    with pytest.raises(SpecError) as info:
        student_space(pca, teacher_hidden=8)
    assert info.value.field == "student.config.hidden_size"

    truncated = StudentSpec.model_validate({"truncate_teacher": {"num_layers": {"low": 2, "high": 6}}})
    space = student_space(truncated, teacher_layers=4)
    assert space.distributions == {"num_hidden_layers": IntDistribution(2, 4)}
    assert space.student_for(truncated, {"num_hidden_layers": 3}).truncate_teacher.num_layers == 3  # type: ignore[union-attr]
    one_left = student_space(truncated, teacher_layers=2)  # only 2 fits: no parameter, a fixed depth
    assert not one_left.searched and one_left.student_for(truncated, {}).truncate_teacher.num_layers == 2  # type: ignore[union-attr]
    with pytest.raises(SpecError) as info:
        student_space(StudentSpec.model_validate({"truncate_teacher": {"num_layers": {"choices": [6, 8]}}}),
                      teacher_layers=4)
    assert info.value.field == "student.truncate_teacher.num_layers" and "1..4" in info.value.message


# ----------------------------------------------------------------------------------------------------- the API


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "a"))) as c:
        yield c


def test_impossible_specs_are_422_naming_the_field(client: TestClient, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    def field(**overrides: object) -> str:
        response = client.post("/api/studies", json=tiny_spec(tiny_assets, **overrides))
        assert response.status_code == 422, response.text
        return ".".join(str(p) for p in response.json()["detail"][0]["loc"][1:])

    config = {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
    # No head count divides any hidden size.
    assert field(student={"config": {**config, "hidden_size": {"choices": [30, 50]},
                                     "num_attention_heads": {"choices": [4, 8]}}}) == \
        "student.config.num_attention_heads"
    # teacher_pca: no hidden size fits the teacher's width (32).
    assert field(student={"config": {**config, "hidden_size": {"choices": [64, 128]}},
                          "embedding_init": "teacher_pca"}) == "student.config.hidden_size"
    # Deeper than the teacher (4 layers).
    assert field(student={"truncate_teacher": {"num_layers": {"low": 5, "high": 8}}}) == \
        "student.truncate_teacher.num_layers"
    assert field(student={"config": {**config, "num_hidden_layers": {"low": 0, "high": 3}}}).startswith(
        "student.config.num_hidden_layers")
    # Bounds are checked before a range is enumerated (a huge one is refused at once, not listed).
    assert field(student={"config": {**config, "hidden_size": {"low": -10**18, "high": 10**18}}}).startswith(
        "student.config.hidden_size")
    # Valid pairs past what one categorical parameter can learn: give a step instead.
    assert field(student={"config": {**config, "hidden_size": {"low": 8, "high": 8192},
                                     "num_attention_heads": {"low": 1, "high": 128}}}) == "student.config.hidden_size"
    assert field(objectives=["params"]) == "objectives"
    assert field(objectives=["metric", "accuracy"]).startswith("objectives")
    assert field(objectives=["metric", "params"], constraints={"max_params": 1000}) == "constraints"
    assert field(objectives=["metric", "latency_ms"], pruner="hyperband") == "pruner"
    assert field(constraints={}) == "constraints"
    assert client.get("/api/studies").json() == [], "nothing was queued"

    searched = {"num_hidden_layers": {"low": 1, "high": 2}, "hidden_size": {"choices": [8, 16]},
                "num_attention_heads": 2, "intermediate_size": {"choices": [16, 32]}}
    ok = client.post("/api/studies", json=tiny_spec(tiny_assets, name="front", objectives=["metric", "flops"],
                                                    student={"config": searched}))
    assert ok.status_code == 201, ok.text
    assert ok.json()["objectives"] == ["metric", "flops"] and ok.json()["front"] == []
    limited = client.post("/api/studies", json=tiny_spec(tiny_assets, name="limited",
                                                        constraints={"max_latency_ms": 5}))
    assert limited.status_code == 201 and limited.json()["constraints"] == {"max_latency_ms": 5.0}
    assert optuna.load_study(study_name="front", storage=client.app.state.optuna_storage).directions == [  # type: ignore[attr-defined]
        optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]


# -------------------------------------------------------------------------------------------- profile counts


def _bert_params(vocab: int, positions: int, types: int, labels: int, layers: int, hidden: int,
                 intermediate: int) -> tuple[int, int]:
    """(total, without the embedding tables) of a BERT sequence classifier, counted from the architecture."""
    tables = (vocab + positions + types) * hidden
    embeddings = tables + 2 * hidden  # + LayerNorm
    layer = 4 * (hidden * hidden + hidden) + 2 * hidden + (hidden * intermediate + intermediate) \
        + (intermediate * hidden + hidden) + 2 * hidden
    head = (hidden * hidden + hidden) + (hidden * labels + labels)  # pooler, classifier
    total = embeddings + layers * layer + head
    return total, total - tables


def _bert_flops(seq: int, labels: int, layers: int, hidden: int, intermediate: int) -> int:
    """Forward FLOPs (2 per multiply-add) of one sequence: projections, attention scores and values, FFN; the
    pooler and classifier see the first token only."""
    per_layer = 2 * seq * hidden * hidden * 4 + 2 * seq * seq * hidden * 2 + 2 * seq * hidden * intermediate * 2
    return layers * per_layer + 2 * hidden * hidden + 2 * hidden * labels


@pytest.mark.parametrize(("layers", "hidden", "heads", "intermediate"), [(1, 16, 2, 32), (3, 24, 4, 40)])
def test_flops_and_params_match_an_independent_count(tiny_assets, layers: int, hidden: int, heads: int,  # type: ignore[no-untyped-def]
                                                     intermediate: int) -> None:
    from transformers import AutoConfig

    from distill.profile import architecture, profile_model
    from distill.student import student_config

    teacher = AutoConfig.from_pretrained(tiny_assets["teacher"])
    student = _student(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                       intermediate_size=intermediate)
    lengths = torch.tensor([5, 9, 12, 7, 9, 14, 3])  # median 9
    split = TokenizedSplit(torch.randint(5, teacher.vocab_size, (7, 14)), lengths, torch.zeros(7, dtype=torch.long), 0)
    profile = profile_model(architecture(student_config(student, teacher)), split, rows=4, passes=2)
    total, no_embeddings = _bert_params(teacher.vocab_size, teacher.max_position_embeddings, teacher.type_vocab_size,
                                        teacher.num_labels, layers, hidden, intermediate)
    assert (profile["params"], profile["params_no_embeddings"]) == (total, no_embeddings)
    assert profile["flops_seq_len"] == 9
    assert profile["flops"] == _bert_flops(9, teacher.num_labels, layers, hidden, intermediate)
    assert profile["shape"] == {"num_hidden_layers": layers, "hidden_size": hidden, "num_attention_heads": heads,
                                "intermediate_size": intermediate}
    assert profile["latency_ms"] > 0 and profile["latency_threads"] == 1 and profile["latency_rows"] == 4
    assert profile["machine"] and profile["host"]
    assert torch.get_num_threads() >= 1  # the thread count is restored after timing


# ------------------------------------------------------------------------------------------------ Pareto front


def _brute_force(points: list[tuple[int, float, float]]) -> set[int]:
    """Non-dominated keys, by definition: nobody at least as good on both and better on one."""
    return {k for k, m, c in points
            if not any(m2 >= m and c2 <= c and (m2 > m or c2 < c) for _, m2, c2 in points)}


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_function_against_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    # Small integer grids: many ties on either axis and exact duplicates.
    points = [(i, rng.randint(0, 12) / 12, float(rng.randint(1, 15))) for i in range(rng.randint(1, 80))]
    assert set(pareto_front(points)) == _brute_force(points)
    assert len(pareto_front(points)) == len(set(pareto_front(points)))


def _profile(params: int, flops: int, latency: float, hidden: int = 16) -> dict:
    return {"shape": {"num_hidden_layers": 1, "hidden_size": hidden, "num_attention_heads": 2,
                      "intermediate_size": 32}, "params": params, "params_no_embeddings": params // 2,
            "flops": flops, "flops_seq_len": 9, "latency_ms": latency, "latency_rows": 8, "latency_passes": 5,
            "latency_threads": 1, "machine": "test CPU", "host": "test"}


def test_pareto_endpoint_is_exactly_the_non_dominated_set(db_url: str, tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """A seeded set of trials (ties, duplicates, PRUNED and FAILED ones among them) written into a two-objective
    study: the endpoint's front is the brute-force non-dominated set, and Optuna's best_trials, on every axis."""
    settings = Settings(database_url=db_url, artifacts=tmp_path / "a")
    with TestClient(create_app(settings)) as client:
        spec = tiny_spec(tiny_assets, name="seeded", objectives=["metric", "params"])
        assert client.post("/api/studies", json=spec).status_code == 201
        study = optuna.load_study(study_name="seeded", storage=client.app.state.optuna_storage)  # type: ignore[attr-defined]
        rng = random.Random(7)
        points: dict[str, list[tuple[int, float, float]]] = {"params": [], "flops": [], "latency_ms": []}
        for number in range(90):
            metric = rng.randint(50, 70) / 100
            profile = _profile(rng.randint(1, 30) * 1000, rng.randint(1, 20) * 10_000, rng.randint(1, 25) / 10)
            state = rng.choices([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], [8, 1, 1])[0]
            study.add_trial(create_trial(
                state=state, values=[metric, profile["params"]] if state == TrialState.COMPLETE else None,
                user_attrs={"profile": profile, "params": {"learning_rate": 1e-3, "alpha": 0.5},
                            "metrics": {"accuracy": metric}}))
            if state == TrialState.COMPLETE:
                for cost in points:
                    points[cost].append((number, metric, float(profile[cost])))
        for cost, expected in points.items():
            body = client.get(f"/api/studies/seeded/pareto?cost={cost}").json()
            numbers = [p["number"] for p in body["front"]]
            assert set(numbers) == _brute_force(expected) and len(numbers) == len(set(numbers)), cost
            assert body["cost"] == cost and body["n_complete"] == len(expected)
            assert [p["cost"] for p in body["front"]] == sorted(p["cost"] for p in body["front"])
            assert body["dominated"] is None  # only when asked for
            both = client.get(f"/api/studies/seeded/pareto?cost={cost}&dominated=true").json()
            assert both["front"] == body["front"]
            off = [p["number"] for p in both["dominated"]]  # every other measured COMPLETE trial, once
            assert set(off) == {n for n, _, _ in expected} - set(numbers) and len(off) == len(set(off))
            assert [p["cost"] for p in both["dominated"]] == sorted(p["cost"] for p in both["dominated"])
        assert set(numbers) == _brute_force(points["latency_ms"])
        default = client.get("/api/studies/seeded/pareto").json()  # the study's second objective
        assert default["cost"] == "params"
        assert {p["number"] for p in default["front"]} == {t.number for t in study.best_trials}
        front = default["front"][0]
        assert front["params"] == {"learning_rate": 1e-3, "alpha": 0.5} and front["profile"]["machine"] == "test CPU"
        detail = client.get("/api/studies/seeded").json()
        assert detail["best_trial"] is None and [p["number"] for p in detail["front"]] == \
            [p["number"] for p in default["front"]]
        # Dominated trials and trials that are not COMPLETE are never on it.
        assert client.get("/api/studies/seeded/trials?limit=500").json()["total"] == 90
        assert client.get("/api/studies/nope/pareto").status_code == 404


# ----------------------------------------------------------------------------------------------------- pruning


def _finished(number: int, shape_hidden: int, scores: list[float]) -> optuna.trial.FrozenTrial:
    return create_trial(state=TrialState.COMPLETE, values=[max(scores), 1000.0], user_attrs={
        "profile": _profile(1000, 1, 1.0, hidden=shape_hidden),
        "epochs": [{"epoch": e + 1, "score": s} for e, s in enumerate(scores)]})


def test_same_shape_pruning_compares_only_trials_of_the_same_shape() -> None:
    shape = _profile(1, 1, 1.0, hidden=16)["shape"]
    small = [_finished(i, 16, [0.6 + 0.01 * i, 0.7]) for i in range(3)]  # epoch 1 median 0.61
    wide = [_finished(10 + i, 64, [0.9, 0.95]) for i in range(5)]  # another shape, much better: ignored
    assert not same_shape_should_prune(wide + small[:2], shape, 1, 0.5)  # only 2 peers of this shape: too few
    assert same_shape_should_prune(wide + small, shape, 1, 0.605)  # below its shape's median
    assert not same_shape_should_prune(wide + small, shape, 1, 0.62)
    assert not same_shape_should_prune(wide + small, shape, 3, 0.1)  # nobody of its shape reached epoch 3


# --------------------------------------------------------------------------------------------------- selectors


def _exportable(study: optuna.Study, metric: float, params: int, latency: float, cost: bool = True) -> None:
    study.add_trial(create_trial(state=TrialState.COMPLETE, values=[metric, params] if cost else [metric],
                                 user_attrs={"profile": _profile(params, params * 10, latency),
                                             "checkpoint_artifact_id": "x", "params": {}}))


def test_export_best_selectors_pick_the_right_trial_and_refuse_ambiguity() -> None:
    study = optuna.create_study(study_name="mo", directions=["maximize", "minimize"])
    for metric, params, latency in [(0.80, 4000, 1.0), (0.85, 9000, 2.0), (0.83, 4000, 1.5), (0.86, 30000, 4.0),
                                    (0.70, 2000, 0.5), (0.84, 9500, 1.0)]:
        _exportable(study, metric, params, latency)
    study.add_trial(create_trial(state=TrialState.FAIL))
    front = {t.number for t in study.best_trials}
    assert front == {1, 2, 3, 4}
    with pytest.raises(ExportError) as info:
        select_trial(study, metric="accuracy")
    message = str(info.value)
    assert "two objectives" in message and "--max-params" in message and "--trial" in message
    for number in front:
        assert f"trial {number}: accuracy" in message
    assert "trial 0:" not in message and "trial 5:" not in message  # dominated: not listed

    assert select_trial(study, trial_number=0).trial.number == 0  # any trial with a checkpoint, by number
    assert select_trial(study, max_params=9000).trial.number == 1  # the most accurate within the limit
    assert select_trial(study, max_params=10_000).trial.number == 1
    assert select_trial(study, max_params=10_000, max_latency_ms=1.2).trial.number == 5
    assert select_trial(study, max_latency_ms=1.6).trial.number == 5
    chosen = select_trial(study, max_flops=40_000)
    assert chosen.trial.number == 2 and "--max-flops 40,000" in chosen.how and chosen.front is not None
    with pytest.raises(ExportError, match=r"no COMPLETE trial .* within --max-params 100 .*smallest by params: "
                                          r"trial 4"):
        select_trial(study, max_params=100)
    with pytest.raises(ExportError, match="trial 3 is not within --max-params 5,000"):
        select_trial(study, trial_number=3, max_params=5000)
    with pytest.raises(ExportError, match="is FAIL without a checkpoint"):
        select_trial(study, trial_number=6)
    with pytest.raises(ExportError, match="has no trial 42"):
        select_trial(study, trial_number=42)

    single = optuna.create_study(study_name="one", direction="maximize")
    for metric, params, latency in [(0.80, 4000, 1.0), (0.88, 9000, 2.0), (0.83, 3000, 1.5)]:
        _exportable(single, metric, params, latency, cost=False)
    assert select_trial(single).trial.number == 1 and select_trial(single).how == "the best trial"
    assert select_trial(single, max_params=5000).trial.number == 2


# ------------------------------------------------------------------------------------------------- constraints


def test_constraints_mark_infeasible_trials_and_skip_their_training(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """hidden 8 (about 1.5k parameters) or 32 (about 9k) against max_params 5,000: each wide student is recorded
    infeasible from its profile, never trained, never best; the sampler sees its violation."""
    from service.worker import Worker

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "artifacts")
    spec = tiny_spec(tiny_assets, name="limited", n_trials=6, sampler="random", seed=3,
                     constraints={"max_params": 5000}, search_space={"num_train_epochs": 1, "batch_size": 32},
                     student={"config": {"num_hidden_layers": 1, "hidden_size": {"choices": [8, 32]},
                                         "num_attention_heads": 2, "intermediate_size": 16}})
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=spec).status_code == 201
        Worker(settings, device="cpu", exit_when_idle=True).run()
        detail = client.get("/api/studies/limited").json()
        trials = client.get("/api/studies/limited/trials").json()["trials"]
        study = optuna.load_study(study_name="limited", storage=client.app.state.optuna_storage)  # type: ignore[attr-defined]
    assert detail["status"] == "finished" and detail["finished"] == 6
    frozen = {t.number: t for t in study.trials}
    wide = [t for t in trials if t["profile"]["shape"]["hidden_size"] == 32]
    narrow = [t for t in trials if t["profile"]["shape"]["hidden_size"] == 8]
    assert wide and narrow, "seed 3 samples both widths"
    for t in wide:
        assert t["profile"]["params"] > 5000 and t["state"] == "PRUNED" and t["value"] is None
        assert t["stop_reason"].startswith("infeasible: ") and "max_params 5,000" in t["stop_reason"]
        assert t["epochs"] == [] and "checkpoint_artifact_id" not in frozen[t["number"]].user_attrs  # not trained
        assert frozen[t["number"]].constraints["max_params"] > 0
    for t in narrow:
        assert t["profile"]["params"] <= 5000 and t["state"] == "COMPLETE" and t["epochs"]
        assert frozen[t["number"]].constraints["max_params"] <= 0
    assert study.best_trial.number in {t["number"] for t in narrow}
    assert detail["best_trial"]["number"] == study.best_trial.number
    assert detail["constraints"] == {"max_params": 5000.0}
    assert json.loads(json.dumps(detail["teacher_profile"]))["params"] > 5000  # the teacher breaks it: a reference

    # Every (hidden, heads) combination recorded is a valid one, and the params name the trial's shape.
    for t in trials:
        assert t["params"]["hidden_size"] == t["profile"]["shape"]["hidden_size"]
    assert list(itertools.chain.from_iterable(t["params"] for t in trials))  # params recorded for every trial


def test_a_spec_without_search_keeps_its_params(tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """A fixed student adds nothing to the Optuna params or the trial params (single-objective studies as before)."""
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    space = student_space(spec.student)
    assert not space.searched and space.distributions == {} and spec.directions == ["maximize"]
    assert spec.model_dump(mode="json")["student"]["config"] == {
        "num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}
