"""Layer-wise distillation terms (issue 25): hidden states, attention relations and embeddings, each checked against a
hand computation; the layer mapping; the two-stage schedule; a trial end to end; packed (loop) = solo; the stacked
pack's refusal."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel

from distill import train as train_module
from distill.engine import DistillationEngine
from distill.packed import PackMember, carried_step, train_pack
from distill.stacked import StackedStudents
from distill.train import TrainConfig, TrainResult, train_student
from kdsearch.terms import (
    AttentionRelations,
    AttentionRelationsConfig,
    EmbeddingConfig,
    EmbeddingKD,
    HiddenStates,
    HiddenStatesConfig,
    Needs,
    StudentOutputs,
    TeacherOutputs,
)
from kdsearch.terms.attention import relation_heads
from kdsearch.terms.layers import Projection, align_teacher, resolve_layer_map
from kdsearch.testing import tiny_spec
from search_space import SearchSpace, SpecError, StudySpec, optuna_distributions, trial_params
from search_space.validation import check_layer_map
from tests.test_packing import TASK, assert_same, tiny_split, tiny_student

MASK = torch.tensor([[1, 1, 0]])  # two real tokens, one padded


def projection(weight: list[list[float]], bias: list[float]) -> Projection:
    module = Projection(len(weight[0]), len(weight))
    with torch.no_grad():
        module.linear.weight.copy_(torch.tensor(weight))
        module.linear.bias.copy_(torch.tensor(bias))
    return module


def by_hand_mse(student: list[list[float]], teacher: list[list[float]], weight: list[list[float]],
                bias: list[float], mask: list[int]) -> float:
    """MSE of W s + b against t over the real tokens' elements, with loops."""
    total, count = 0.0, 0
    for s, t, real in zip(student, teacher, mask, strict=True):
        if not real:
            continue
        for row, b, target in zip(weight, bias, t, strict=True):
            projected = sum(w * x for w, x in zip(row, s, strict=True)) + b
            total += (projected - target) ** 2
            count += 1
    return total / count


W, B = [[1.0, 2.0], [0.0, -1.0], [0.5, 0.5]], [0.1, 0.0, -0.2]  # student width 2 -> teacher width 3
S_EMB = [[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]]
S_L1 = [[2.0, -1.0], [1.0, 1.0], [-7.0, 3.0]]
S_L2 = [[0.5, 0.5], [-1.0, 2.0], [4.0, 4.0]]
T_EMB = [[1.0, 1.0, 1.0], [0.0, -1.0, 2.0], [5.0, 5.0, 5.0]]
T_LAYERS = [[[0.0, 1.0, 2.0], [3.0, 0.0, 1.0], [8.0, 8.0, 8.0]], [[1.0, 1.0, 0.0], [2.0, -2.0, 1.0], [0.0, 0.0, 0.0]],
            [[-1.0, 0.5, 0.0], [1.0, 1.0, 1.0], [6.0, 6.0, 6.0]]]  # teacher layers 1..3


def tensor(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor([rows])


def test_hidden_term_by_hand() -> None:
    """Two student layers against teacher layers 3 and 1 (an explicit mapping "3,1"): 0.5 * the mean of the two
    layers' MSE(W h_s + b, h_t) over the real tokens; the padded token (large values) adds nothing."""
    teacher = TeacherOutputs(torch.zeros(1, 2), (tensor(T_EMB), *(tensor(layer) for layer in T_LAYERS)))
    aligned = align_teacher(teacher, resolve_layer_map("3,1", 2, 3))
    student = StudentOutputs(torch.zeros(1, 2), (tensor(S_EMB), tensor(S_L1), tensor(S_L2)), attention_mask=MASK,
                             trainable={"hidden": projection(W, B)})
    got = HiddenStates().loss(student, aligned, torch.tensor([0]), HiddenStatesConfig(0.5), False)
    expected = 0.5 * (by_hand_mse(S_L1, T_LAYERS[2], W, B, [1, 1, 0])
                      + by_hand_mse(S_L2, T_LAYERS[0], W, B, [1, 1, 0])) / 2
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert "W_h" in HiddenStates().describe(HiddenStatesConfig(0.5), False)


def test_embedding_term_by_hand() -> None:
    teacher = TeacherOutputs(torch.zeros(1, 2), (tensor(T_EMB), tensor(T_LAYERS[0])))
    student = StudentOutputs(torch.zeros(1, 2), (tensor(S_EMB), tensor(S_L1)), attention_mask=MASK,
                             trainable={"embedding": projection(W, B)})
    got = EmbeddingKD().loss(student, teacher, torch.tensor([0]), EmbeddingConfig(2.0), False)
    assert got.item() == pytest.approx(2.0 * by_hand_mse(S_EMB, T_EMB, W, B, [1, 1, 0]), rel=1e-6)


def by_hand_relation_kl(teacher: list[list[float]], student: list[list[float]], mask: list[int]) -> float:
    """One relation head: per real query token i, KL(softmax_j(t_i . t_j / sqrt(d_t)) || softmax_j(s_i . s_j /
    sqrt(d_s))) over the real keys j, averaged over the real query tokens."""
    real = [i for i, m in enumerate(mask) if m]

    def rows(x: list[list[float]]) -> list[list[float]]:
        d = len(x[0])
        out = []
        for i in real:
            scores = [sum(a * b for a, b in zip(x[i], x[j], strict=True)) / math.sqrt(d) for j in real]
            z = sum(math.exp(v) for v in scores)
            out.append([math.exp(v) / z for v in scores])
        return out

    kls = [sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=True))
           for pt, ps in zip(rows(teacher), rows(student), strict=True)]
    return sum(kls) / len(kls)


def test_attention_relations_term_by_hand() -> None:
    """One student layer against teacher layer 2 ("top" of 2 -> 1 layer): 0.3 * the mean over Q-Q, K-K, V-V of the
    relation KL; widths 2 and 3 share one relation head (each under MIN_RELATION_DIMS)."""
    assert relation_heads(2, 3) == 1 and relation_heads(128, 384) == 4 and relation_heads(384, 384) == 12
    s_q, s_k, s_v = S_EMB, S_L1, S_L2
    t_layer1 = ([[0.0] * 3] * 3,) * 3
    t_q, t_k, t_v = T_LAYERS
    teacher = TeacherOutputs(torch.zeros(1, 2), qkv=(tuple(tensor(x) for x in t_layer1),  # type: ignore[arg-type]
                                                      (tensor(t_q), tensor(t_k), tensor(t_v))))
    aligned = align_teacher(teacher, resolve_layer_map("top", 1, 2))
    student = StudentOutputs(torch.zeros(1, 2), qkv=((tensor(s_q), tensor(s_k), tensor(s_v)),), attention_mask=MASK)
    got = AttentionRelations().loss(student, aligned, torch.tensor([0]), AttentionRelationsConfig(0.3), False)
    expected = 0.3 * sum(by_hand_relation_kl(t, s, [1, 1, 0]) for t, s in ((t_q, s_q), (t_k, s_k), (t_v, s_v))) / 3
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() > 0


def test_a_term_with_weight_zero_is_off_and_needs_nothing() -> None:
    params = {"learning_rate": 1e-3, "num_train_epochs": 1, "hidden_weight": 0.0, "attention_weight": 0.0}
    cfg = TrainConfig.from_params(params, regression=False, seed=1)
    assert cfg.needs == Needs(teacher_logits=True)  # no hidden states, no teacher forward
    assert [t.name for t in cfg.stages[0].terms] == ["logits"]
    on = TrainConfig.from_params({**params, "attention_weight": 0.1}, regression=False, seed=1)
    assert on.needs.student_qkv and on.needs.teacher_internals and not on.needs.student_hidden_states


def test_layer_mapping() -> None:
    assert resolve_layer_map("uniform", 2, 6) == (3, 6)
    assert resolve_layer_map("uniform", 4, 6) == (2, 3, 5, 6)
    assert resolve_layer_map("top", 2, 6) == (5, 6)
    assert resolve_layer_map("bottom", 2, 6) == (1, 2)
    assert resolve_layer_map(" 2, 5", 2, 6) == (2, 5)
    with pytest.raises(ValueError, match=r"names 3 teacher layers, but the student has 2"):
        resolve_layer_map("1,2,3", 2, 6)
    with pytest.raises(ValueError, match=r"the teacher has 6 layers"):
        resolve_layer_map("2,7", 2, 6)
    with pytest.raises(ValueError, match=r"more layers \(8\) than the teacher \(6\)"):
        resolve_layer_map("uniform", 8, 6)
    hidden = tuple(torch.full((1, 1, 1), float(i)) for i in range(7))
    assert [h.item() for h in align_teacher(TeacherOutputs(torch.zeros(1), hidden), (2, 5)).hidden_states or ()] == [
        0.0, 2.0, 5.0]


def test_layer_map_in_the_spec(tiny_assets: dict[str, Path]) -> None:
    """String choices are an Optuna categorical; a bad mapping is a 422 naming search_space.layer_map."""
    space = SearchSpace(layer_map={"choices": ["uniform", "top", "1,3"]}, intermediate_epochs={"low": 0, "high": 2},
                        hidden_weight={"low": 0.0, "high": 1.0})
    dists = optuna_distributions(space)
    assert list(dists["layer_map"].choices) == ["uniform", "top", "1,3"]  # type: ignore[attr-defined]
    assert (dists["intermediate_epochs"].low, dists["intermediate_epochs"].high) == (0, 2)  # type: ignore[attr-defined]
    assert trial_params(space, {"layer_map": "top", "intermediate_epochs": 1})["layer_map"] == "top"
    assert trial_params(SearchSpace(), {})["layer_map"] == "uniform"
    for bad, message in (("sideways", "layer_map must be one of uniform, top, bottom"),
                         ({"choices": ["top", "0,2"]}, "numbered from 1"), ({"low": 1, "high": 2}, "layer_map")):
        with pytest.raises(ValidationError, match=message) as info:
            SearchSpace(layer_map=bad)
        assert info.value.errors()[0]["loc"][0] == "layer_map"
    with pytest.raises(ValidationError, match="intermediate_epochs must be an integer"):
        SearchSpace(intermediate_epochs=1.5)
    # Against the student's fixed depth (1 layer) and the teacher's (4 layers), known before the study is queued.
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, search_space={"layer_map": "1,2"}))
    with pytest.raises(SpecError, match="names 2 teacher layers, but the student has 1") as error:
        check_layer_map(spec, BertConfig(num_hidden_layers=4))
    assert error.value.field == "search_space.layer_map"
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, search_space={"layer_map": {"choices": ["top", "5"]}}))
    with pytest.raises(SpecError, match="the teacher has 4 layers"):
        check_layer_map(spec, BertConfig(num_hidden_layers=4))


def tiny_teacher(seed: int = 11) -> PreTrainedModel:
    """A 3-layer, 24-wide teacher of tiny_student's vocabulary (6 heads: not the student's 2)."""
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=24, num_hidden_layers=3, num_attention_heads=6,
                        intermediate_size=48, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config).eval()


LAYERED = {"learning_rate": 3e-3, "alpha": 0.5, "temperature": 2.0, "batch_size": 16, "hidden_weight": 1.0,
           "attention_weight": 0.5, "embedding_weight": 0.3}


@pytest.fixture(scope="module")
def data() -> tuple[Any, torch.Tensor, Any]:
    train = tiny_split(48, seed=0)
    logits = torch.randn(len(train), 2, generator=torch.Generator().manual_seed(1)) * 3
    return train, logits, tiny_split(16, seed=2)


def test_two_stage_schedule_runs_intermediate_terms_first(data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """intermediate_epochs 1 then 2 prediction epochs: the first epoch's steps sum the layer terms alone and are not
    reported; then the logits alone, reported as epochs 1 and 2, their steps counted from the start."""
    train, logits, eval_split = data
    used: list[tuple[str, ...]] = []
    real_total = train_module.total_loss

    def spy(terms: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        used.append(tuple(t.name for t in terms))
        return real_total(terms, *args, **kwargs)

    monkeypatch.setattr(train_module, "total_loss", spy)
    cfg = TrainConfig.from_params({**LAYERED, "num_train_epochs": 2, "intermediate_epochs": 1}, regression=False,
                                  seed=3)
    reported: list[int] = []
    student = tiny_student(3, 0.1)
    head = student.classifier.weight.detach().clone()

    def stop_never(result: Any) -> None:
        reported.append(result.epoch)
        if result.epoch == 1:
            assert not torch.equal(student.classifier.weight, head)  # the head trains in the second stage

    result = train_student(student, train, logits, eval_split, cfg, stop_never, task=TASK, teacher=tiny_teacher())
    steps = math.ceil(len(train) / 16)
    assert used == [("hidden", "attention", "embedding")] * steps + [("logits",)] * 2 * steps
    assert reported == [1, 2] and [h.epoch for h in result.history] == [1, 2]
    assert [h.step for h in result.history] == [2 * steps, 3 * steps]
    assert result.train_samples == 3 * len(train)
    # Without a layer term on, intermediate_epochs is ignored: one stage of the logits.
    plain = TrainConfig.from_params({**LAYERED, "hidden_weight": 0, "attention_weight": 0, "embedding_weight": 0,
                                     "num_train_epochs": 2, "intermediate_epochs": 3}, regression=False, seed=3)
    assert [(s.epochs, s.reported) for s in plain.stages] == [(2, True)] and plain.unreported_epochs == 0


def test_head_is_untouched_by_the_intermediate_stage(data: Any) -> None:
    """The intermediate stage's loss does not reach the head (no gradient), while the projections learn."""
    train, logits, _ = data
    cfg = TrainConfig.from_params({**LAYERED, "num_train_epochs": 1}, regression=False, seed=3)
    stage = dataclasses.replace(cfg.stages[0], terms=tuple(t for t in cfg.terms if t.term.intermediate))
    student = tiny_student(3, 0.0)
    head = student.classifier.weight.detach().clone()
    member = PackMember(student, cfg)
    train_module._prepare_layer_terms(member, tiny_teacher(), torch.device("cpu"))
    assert sorted(member.trainable) == ["embedding", "hidden"]  # the attention relations learn nothing of their own
    loss = train_module.batch_loss(student, train.batch(torch.arange(16)),
                                   align_teacher(train_module.teacher_internals(
                                       tiny_teacher(), train.batch(torch.arange(16)), logits[:16], stage.needs,
                                       "fp32"), member.teacher_layers),
                                   train.labels[:16], cfg, TASK, torch.device("cpu"), stage, member.trainable)
    loss.backward()
    assert student.classifier.weight.grad is None and torch.equal(student.classifier.weight, head)
    assert member.trainable["hidden"].linear.weight.grad is not None


def test_packed_loop_members_with_layer_terms_equal_their_solo_runs(data: Any) -> None:
    """Members with different layer maps, weights and stages in one looped pack (one teacher forward per batch for
    all): each equals its solo run, dropout on. Asked to stack, the pack steps in the loop."""
    train, logits, eval_split = data
    teacher = tiny_teacher()
    cfgs = [TrainConfig.from_params({**LAYERED, **extra}, regression=False, seed=seed) for seed, extra in (
        (7, {"num_train_epochs": 2, "layer_map": "top"}),
        (8, {"num_train_epochs": 2, "intermediate_epochs": 1, "layer_map": "1", "attention_weight": 0.0}),
        (9, {"num_train_epochs": 1, "hidden_weight": 0.0, "embedding_weight": 0.0, "attention_weight": 0.0}))]
    alone = [train_student(tiny_student(c.seed, 0.1), train, logits, eval_split, dataclasses.replace(c, batch_seed=3),
                           task=TASK, teacher=teacher) for c in cfgs]
    assert alone[0].history[-1].train_loss != pytest.approx(alone[2].history[-1].train_loss, rel=1e-3)
    for step in ("loop", "stacked"):
        members = [PackMember(tiny_student(c.seed, 0.1), c) for c in cfgs]
        if step == "stacked":
            assert carried_step("stacked", members) == "loop"
        results = train_pack(members, train, logits, eval_split, 3, TASK, step=step, teacher=teacher)
        for packed, solo in zip(results, alone, strict=True):
            assert_same(packed, solo)
    assert carried_step("stacked", [PackMember(tiny_student(9, 0.0), cfgs[2])]) == "stacked"


def test_a_stacked_pack_refuses_layer_terms_by_name() -> None:
    cfgs = [TrainConfig.from_params({**LAYERED, "num_train_epochs": 1, "attention_weight": 0.0}, regression=False,
                                    seed=s) for s in (1, 2)]
    with pytest.raises(ValueError, match=r"cannot carry the layer-wise distillation terms \(embedding, hidden\).*"
                                         r"KDSEARCH_PACK_STEP=loop"):
        StackedStudents([tiny_student(c.seed, 0.0) for c in cfgs], cfgs, 32, TASK, torch.device("cpu"))


def test_a_logit_only_trial_never_runs_the_teacher(data: Any) -> None:
    """Weights 0: no teacher forward at all (a teacher that raises when called is never called)."""
    train, logits, eval_split = data

    class Refusing(torch.nn.Module):
        config = tiny_teacher().config

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the teacher ran")

    cfg = TrainConfig.from_params({**LAYERED, "hidden_weight": 0, "attention_weight": 0, "embedding_weight": 0,
                                   "num_train_epochs": 1}, regression=False, seed=3)
    with_teacher = train_student(tiny_student(3, 0.0), train, logits, eval_split, cfg, task=TASK,
                                 teacher=Refusing())  # type: ignore[arg-type]
    without = train_student(tiny_student(3, 0.0), train, logits, eval_split, cfg, task=TASK)
    assert with_teacher.history[0].train_loss == without.history[0].train_loss


def test_a_trial_with_every_layer_term_end_to_end(tiny_assets: dict[str, Path], tmp_path: Path) -> None:
    """Through the engine: all three terms on, two stages; finite losses, metrics recorded for the reported epochs,
    and a checkpoint that is the plain student (no projection weights) and loads in a pipeline."""
    from transformers import pipeline

    spec = StudySpec.model_validate(tiny_spec(tiny_assets, student={"config": {
        "num_hidden_layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}}))
    engine = DistillationEngine(tmp_path / "artifacts", device="cpu", precision="fp32")
    prepared = engine.prepare(spec)
    params = {"learning_rate": 5e-3, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 2, "batch_size": 32,
              "hidden_weight": 1.0, "attention_weight": 1.0, "embedding_weight": 1.0, "layer_map": "2,4",
              "intermediate_epochs": 1}
    seen: list[int] = []
    outcome = engine.run_trial(prepared, params, 7, lambda r: seen.append(r.epoch) or None, tmp_path / "trial")
    assert prepared.teacher_model is not None  # loaded once, kept for the study's next trials
    assert seen == [1, 2] and [h.epoch for h in outcome.history] == [1, 2]
    assert all(math.isfinite(h.train_loss) and "accuracy" in h.metrics for h in outcome.history)
    record = json.loads((tmp_path / "trial" / "kdsearch_trial.json").read_text())
    assert record["params"]["layer_map"] == "2,4" and len(record["history"]) == 2
    weights = load_file(tmp_path / "trial" / "model.safetensors")
    assert not any("linear" in name or name.startswith(("hidden", "embedding.")) for name in weights)
    assert {tuple(v.shape) for k, v in weights.items() if k.endswith("classifier.weight")} == {(2, 16)}
    from distill.hub_model import _objective

    card_loss = _objective(params, False)
    assert "hidden-state distillation" in card_loss and "layer mapping 2,4; first 1 epochs" in card_loss
    assert "hidden-state" not in _objective({**params, "hidden_weight": 0.0}, False)
    classifier = pipeline("text-classification", model=str(tmp_path / "trial"), device="cpu")
    assert classifier("a good movie")[0]["label"] in {"negative", "positive"}
    # A logit-only trial of the same study leaves the loaded teacher alone and needs nothing of it.
    assert engine.live_teacher(prepared, [engine.train_config(prepared, {**params, "hidden_weight": 0,
                                                                         "attention_weight": 0,
                                                                         "embedding_weight": 0}, 1)]) is None


def test_a_member_diverging_in_the_intermediate_stage_fails_alone(data: Any) -> None:
    """A member whose layer terms diverge in the intermediate stage fails alone, naming that stage."""
    train, logits, eval_split = data
    good = TrainConfig.from_params({**LAYERED, "num_train_epochs": 1}, regression=False, seed=7)
    bad = TrainConfig.from_params({**LAYERED, "num_train_epochs": 1, "intermediate_epochs": 1,
                                   "hidden_weight": math.inf}, regression=False, seed=8)
    results = train_pack([PackMember(tiny_student(7, 0.0), good), PackMember(tiny_student(8, 0.0), bad)], train,
                         logits, eval_split, 3, TASK, teacher=tiny_teacher())
    assert isinstance(results[0], TrainResult)
    assert "intermediate-stage loss diverged" in str(results[1]) and "at epoch 1 step 1" in str(results[1])
