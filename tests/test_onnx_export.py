"""export-best --onnx [--quantize int8]: ONNX and int8 beside the Hugging Face export, verified against PyTorch,
re-scored on the eval split and timed; for a single-sentence classifier, a pair classifier and a regression model."""

from __future__ import annotations

import csv
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from scipy.stats import pearsonr
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kdsearch.testing import KDSEARCH, ROOT, tiny_spec
from service.api import create_app
from service.settings import Settings
from service.worker import Worker
from tests.conftest import NLI_LABELS, PRECISIONS, pair_spec

CASES = ("single", "pair", "regression")


def _spec(case: str, tiny_assets, pair_assets) -> dict:  # type: ignore[no-untyped-def]
    if case == "single":
        return tiny_spec(tiny_assets, name=case, n_trials=1, search_space={"num_train_epochs": 2, "batch_size": 32,
                                                                           "learning_rate": 5e-3})
    kind = "nli" if case == "pair" else "sts"
    return pair_spec(pair_assets, kind, name=case, n_trials=1,
                     search_space={"num_train_epochs": 2, "batch_size": 32, "learning_rate": 5e-3})


@pytest.fixture(scope="module", params=PRECISIONS)
def studies(request, tmp_path_factory, tiny_assets, pair_assets) -> dict:  # type: ignore[no-untyped-def]
    """One finished one-trial study per case, in one SQLite store, trained in each precision (forced)."""
    root = tmp_path_factory.mktemp(f"onnx-{request.param}")
    settings = Settings(database_url=f"sqlite:///{root / 'db'}", artifacts=root / "artifacts",
                        precision=request.param)
    with TestClient(create_app(settings)) as client:
        for case in CASES:
            assert client.post("/api/studies", json=_spec(case, tiny_assets, pair_assets)).status_code == 201
        Worker(settings, device="cpu", exit_when_idle=True).run()
        for case in CASES:
            assert client.get(f"/api/studies/{case}").json()["status"] == "finished"
    env = {**os.environ, "KDSEARCH_DATABASE_URL": settings.database_url, "KDSEARCH_ARTIFACTS": str(root / "artifacts")}
    return {"settings": settings, "env": env, "root": root, "precision": request.param}


def _eval_rows(data: Path) -> list[dict[str, str]]:
    with open(data / "validation.tsv", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.mark.parametrize("case", CASES)
def test_onnx_and_int8_export(case: str, studies, tiny_assets, pair_assets) -> None:  # type: ignore[no-untyped-def]
    out = studies["root"] / f"export-{case}"
    # --force: the tiny fixtures' students predict one class (degenerate), which export-best refuses without it.
    done = subprocess.run([*KDSEARCH, "export-best", case, "--out", str(out), "--onnx", "--quantize", "int8",
                           "--force"], env=studies["env"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for name in ("model.safetensors", "onnx/model.onnx", "onnx/model.int8.onnx", "onnx/config.json",
                 "onnx/tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert "ONNX fp32" in done.stdout and "ONNX int8" in done.stdout and "teacher (PyTorch)" in done.stdout

    # Independently of kdsearch's data path: tokenize the eval file, run onnxruntime and PyTorch, compare.
    data = tiny_assets["data"] if case == "single" else pair_assets["nli_data" if case == "pair" else "sts_data"]
    rows = _eval_rows(data)
    first = [r["sentence"] if case == "single" else r["sentence1"] for r in rows]
    second = None if case == "single" else [r["sentence2"] for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(out)
    encoded = tokenizer(first, second, padding=True, truncation=True, max_length=16, return_tensors="np")
    sess = ort.InferenceSession(str(out / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert ("token_type_ids" in names) and {"input_ids", "attention_mask"} <= set(names)
    feeds = {n: encoded[n].astype(np.int64) for n in names}
    onnx_logits = sess.run(["logits"], feeds)[0]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.inference_mode():
        torch_logits = model(**{n: torch.from_numpy(v) for n, v in feeds.items()}).logits.numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-4, rtol=1e-4)
    int8 = ort.InferenceSession(str(out / "onnx" / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    int8_logits = int8.run(["logits"], feeds)[0]
    assert int8_logits.shape == onnx_logits.shape and not np.array_equal(int8_logits, onnx_logits)

    # The score recorded for each variant equals a re-score computed here.
    if case == "regression":
        gold = np.array([float(r["label"]) for r in rows])
        # A constant output has no correlation: 0, as distill.task_metrics scores it (an int8 head can round a
        # near-constant student's outputs to one value; scipy then gives NaN).
        fp32_score, int8_score = (float(np.nan_to_num(pearsonr(x[:, 0], gold).statistic))
                                  for x in (onnx_logits, int8_logits))
        metric = "pearson"
    else:
        names_ = ["negative", "positive"] if case == "single" else NLI_LABELS
        gold = np.array([int(r["label"]) if case == "single" else names_.index(r["label"]) for r in rows])
        fp32_score, int8_score = (float((x.argmax(-1) == gold).mean()) for x in (onnx_logits, int8_logits))
        metric = "accuracy"
    with TestClient(create_app(studies["settings"])) as client:
        detail = client.get(f"/api/studies/{case}").json()
    (export,) = [e for e in detail["exports"] if e["out_dir"] == str(out.resolve())]
    deployment = export["deployment"]
    assert export["trial_number"] == detail["best_trial"]["number"] and deployment["metric"] == metric
    variants = deployment["variants"]
    assert set(variants) == {"pytorch_fp32", "onnx_fp32", "onnx_int8"}
    assert variants["onnx_fp32"]["metrics"][metric] == pytest.approx(fp32_score, abs=1e-6)
    assert variants["onnx_int8"]["metrics"][metric] == pytest.approx(int8_score, abs=1e-6)
    # The trial's metric is the exported fp32 model's, whatever precision it trained in.
    assert detail["best_trial"]["precision"] == studies["precision"]
    assert variants["pytorch_fp32"]["metrics"][metric] == pytest.approx(detail["best_trial"]["value"], abs=1e-6)
    assert all(v["ms_batch1"] > 0 and v["ms_batch32"] > 0 for v in variants.values())
    assert deployment["teacher"]["ms_batch1"] > 0 and deployment["threads"] >= 1
    assert deployment["max_abs_logit_diff"] <= 1e-4
    flagged = 100 * (variants["onnx_fp32"]["metrics"][metric] - variants["onnx_int8"]["metrics"][metric]) > 1
    assert deployment["int8_flagged"] == flagged

    card = (out / "README.md").read_text()
    assert "## Deployment" in card and "`onnx/model.int8.onnx`" in card
    row = next(line for line in card.splitlines() if line.startswith("| ONNX fp32 |"))
    assert f"| {fp32_score:.4f} |" in row
    assert ("Warning: the int8 model scores" in card) == flagged
    assert re.search(r"\| teacher, PyTorch fp32 \| \| \| [0-9.]+ \|", card)


def test_refusals_are_one_line(studies) -> None:  # type: ignore[no-untyped-def]
    for args, message in ((["--onnx", "--quantize", "int4"], "--quantize: 'int4' is not supported (choose int8)"),
                          (["--quantize", "int8"], "--quantize int8 quantizes the ONNX model: add --onnx")):
        done = subprocess.run([*KDSEARCH, "export-best", "single", "--out", str(studies["root"] / "x"), *args],
                              env=studies["env"], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2 and done.stderr.strip() == f"kdsearch: error: {message}", done.stderr
        assert not (studies["root"] / "x").exists()


def test_exporter_failure_names_the_step_and_keeps_the_hf_export(studies, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from distill.deploy import DeployError
    from service.export_best import export_best

    def refuse(*_args, **_kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("unsupported operator aten::mystery\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", refuse)
    out = studies["root"] / "export-broken"
    with pytest.raises(DeployError) as failed:
        export_best(studies["settings"], "single", out, onnx=True, quantize="int8", force=True,  # degenerate
                    log=lambda _: None)
    assert str(failed.value) == ("ONNX export (torch.onnx.export) failed: RuntimeError: unsupported operator "
                                 "aten::mystery")
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert not (out / "onnx").exists()
