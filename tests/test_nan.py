"""NaN and infinity caught where they start (issue 26, item 3): a teacher whose outputs are not finite fails the
study at the cache build, naming the rows; a solo trial whose loss, gradient or weights go non-finite fails at that
step; ``export-best`` refuses a checkpoint with non-finite weights."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from distill import DataError, DistillationEngine
from distill.hub_model import ExportError
from distill.teacher import check_finite_outputs
from distill.train import TrainingDiverged, check_finite
from kdsearch.errors import Fault, fault_of
from kdsearch.testing import KDSEARCH, ROOT, tiny_spec
from search_space import StudySpec
from service.api import create_app
from service.export_best import export_best
from service.settings import Settings
from service.worker import Worker

PARAMS = {"learning_rate": 5e-3, "temperature": 2.0, "alpha": 0.5, "num_train_epochs": 2, "batch_size": 32}


def _poison(model_dir: Path, tensor: str, index: tuple[int, ...] = (0,)) -> None:
    """Set one value of ``tensor`` in a saved model's weights to NaN."""
    weights = load_file(str(model_dir / "model.safetensors"))
    weights[tensor][index] = math.nan
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})


def test_a_teacher_with_a_nan_bias_fails_the_study_naming_rows(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    teacher = tmp_path / "nan-teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    _poison(teacher, "classifier.bias")
    spec = StudySpec.model_validate(tiny_spec(tiny_assets, teacher=str(teacher)))
    with pytest.raises(DataError) as refused:
        DistillationEngine(tmp_path / "art", device="cpu").prepare(spec)
    assert fault_of(refused.value) is Fault.USER  # the study's fault: the worker fails the study with this
    assert str(refused.value) == ("the teacher's outputs are not finite (NaN or infinite) for 160 of 160 train rows "
                                  "(rows 0, 1, 2, 3, 4, ...): check the teacher's weights")
    assert not list((tmp_path / "art" / "cache").glob("*/meta.json")), "no entry published"


def test_non_finite_teacher_rows_are_named_and_counted() -> None:
    outputs = torch.zeros(10, 2)
    outputs[3, 1], outputs[7, 0] = math.nan, math.inf
    with pytest.raises(DataError, match=r"for 2 of 10 eval rows \(rows 3, 7\)"):
        check_finite_outputs(outputs, "eval")
    check_finite_outputs(torch.zeros(4, 2), "eval")  # finite: nothing to say


@pytest.mark.parametrize(("change", "message"), [
    ({"temperature": 0.0}, r"^loss diverged \(nan\) at epoch 1 step 1$"),  # softmax over logits / 0: NaN at once
    ({"learning_rate": math.inf}, r"^loss diverged \(nan\) at epoch 1 step 2$"),  # an infinite first update
])
def test_a_diverging_solo_trial_fails_at_its_step(tiny_assets, tmp_path: Path, change, message) -> None:  # type: ignore[no-untyped-def]
    spec = StudySpec.model_validate(tiny_spec(tiny_assets))
    engine = DistillationEngine(tmp_path / "art", device="cpu")
    epochs: list[int] = []
    with pytest.raises(TrainingDiverged, match=message):
        engine.run_trial(engine.prepare(spec), {**PARAMS, **change}, 7, lambda r: epochs.append(r.epoch) or None,
                         tmp_path / "checkpoint")
    assert epochs == [] and not (tmp_path / "checkpoint").exists(), "no epoch reported, no checkpoint written"


def test_weights_gone_non_finite_fail_the_epoch() -> None:
    model = torch.nn.Linear(2, 2)
    check_finite(model, 1, 0, 0.0, 5)  # type: ignore[arg-type]
    with torch.no_grad():
        model.weight[0, 0] = math.inf
    with pytest.raises(TrainingDiverged, match=r"^weights diverged \(nan\) at epoch 2 step 5$"):
        check_finite(model, 2, 0, 0.0, 5)  # type: ignore[arg-type]
    with pytest.raises(TrainingDiverged, match=r"^gradient diverged \(0.5\) at epoch 2 step 3$"):
        check_finite(model, 2, 3, 0.5, 5)  # type: ignore[arg-type]


def test_export_best_refuses_non_finite_weights(tiny_assets, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db'}", artifacts=tmp_path / "artifacts")
    with TestClient(create_app(settings)) as client:
        spec = tiny_spec(tiny_assets, name="poisoned", n_trials=1, search_space={**PARAMS, "num_train_epochs": 1})
        assert client.post("/api/studies", json=spec).status_code == 201
        Worker(settings, device="cpu", exit_when_idle=True).run()
        study = client.get("/api/studies/poisoned").json()
        assert study["status"] == "finished", study
    # The stored checkpoint (an Optuna artifact: a tar) gets one NaN weight, as a pre-fix NaN trial left.
    import optuna

    trial = optuna.load_study(study_name="poisoned", storage=settings.database_url).best_trial
    artifact = tmp_path / "artifacts" / "optuna" / trial.user_attrs["checkpoint_artifact_id"]
    unpacked = tmp_path / "unpacked"
    with tarfile.open(artifact) as tar:
        tar.extractall(unpacked, filter="data")
    _poison(unpacked, "classifier.weight", (1, 3))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for item in sorted(unpacked.iterdir()):
            tar.add(item, arcname=item.name)
    artifact.write_bytes(buffer.getvalue())

    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"^the checkpoint holds 1 non-finite \(NaN or infinite\) weights in 1 "
                                          r"tensor: classifier.weight \(1\); refusing to export it$"):
        export_best(settings, "poisoned", out, log=lambda _: None)
    env = {"KDSEARCH_DATABASE_URL": settings.database_url, "KDSEARCH_ARTIFACTS": str(tmp_path / "artifacts")}
    done = subprocess.run([*KDSEARCH, "export-best", "poisoned", "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env})
    assert done.returncode != 0 and "non-finite (NaN or infinite) weights" in done.stderr, done.stderr
    assert not out.exists(), "nothing written"
    assert json.loads((unpacked / "kdsearch_trial.json").read_text())["score"] == study["best_trial"]["value"]
