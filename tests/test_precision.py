"""Training precision: what ``auto`` resolves to, that bf16 autocast reaches the student's forward pass (and only
it: the loss and the stored weights stay fp32), and that a trial records the precision it ran in."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill import DistillationEngine, build_student, train_student
from distill import precision as precision_module
from distill.engine import TRIAL_RECORD
from distill.precision import native_bf16, resolve_precision
from distill.train import TrainConfig
from kdsearch.testing import tiny_spec
from search_space import StudySpec


@pytest.mark.parametrize("native", [True, False])
def test_auto_is_bf16_only_where_the_cpu_computes_it(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for by name: run, even if emulated


def test_auto_on_this_machine_matches_its_cpu_flags() -> None:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    native = any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))
    assert precision_module.cpu_has_native_bf16() == native
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if native else "fp32")
    if not torch.cuda.is_available():
        assert not native_bf16(torch.device("cuda"))


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_autocast_reaches_the_forward_pass_and_the_loss_stays_fp32(tiny_assets, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                   precision: str) -> None:
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    prepared = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    student = build_student(spec.student, prepared.teacher_config, seed=0)
    forward_dtypes: set[torch.dtype] = set()
    # The first attention projection's output: a matmul autocast runs in bf16; training forwards only (every
    # evaluation runs in fp32: test_evaluation_is_fp32_inside_a_bf16_autocast).
    student.base_model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda module, _a, out: forward_dtypes.add(out.dtype) if module.training else None)
    result = train_student(student, prepared.train, prepared.train_logits, prepared.eval,
                           TrainConfig.from_params({"learning_rate": 1e-3, "alpha": 0.5, "num_train_epochs": 1,
                                                    "batch_size": 32}, regression=False, seed=33,
                                                   precision=precision),  # type: ignore[arg-type]
                           task=prepared.task)
    assert forward_dtypes == {torch.bfloat16 if precision == "bf16" else torch.float32}
    assert all(p.dtype == torch.float32 for p in student.parameters()), "master weights stay fp32"
    assert math.isfinite(result.history[0].train_loss) and math.isfinite(result.history[0].eval_loss)


def test_a_trial_records_its_precision(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "art", device="cpu", precision="bf16", log=lambda _m: None)
    prepared = engine.prepare(spec)
    outcome = engine.run_trial(prepared, {"learning_rate": 3e-3, "alpha": 0.5, "temperature": 2.0,
                                          "num_train_epochs": 1, "batch_size": 32}, 7, None, tmp_path / "ckpt")
    assert outcome.precision == "bf16"
    assert json.loads((tmp_path / "ckpt" / TRIAL_RECORD).read_text())["precision"] == "bf16"
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}, "the checkpoint is an ordinary fp32 model"


def test_evaluation_is_fp32_inside_a_bf16_autocast(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """predict/evaluate run the model in fp32 even when called inside bf16 autocast (as a training loop is): a
    trial records what its exported fp32 model scores, never a bf16-quantised figure."""
    from distill.train import evaluate, predict

    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    prepared = DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    student = build_student(spec.student, prepared.teacher_config, seed=0)
    forward_dtypes: set[torch.dtype] = set()
    student.base_model.encoder.layer[0].attention.self.query.register_forward_hook(
        lambda _m, _a, out: forward_dtypes.add(out.dtype))
    plain = predict(student, prepared.eval, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = predict(student, prepared.eval, 16)
        inside_evaluation = evaluate(student, prepared.eval, 16, prepared.task)
    assert forward_dtypes == {torch.float32}
    assert torch.equal(plain, inside)
    assert inside_evaluation == evaluate(student, prepared.eval, 16, prepared.task)
