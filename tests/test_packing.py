"""Packed trials: the fused loop equals solo runs; claim_slots; packed workers through real processes."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel

from distill.data import TokenizedSplit
from distill.engine import TrialOutcome
from distill.packed import MemberDiverged, PackMember, parse_pack, resolve_pack, resolve_pack_step, train_pack
from distill.train import EpochResult, TrainConfig, TrainResult, train_student
from kdsearch.terms import resolve_terms
from search_space import TaskInfo
from tests.conftest import PRECISIONS

TASK = TaskInfo("classification", 2, "accuracy", ("negative", "positive"))
BATCH_SEED = 1234


def tiny_split(n: int, seed: int, vocab: int = 50, width: int = 12) -> TokenizedSplit:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, width + 1, (n,), generator=g)
    ids = torch.randint(5, vocab, (n, width), generator=g)
    ids[torch.arange(width)[None, :] >= lengths[:, None]] = 0
    labels = torch.randint(0, 2, (n,), generator=g)
    return TokenizedSplit(ids, lengths, labels, pad_id=0)


def tiny_student(seed: int, dropout: float) -> PreTrainedModel:
    torch.manual_seed(seed)  # as build_student seeds a student's initial weights
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def data() -> tuple[TokenizedSplit, torch.Tensor, TokenizedSplit]:
    train = tiny_split(96, seed=0)
    logits = torch.randn(len(train), 2, generator=torch.Generator().manual_seed(1)) * 3
    return train, logits, tiny_split(40, seed=2)


CONFIGS = [
    TrainConfig.from_params({"learning_rate": 3e-3, "alpha": 0.5, "num_train_epochs": 3, "temperature": 2.0,
                             "batch_size": 16}, regression=False, seed=7),
    TrainConfig.from_params({"learning_rate": 1e-3, "alpha": 0.1, "num_train_epochs": 2, "temperature": 4.0,
                             "batch_size": 16, "weight_decay": 0.1, "warmup_ratio": 0.3}, regression=False, seed=8),
    TrainConfig.from_params({"learning_rate": 8e-3, "alpha": 0.9, "num_train_epochs": 4, "temperature": 1.0,
                             "batch_size": 16, "weight_decay": 0.01, "warmup_ratio": 0.1}, regression=False, seed=9),
]
# A temperature of 0: the softened KL divides by zero, so the loss turns NaN at the first step.
ZERO_TEMPERATURE = resolve_terms({"alpha": 0.1, "temperature": 0.0}, regression=False)


def solo(data: Any, cfg: TrainConfig, dropout: float) -> TrainResult:
    train, logits, eval_split = data
    return train_student(tiny_student(cfg.seed, dropout), train, logits, eval_split,
                         dataclasses.replace(cfg, batch_seed=BATCH_SEED), task=TASK)


def assert_same(packed: TrainResult | MemberDiverged, alone: TrainResult, epochs: int | None = None) -> None:
    assert isinstance(packed, TrainResult), packed
    expected = alone.history[:epochs] if epochs is not None else alone.history
    assert len(packed.history) == len(expected)
    for got, want in zip(packed.history, expected, strict=True):
        assert got.epoch == want.epoch and got.step == want.step
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5, abs=1e-6)
        assert got.eval_loss == pytest.approx(want.eval_loss, rel=1e-5, abs=1e-6)
        assert got.metrics == pytest.approx(want.metrics, rel=1e-5, abs=1e-6)
    best = max(expected, key=lambda h: h.score)
    assert packed.best_epoch == best.epoch
    for name, value in alone.best_state.items() if epochs is None else ():
        torch.testing.assert_close(packed.best_state[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["dropout-off", "dropout-on"])
def test_members_equal_their_solo_runs(data, dropout: float) -> None:  # type: ignore[no-untyped-def]
    train, logits, eval_split = data
    members = [PackMember(tiny_student(cfg.seed, dropout), cfg) for cfg in CONFIGS]
    results = train_pack(members, train, logits, eval_split, BATCH_SEED, TASK)
    for cfg, result in zip(CONFIGS, results, strict=True):
        assert_same(result, solo(data, cfg, dropout))
        assert isinstance(result, TrainResult) and len(result.history) == cfg.num_train_epochs
        assert result.stopped is None


def test_dropout_streams_are_per_member(data) -> None:  # type: ignore[no-untyped-def]
    """Two members with the same seed and config stay identical with dropout on (each its own stream)."""
    train, logits, eval_split = data
    cfg = CONFIGS[0]
    members = [PackMember(tiny_student(cfg.seed, 0.1), cfg) for _ in range(2)]
    first, second = train_pack(members, train, logits, eval_split, BATCH_SEED, TASK)
    assert isinstance(first, TrainResult) and isinstance(second, TrainResult)
    assert [h.train_loss for h in first.history] == [h.train_loss for h in second.history]


def test_pruned_member_leaves_and_the_rest_go_on(data) -> None:  # type: ignore[no-untyped-def]
    train, logits, eval_split = data
    seen: list[int] = []

    def prune_at_one(result: EpochResult) -> str | None:
        seen.append(result.epoch)
        return "pruned" if result.epoch == 1 else None

    members = [PackMember(tiny_student(cfg.seed, 0.1), cfg) for cfg in CONFIGS]
    members[2].on_epoch_end = prune_at_one
    results = train_pack(members, train, logits, eval_split, BATCH_SEED, TASK)
    assert seen == [1]
    pruned = results[2]
    assert isinstance(pruned, TrainResult) and pruned.stopped == "pruned"
    assert_same(pruned, solo(data, CONFIGS[2], 0.1), epochs=1)
    for cfg, result in zip(CONFIGS[:2], results[:2], strict=True):
        assert_same(result, solo(data, cfg, 0.1))


def test_diverging_member_fails_alone(data) -> None:  # type: ignore[no-untyped-def]
    """One member's loss is NaN from its first step (temperature 0), another's turns NaN in epoch 2 (its weights
    poisoned after epoch 1): both fail with the epoch and step, the third equals its solo run."""
    train, logits, eval_split = data
    members = [PackMember(tiny_student(cfg.seed, 0.1), cfg) for cfg in CONFIGS]
    members[1].cfg = dataclasses.replace(CONFIGS[1], terms=ZERO_TEMPERATURE)

    def poison(result: EpochResult) -> None:
        with torch.no_grad():
            members[2].model.classifier.weight.fill_(math.inf)

    members[2].on_epoch_end = poison
    results = train_pack(members, train, logits, eval_split, BATCH_SEED, TASK)
    assert isinstance(results[1], MemberDiverged)
    assert (results[1].epoch, results[1].step) == (1, 1) and "loss diverged (nan) at epoch 1 step 1" in str(results[1])
    assert isinstance(results[2], MemberDiverged) and (results[2].epoch, results[2].step) == (2, 1)
    assert_same(results[0], solo(data, CONFIGS[0], 0.1))


def test_stacked_members_equal_their_solo_runs(data) -> None:  # type: ignore[no-untyped-def]
    """The stacked step (one vmapped forward/backward and one AdamW over [K, P]): with dropout off, each member's
    losses, metrics and best weights equal its solo run's, different lr/T/alpha/epochs/decay/warm-up in one pack."""
    train, logits, eval_split = data
    members = [PackMember(tiny_student(cfg.seed, 0.0), cfg) for cfg in CONFIGS]
    results = train_pack(members, train, logits, eval_split, BATCH_SEED, TASK, step="stacked")
    for cfg, result in zip(CONFIGS, results, strict=True):
        assert_same(result, solo(data, cfg, 0.0))
        assert isinstance(result, TrainResult) and len(result.history) == cfg.num_train_epochs


def test_stacked_dropout_is_reproducible_and_per_member(data) -> None:  # type: ignore[no-untyped-def]
    """With dropout on, the stacked pack draws one stream from its batch seed: the same pack gives the same numbers
    again, and two members of the same seed and config get different masks (so different losses)."""
    train, logits, eval_split = data
    cfg = CONFIGS[0]

    def run() -> list[TrainResult | MemberDiverged]:
        members = [PackMember(tiny_student(cfg.seed, 0.1), cfg) for _ in range(2)]
        return train_pack(members, train, logits, eval_split, BATCH_SEED, TASK, step="stacked")

    first, second = run()
    again, _ = run()
    assert isinstance(first, TrainResult) and isinstance(second, TrainResult) and isinstance(again, TrainResult)
    assert [h.train_loss for h in first.history] == [h.train_loss for h in again.history]
    assert [h.train_loss for h in first.history] != [h.train_loss for h in second.history]


def test_stacked_pruned_and_diverging_members_leave_alone(data) -> None:  # type: ignore[no-untyped-def]
    """Stacked: a member pruned after epoch 1 leaves, one whose loss is NaN from step 1 (temperature 0) and one
    whose first update is infinite (NaN from step 2) fail with their step; the last equals its solo run."""
    train, logits, eval_split = data
    cfgs = [*CONFIGS, CONFIGS[0]]
    members = [PackMember(tiny_student(cfg.seed, 0.0), cfg) for cfg in cfgs]
    members[0].on_epoch_end = lambda result: "pruned" if result.epoch == 1 else None
    members[1].cfg = dataclasses.replace(CONFIGS[1], terms=ZERO_TEMPERATURE)
    members[3].cfg = dataclasses.replace(CONFIGS[0], learning_rate=math.inf)
    pruned, nan_loss, survivor, blown_up = train_pack(members, train, logits, eval_split, BATCH_SEED, TASK,
                                                      step="stacked")
    assert isinstance(pruned, TrainResult) and pruned.stopped == "pruned"
    assert_same(pruned, solo(data, CONFIGS[0], 0.0), epochs=1)
    assert isinstance(nan_loss, MemberDiverged) and (nan_loss.epoch, nan_loss.step) == (1, 1)
    assert isinstance(blown_up, MemberDiverged) and (blown_up.epoch, blown_up.step) == (1, 2)
    assert_same(survivor, solo(data, CONFIGS[2], 0.0))


def test_a_pack_shares_its_batch_size(data) -> None:  # type: ignore[no-untyped-def]
    train, logits, eval_split = data
    members = [PackMember(tiny_student(7, 0.0), CONFIGS[0]),
               PackMember(tiny_student(7, 0.0), dataclasses.replace(CONFIGS[0], batch_size=32))]
    with pytest.raises(ValueError, match="batch size"):
        train_pack(members, train, logits, eval_split, BATCH_SEED, TASK)


def test_pack_setting() -> None:
    assert resolve_pack("auto", "cpu") == 1 and resolve_pack("auto", "cuda") == 1
    assert resolve_pack("3", "cpu") == 3 and resolve_pack(2, "cpu") == 2
    assert parse_pack(" AUTO ") == "auto"
    assert resolve_pack_step("auto", "cpu") == "loop" and resolve_pack_step("auto", "cuda") == "stacked"
    assert resolve_pack_step("stacked", "cpu") == "stacked" and resolve_pack_step("loop", "cuda") == "loop"
    with pytest.raises(ValueError, match="pack step must be one of auto, loop, stacked"):
        resolve_pack_step("fused", "cpu")
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="pack must be"):
            parse_pack(bad)


# -- the engine and real workers -----------------------------------------------------------------------------------

ENGINE_PARAMS = [
    {"learning_rate": 5e-3, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 2, "batch_size": 32},
    {"learning_rate": 2e-3, "temperature": 4.0, "alpha": 0.2, "num_train_epochs": 3, "batch_size": 32,
     "weight_decay": 0.05, "warmup_ratio": 0.2},
    {"learning_rate": 9e-3, "temperature": 1.0, "alpha": 0.8, "num_train_epochs": 1, "batch_size": 32},
]


def rescore(checkpoint: Path, prepared: Any) -> dict[str, float]:
    """A stored checkpoint's metrics on the eval split, loaded as an ordinary fp32 model."""
    from transformers import AutoModelForSequenceClassification

    from distill.train import evaluate

    metrics, _, _ = evaluate(AutoModelForSequenceClassification.from_pretrained(checkpoint), prepared.eval, 64,
                             prepared.task)
    return metrics


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_pack_equals_solo_trials(tiny_assets, tmp_path: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    """DistillationEngine.run_pack with the study's seed as batch seed: each member equals run_trial exactly as a
    solo trial runs (a packed trial cannot be told from a solo one), and writes its own checkpoint, which re-scores
    to the recorded metrics in either training precision."""
    from distill import DistillationEngine
    from distill.engine import TRIAL_RECORD, PackedTrial
    from kdsearch.testing import tiny_spec
    from search_space import StudySpec

    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", precision=precision)
    prepared = engine.prepare(spec)
    members = [PackedTrial(p, spec.seed, None, tmp_path / f"packed-{i}") for i, p in enumerate(ENGINE_PARAMS)]
    outcomes = engine.run_pack(prepared, members, batch_seed=spec.seed)
    for i, (params, outcome) in enumerate(zip(ENGINE_PARAMS, outcomes, strict=True)):
        alone = engine.run_trial(prepared, params, spec.seed, None, tmp_path / f"solo-{i}")
        assert isinstance(outcome, TrialOutcome), outcome
        assert outcome.precision == alone.precision == precision
        assert len(outcome.history) == params["num_train_epochs"]
        for got, want in zip(outcome.history, alone.history, strict=True):
            assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)
            assert got.metrics == pytest.approx(want.metrics, rel=1e-5)
        record = json.loads((tmp_path / f"packed-{i}" / TRIAL_RECORD).read_text())
        assert record["best_epoch"] == outcome.best_epoch and record["batch_seed"] == spec.seed
        assert rescore(tmp_path / f"packed-{i}", prepared) == pytest.approx(outcome.best_metrics, abs=1e-4)
        assert rescore(tmp_path / f"solo-{i}", prepared) == pytest.approx(alone.best_metrics, abs=1e-4)
    shaped = tiny_spec(tiny_assets, student={"config": {"num_hidden_layers": {"low": 1, "high": 2}, "hidden_size": 16,
                                                        "num_attention_heads": 2, "intermediate_size": 32}})
    prepared = engine.prepare(StudySpec.model_validate(shaped))
    mixed = [PackedTrial({**ENGINE_PARAMS[0], "num_hidden_layers": n}, 1, None, tmp_path / f"mixed-{n}")
             for n in (1, 2)]
    with pytest.raises(ValueError, match="one student shape"):
        engine.run_pack(prepared, mixed, batch_seed=1)


def test_engine_pack_hands_each_member_over_as_it_leaves(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """run_pack's on_member_done: a member is handed over (its checkpoint written) right after its last epoch, while
    the members with more epochs are still training, so the worker can store and tell its trial at once."""
    from distill import DistillationEngine
    from distill.engine import PackedTrial
    from kdsearch.testing import tiny_spec
    from search_space import StudySpec

    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu")
    prepared = engine.prepare(spec)
    events: list[tuple[str, int, int]] = []

    def epochs_of(index: int) -> Any:
        return lambda result: events.append(("epoch", index, result.epoch))

    def handed_over(index: int, outcome: TrialOutcome | Exception) -> None:
        assert isinstance(outcome, TrialOutcome) and (tmp_path / f"m-{index}" / "model.safetensors").is_file()
        events.append(("done", index, len(outcome.history)))

    members = [PackedTrial(p, spec.seed, epochs_of(i), tmp_path / f"m-{i}") for i, p in enumerate(ENGINE_PARAMS)]
    outcomes = engine.run_pack(prepared, members, spec.seed, handed_over)  # epochs: 2, 3 and 1
    assert events == [("epoch", 0, 1), ("epoch", 1, 1), ("epoch", 2, 1), ("done", 2, 1),
                      ("epoch", 0, 2), ("done", 0, 2), ("epoch", 1, 2), ("epoch", 1, 3), ("done", 1, 3)]
    assert [len(o.history) for o in outcomes if isinstance(o, TrialOutcome)] == [2, 3, 1]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_engine_stacked_pack_stores_each_member(tiny_assets, tmp_path: Path, precision: str) -> None:  # type: ignore[no-untyped-def]
    """DistillationEngine(pack_step="stacked"): each member's checkpoint holds its own trained weights (its stored
    model scores what its trial recorded on the eval split, in either training precision), and its record says how
    it was packed."""
    from transformers import AutoModelForSequenceClassification

    from distill import DistillationEngine
    from distill.engine import TRIAL_RECORD, PackedTrial
    from kdsearch.testing import tiny_spec
    from search_space import StudySpec

    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", pack_step="stacked", precision=precision)
    assert engine.pack_step == "stacked"
    prepared = engine.prepare(spec)
    members = [PackedTrial(p, spec.seed, None, tmp_path / f"stacked-{i}") for i, p in enumerate(ENGINE_PARAMS)]
    outcomes = engine.run_pack(prepared, members, batch_seed=spec.seed)
    weights = []
    for i, (params, outcome) in enumerate(zip(ENGINE_PARAMS, outcomes, strict=True)):
        assert isinstance(outcome, TrialOutcome), outcome
        assert len(outcome.history) == params["num_train_epochs"]
        record = json.loads((tmp_path / f"stacked-{i}" / TRIAL_RECORD).read_text())
        assert record["pack_step"] == "stacked" and record["pack_size"] == 3
        assert record["precision"] == outcome.precision == precision
        assert rescore(tmp_path / f"stacked-{i}", prepared) == pytest.approx(outcome.best_metrics, abs=1e-4)
        stored = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"stacked-{i}")
        weights.append(stored.classifier.weight.detach())
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])


def test_pack_groups_split_shapes_and_batch_sizes() -> None:
    from service.trial_runner import pack_groups

    params = [{"num_hidden_layers": 1, "batch_size": 32}, {"num_hidden_layers": 2, "batch_size": 32},
              {"num_hidden_layers": 1, "batch_size": 16}, {"num_hidden_layers": 1, "batch_size": 32}]
    assert pack_groups(params, {"num_hidden_layers"}) == [[0, 3], [1], [2]]
    assert pack_groups(params, set()) == [[0, 1, 3], [2]]


def test_packed_worker_end_to_end(db_url: str, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A real ``kdsearch worker --pack 3`` (the distillation engine) on SQLite and PostgreSQL: 5 trials run as a pack
    of 3 then one of 2, the budget exact, each trial with its pack attribute, its checkpoint and the numbers of its
    solo run; export-best works on the best."""
    import optuna
    from optuna.trial import TrialState

    from distill import DistillationEngine
    from kdsearch.testing import KDSEARCH, Stack, tiny_spec
    from search_space import StudySpec

    stack = Stack(db_url, tmp_path, KDSEARCH_HEARTBEAT_INTERVAL="0.05")  # a beat between any two members leaving
    try:
        stack.start_api()
        spec = tiny_spec(tiny_assets, name="packed", n_trials=5)
        stack.submit(spec)
        stack.start_worker("--pack", "3", "--exit-when-idle")
        study = stack.wait_status("packed")
        assert study["status"] == "finished", study
        assert study["counts"]["complete"] == 5 and study["counts"]["failed"] == 0
        trials = optuna.load_study(study_name="packed", storage=db_url).get_trials()
        assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
        assert sorted(t.user_attrs["slot"] for t in trials) == list(range(5))
        packs = sorted({tuple(t.user_attrs["pack"]["members"]) for t in trials})
        assert [len(members) for members in packs] == [3, 2]
        assert all(t.user_attrs["pack"]["batch_seed"] == 33 and t.number in t.user_attrs["pack"]["members"]
                   and t.user_attrs["pack"]["step"] == "loop" for t in trials)
        assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == 5, "the pack's trials differ"
        assert all(t.user_attrs["checkpoint_artifact_id"] for t in trials)
        listed = stack.trials("packed")  # the API (and so the dashboard) lists packed trials as any others
        assert len(listed) == 5 and all(t["state"] == "COMPLETE" and t["epochs"] for t in listed)
        # One packed trial, run alone in this process with the study's seed: the same epochs.
        trial = trials[1]
        engine = DistillationEngine(tmp_path / "solo-artifacts", device="cpu")
        prepared = engine.prepare(StudySpec.model_validate(stack.study("packed")["spec"]))
        alone = engine.run_trial(prepared, trial.user_attrs["params"], 33, None, tmp_path / "solo")
        assert [e["train_loss"] for e in trial.user_attrs["epochs"]] == pytest.approx(
            [h.train_loss for h in alone.history], rel=1e-5)
        assert trial.value == pytest.approx(alone.best_score, rel=1e-6)

        out = tmp_path / "export"
        # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
        export = subprocess.run([*KDSEARCH, "export-best", "packed", "--out", str(out), "--force"], env=stack.env,
                                capture_output=True, text=True)
        assert export.returncode == 0, export.stderr
        assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
        # Members handed over as they left: their slots were closed by this worker, never "taken over".
        assert "taken over" not in stack.worker_logs()
    finally:
        stack.stop()


def test_heartbeat_beats_every_slot_and_loses_only_the_taken_one(db_url: str) -> None:
    """A pack's heartbeat thread: every claimed slot is beaten; a slot another worker took over sets its member's
    ``lost`` alone, and the others keep beating."""
    import threading
    import time

    from sqlalchemy import select, update

    from service.heartbeat import SlotHeartbeat
    from storage import TrialSlotRow, claim_slots, create_study, init_db, make_engine, session_scope

    def beats(session: Any) -> dict[int, Any]:
        return {row.id: row.heartbeat_at for row in session.execute(select(TrialSlotRow.id, TrialSlotRow.heartbeat_at))}

    db = make_engine(db_url)
    init_db(db)
    try:
        create_study(db, name="beats", spec={"name": "beats"}, n_trials=3, priority=0, timeout_s=None)
        claims = claim_slots(db, "packer", 3)
        assert len(claims) == 3
        with session_scope(db) as session:
            session.execute(update(TrialSlotRow).where(TrialSlotRow.id == claims[1].slot_id)
                            .values(worker_id="reaper"))
            before = beats(session)
        lost = [threading.Event() for _ in claims]
        with SlotHeartbeat(db, "packer", {c.slot_id: e for c, e in zip(claims, lost, strict=True)},
                           interval_s=0.05, grace_period_s=60):
            assert lost[1].wait(10)
            time.sleep(1.2)  # heartbeat times are the database's: SQLite's keep whole seconds
        assert not lost[0].is_set() and not lost[2].is_set()
        with session_scope(db) as session:
            after = beats(session)
        assert after[claims[0].slot_id] > before[claims[0].slot_id]
        assert after[claims[2].slot_id] > before[claims[2].slot_id]
        assert after[claims[1].slot_id] == before[claims[1].slot_id]
    finally:
        db.dispose()


def test_stacked_worker_end_to_end(sqlite_url: str, tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``kdsearch worker --pack 3 --pack-step stacked``: the study finishes with an exact budget, the packed trials
    say they ran stacked, and export-best exports the best one; a pack step the worker does not know is refused."""
    import optuna

    from kdsearch.testing import KDSEARCH, Stack, tiny_spec

    stack = Stack(sqlite_url, tmp_path)
    try:
        stack.start_api()
        stack.submit(tiny_spec(tiny_assets, name="stacked", n_trials=4))
        bad = subprocess.run([*KDSEARCH, "worker", "--device", "cpu", "--pack-step", "fused", "--exit-when-idle"],
                             env=stack.env, capture_output=True, text=True)
        assert bad.returncode == 2 and "--pack-step" in bad.stderr and "'fused'" in bad.stderr
        stack.start_worker("--pack", "3", "--pack-step", "stacked", "--exit-when-idle")
        study = stack.wait_status("stacked")
        assert study["status"] == "finished" and study["counts"]["complete"] == 4, study
        trials = optuna.load_study(study_name="stacked", storage=sqlite_url).get_trials()
        assert sorted(t.user_attrs["slot"] for t in trials) == list(range(4))
        packed = [t for t in trials if "pack" in t.user_attrs]  # a pack of 3, then the last trial alone
        assert len(packed) == 3 and all(t.user_attrs["pack"]["step"] == "stacked" for t in packed)
        assert all(len(t.user_attrs["pack"]["members"]) == 3 for t in packed)
        out = tmp_path / "export"
        # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
        export = subprocess.run([*KDSEARCH, "export-best", "stacked", "--out", str(out), "--force"], env=stack.env,
                                capture_output=True, text=True)
        assert export.returncode == 0, export.stderr
        assert (out / "model.safetensors").is_file()
    finally:
        stack.stop()


def test_packed_worker_groups_shapes_and_skips_infeasible_members(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """A packed worker (pack 3, in this process) on a study that searches the hidden size under max_params: wide
    members are recorded infeasible and never trained, the others train in packs of one shape; budget exact."""
    import optuna
    from fastapi.testclient import TestClient

    from kdsearch.testing import tiny_spec
    from service.api import create_app
    from service.settings import Settings
    from service.worker import Worker

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=str(tmp_path / "artifacts"), pack="3")
    # Seed 27 samples hidden sizes [32, 8, 32], [8, 8, 16], [16, 32, 16] for the three claims of 3 slots.
    spec = tiny_spec(tiny_assets, name="shapes", n_trials=9, sampler="random", seed=27,
                     constraints={"max_params": 5000}, search_space={"num_train_epochs": 1, "batch_size": 32},
                     student={"config": {"num_hidden_layers": 1, "hidden_size": {"choices": [8, 16, 32]},
                                         "num_attention_heads": 2, "intermediate_size": 16}})
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=spec).status_code == 201
        worker = Worker(settings, device="cpu", exit_when_idle=True)
        assert worker.pack == 3
        worker.run()
        detail = client.get("/api/studies/shapes").json()
        study = optuna.load_study(study_name="shapes", storage=client.app.state.optuna_storage)  # type: ignore[attr-defined]
    assert detail["status"] == "finished" and detail["finished"] == 9
    trials = {t.number: t for t in study.trials}
    assert len(trials) == 9 and sorted(t.user_attrs["slot"] for t in trials.values()) == list(range(9))
    wide = [t for t in trials.values() if t.user_attrs["profile"]["params"] > 5000]
    trained = [t for t in trials.values() if t.user_attrs["profile"]["params"] <= 5000]
    assert wide and trained, "seed 27 samples both"
    # Every trial keeps the worker's own lines about it (the dashboard's trial page): packed or not trained.
    messages = {n: [line["message"] for line in t.user_attrs["log"]] for n, t in trials.items()}
    for t in wide:
        assert t.state.name == "PRUNED" and "pack" not in t.user_attrs and "checkpoint_artifact_id" not in t.user_attrs
        assert f"trial {t.number} not trained: " in messages[t.number][-1], messages[t.number]
    for t in trained:
        assert t.state.name == "COMPLETE" and t.user_attrs["checkpoint_artifact_id"]
        # A degenerate student (the tiny fixtures' usually are) gets a warning line after its others.
        degenerate = [f"study shapes trial {t.number} is degenerate"] if t.user_attrs.get("degenerate") else []
        assert [m.split(": ")[0].strip() for m in messages[t.number]] == [
            f"study shapes trial {t.number} (slot {t.user_attrs['slot']}, attempt 1) on worker {worker.worker_id}",
            f"trial {t.number} epoch 1", f"study shapes trial {t.number}",
            f"study shapes trial {t.number} complete", *degenerate]
        assert messages[t.number][2].endswith(
            f"checkpoint stored as artifact {t.user_attrs['checkpoint_artifact_id']}")
        members = [trials[n] for n in t.user_attrs["pack"]["members"]]
        assert t in members and len(members) == t.user_attrs["pack"]["size"]
        assert {m.user_attrs["params"]["hidden_size"] for m in members} == {t.user_attrs["params"]["hidden_size"]}
    sizes = sorted(t.user_attrs["pack"]["size"] for t in trained)
    assert sizes.count(2) >= 4, f"two packs of two trials (one claim split by shape): {sizes}"


def test_a_diverged_member_fails_alone_and_its_slot_is_retried(tmp_path: Path, tiny_assets) -> None:  # type: ignore[no-untyped-def]
    """Through the worker: the pack's first member diverges (its trial FAIL with the reason, its slot retried), the
    other members complete; the budget stays exact."""
    import optuna
    from fastapi.testclient import TestClient
    from optuna.trial import TrialState

    from kdsearch.testing import tiny_spec
    from service.api import create_app
    from service.settings import Settings
    from service.testing import FlakyEngine
    from service.worker import Worker

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=str(tmp_path / "artifacts"), pack="3")
    with TestClient(create_app(settings)) as client:
        assert client.post("/api/studies", json=tiny_spec(tiny_assets, name="diverge-once-a", n_trials=4,
                                                          search_space={"num_train_epochs": 2})).status_code == 201
        Worker(settings, device="cpu", trial_engine=FlakyEngine(str(tmp_path / "artifacts")), exit_when_idle=True).run()
        detail = client.get("/api/studies/diverge-once-a").json()
        trials = optuna.load_study(study_name="diverge-once-a",
                                   storage=client.app.state.optuna_storage).trials  # type: ignore[attr-defined]
    assert detail["status"] == "finished" and detail["finished"] == 4
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == (
        "MemberDiverged: loss diverged (nan) at epoch 1 step 3")
    first_pack = failed[0].user_attrs["pack"]["members"]
    assert len(first_pack) == 3 and failed[0].number == first_pack[0]
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number in first_pack[1:])
    retried = [t for t in trials if t.user_attrs["slot"] == failed[0].user_attrs["slot"] and t is not failed[0]]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE and retried[0].user_attrs["attempt"] == 2
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4


@pytest.mark.parametrize("name", ["data-bad", "oserror-once-disk"])
def test_a_failed_preparation_closes_or_gives_back_the_whole_pack(tmp_path: Path, tiny_assets, name: str) -> None:  # type: ignore[no-untyped-def]
    """The data's fault fails the study and closes every claimed slot; a transient error gives every slot back
    untried (no attempt counted), and the study then runs its exact budget."""
    import time

    from fastapi.testclient import TestClient
    from sqlalchemy import select

    from kdsearch.testing import tiny_spec
    from service.api import create_app
    from service.settings import Settings
    from service.testing import FlakyEngine
    from service.worker import Worker
    from storage import TrialSlotRow, make_engine, session_scope

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=str(tmp_path / "artifacts"), pack="3",
                        prepare_retry_delay=0.1, poll_interval=0.1)
    with TestClient(create_app(settings)) as client:
        spec = tiny_spec(tiny_assets, name=name, n_trials=4, search_space={"num_train_epochs": 1})
        assert client.post("/api/studies", json=spec).status_code == 201
        for _ in range(50):  # a study held back after a failed preparation is claimable again 0.1 s later
            Worker(settings, device="cpu", trial_engine=FlakyEngine(str(tmp_path / "artifacts")),
                   exit_when_idle=True).run()
            detail = client.get(f"/api/studies/{name}").json()
            if detail["status"] in ("finished", "failed"):
                break
            time.sleep(0.1)
    db = make_engine(settings.database_url)
    with session_scope(db) as session:
        rows = session.execute(select(TrialSlotRow.state, TrialSlotRow.attempts))
        slots = [(row.state, row.attempts) for row in rows]
    db.dispose()
    if name.startswith("data"):
        assert detail["status"] == "failed" and "maybe" in detail["error"]
        assert sorted(state for state, _ in slots) == ["cancelled", "failed", "failed", "failed"]
    else:
        assert detail["status"] == "finished" and detail["finished"] == 4
        assert slots == [("done", 1)] * 4, "the given-back slots were not counted as attempts"
        assert len((tmp_path / "artifacts" / f"flaky-{name}").read_text()) >= 2, "the first preparation failed"
