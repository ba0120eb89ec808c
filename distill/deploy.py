"""A student ready to serve: ONNX export (dynamic batch and sequence axes), int8 dynamic quantization, verification
against the PyTorch model, re-scoring on the eval split, and CPU latency.

    onnx_path = export_onnx(model, tokenizer, out_dir / "onnx", example)      # torch.onnx.export (dynamo)
    int8_path = quantize_int8(onnx_path, out_dir / "onnx" / "model.int8.onnx")  # onnxruntime.quantization
    outputs = onnx_outputs(session(onnx_path), split, batch_size=64)          # [N, num_labels] for the eval split

Uses the maintained exporters: ``torch.onnx.export`` (the ``torch.export``-based exporter) and
``onnxruntime.quantization.quantize_dynamic``; nothing here writes a graph by hand.
"""

from __future__ import annotations

import inspect
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distill.data import TokenizedSplit, length_bucketed_batches
from distill.hardware import load_1min, machine
from kdsearch.errors import Fault, KdsearchError

# ONNX fp32 logits must match PyTorch's within this (numpy.allclose: |a - b| <= ATOL + RTOL * |b|).
ATOL, RTOL = 1e-4, 1e-4
INT8_FLAG_POINTS = 1.0  # an int8 model further than this below the fp32 one (metric x 100) is flagged
# The files that make onnx/ a loadable model directory on its own (ORTModelForSequenceClassification, tokenizers).
_SIDECAR_SUFFIXES = (".json", ".txt", ".model")


class DeployError(KdsearchError, RuntimeError):
    """An export step failed; the message names the step.

    ``Fault.TRIAL``: the checkpoint trained, and the exporter, the quantizer or the verification failed on it: a
    bug (kdsearch's or the library's), whose traceback belongs in the log. (A full disk under the step is still
    the infrastructure's: ``fault_of`` follows the error it was raised from.)"""

    fault = Fault.TRIAL


def model_input_names(model: Any, tokenizer: Any) -> list[str]:
    """The inputs the exported graph takes: the tokenizer's, where the model's forward accepts them."""
    accepted = set(inspect.signature(model.forward).parameters)
    names = [n for n in tokenizer.model_input_names if n in accepted]
    return names or ["input_ids", "attention_mask"]


def example_inputs(tokenizer: Any, names: list[str], texts: Sequence[str],
                   pairs: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """Two rows of different lengths, padded: the export sees a real mask (zeros included), never the all-ones
    shortcut a traced graph could freeze in."""
    first = [texts[0], texts[0] + " " + texts[-1]]
    second = None if pairs is None else [pairs[0], pairs[-1]]
    encoded = tokenizer(first, second, padding=True, truncation=True, max_length=64, return_tensors="pt")
    return {name: encoded[name] for name in names}


def export_onnx(model: Any, tokenizer: Any, directory: Path, texts: Sequence[str],
                pairs: Sequence[str] | None = None) -> Path:
    """``directory/model.onnx`` with dynamic batch and sequence axes, plus the model's config and tokenizer files
    beside it so the directory loads on its own."""
    directory.mkdir(parents=True, exist_ok=True)
    model = model.eval().to("cpu")
    names = model_input_names(model, tokenizer)
    example = example_inputs(tokenizer, names, texts, pairs)
    batch = torch.export.Dim("batch", min=1, max=4096)
    sequence = torch.export.Dim("sequence", min=1, max=int(model.config.max_position_embeddings))
    path = directory / "model.onnx"
    try:
        program = torch.onnx.export(model, (), kwargs=example, input_names=names, output_names=["logits"],
                                    dynamic_shapes={n: {0: batch, 1: sequence} for n in names}, dynamo=True,
                                    external_data=False)
        if program is None:  # pragma: no cover - the dynamo exporter always returns a program
            raise DeployError("torch.onnx.export returned no program")
        program.save(str(path))
    except DeployError:
        raise
    except Exception as exc:
        raise DeployError(f"ONNX export (torch.onnx.export) failed: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}") from exc
    return path


def add_sidecar_files(source_dir: Path, directory: Path) -> None:
    """Copy config and tokenizer files next to the ONNX model (``onnx/`` then loads on its own)."""
    for item in source_dir.iterdir():
        if item.is_file() and item.suffix in _SIDECAR_SUFFIXES and item.name != "README.md":
            shutil.copy2(item, directory / item.name)


def quantize_int8(source: Path, target: Path) -> Path:
    """Dynamic int8 quantization of the linear layers (MatMul and Gemm weights), activations quantized per call."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    except Exception as exc:
        raise DeployError(f"int8 quantization (onnxruntime.quantization.quantize_dynamic) failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    return target


def session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads (default: torch's thread count)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise DeployError(f"onnxruntime cannot load {path.name}: {type(exc).__name__}: {exc}") from exc


def _numpy_inputs(split: TokenizedSplit, idx: torch.Tensor, names: Sequence[str]) -> dict[str, np.ndarray]:
    batch = split.batch(idx)
    if "token_type_ids" in names and "token_type_ids" not in batch:
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return {name: batch[name].cpu().numpy().astype(np.int64) for name in names}


def onnx_outputs(sess: Any, split: TokenizedSplit, batch_size: int = 64) -> np.ndarray:
    """The ONNX model's outputs for every row of ``split``, in row order (batches of similar length)."""
    names = [i.name for i in sess.get_inputs()]
    out: np.ndarray | None = None
    for idx in length_bucketed_batches(split.lengths, batch_size):
        logits = sess.run(["logits"], _numpy_inputs(split, idx, names))[0]
        if out is None:
            out = np.empty((len(split), logits.shape[-1]), dtype=np.float32)
        out[idx.numpy()] = logits
    assert out is not None
    return out


def max_logit_gap(onnx: np.ndarray, torch_outputs: np.ndarray) -> tuple[float, bool]:
    """(largest |ONNX - PyTorch| over every logit, whether all are within ATOL + RTOL * |PyTorch|)."""
    return float(np.abs(onnx - torch_outputs).max()), bool(np.allclose(onnx, torch_outputs, atol=ATOL, rtol=RTOL))


def per_sequence_ms(run: Callable[[Any], Any], batches: Sequence[Any], n_rows: int, passes: int = 5) -> float:
    """Median over ``passes`` of the time per row (ms) to run every pre-encoded batch once; one warm-up call."""
    run(batches[0])
    timings = []
    for _ in range(passes):
        started = time.perf_counter()
        for batch in batches:
            run(batch)
        timings.append((time.perf_counter() - started) / n_rows * 1000)
    return statistics.median(timings)


def latency_batches(tokenizer: Any, names: Sequence[str], texts: Sequence[str], pairs: Sequence[str] | None,
                    batch: int, n: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    """The first ``n`` eval rows, tokenized (outside the timing) into batches of ``batch`` padded per batch."""
    out = []
    for start in range(0, min(n, len(texts)), batch):
        encoded = tokenizer(list(texts[start : start + batch]),
                            None if pairs is None else list(pairs[start : start + batch]),
                            padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        out.append({name: encoded[name] for name in names if name in encoded})
    return out


def torch_latency_ms(model: Any, batches: list[dict[str, torch.Tensor]], n_rows: int, passes: int = 5) -> float:
    model.eval()
    with torch.inference_mode():
        return per_sequence_ms(lambda b: model(**b), batches, n_rows, passes)


def onnx_latency_ms(sess: Any, batches: list[dict[str, torch.Tensor]], n_rows: int) -> float:
    names = [i.name for i in sess.get_inputs()]

    def feeds(b: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return {n: (b[n] if n in b else torch.zeros_like(b["input_ids"])).numpy().astype(np.int64) for n in names}

    prepared = [feeds(b) for b in batches]  # conversion outside the timing, as tokenization
    return per_sequence_ms(lambda f: sess.run(["logits"], f), prepared, n_rows)


def deploy(export_dir: Path, *, eval_split: TokenizedSplit, texts: Sequence[str], pairs: Sequence[str] | None,
           task: Any, quantize: str | None, teacher: Any | None, max_length: int,
           latency_rows: tuple[int, int] = (200, 512), log: Callable[[str], None] = print) -> dict[str, Any]:
    """Export the Hugging Face model in ``export_dir`` to ``export_dir/onnx`` (and int8), verify it against
    PyTorch on the eval split, re-score every variant with the task's metrics and time each on the CPU.

    Returns the deployment record (what the card's table and the API show). Raises ``DeployError`` naming the
    step; the Hugging Face files are never touched, and a failed ONNX directory is removed.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distill.task_metrics import compute_metrics
    from distill.train import predict

    model = AutoModelForSequenceClassification.from_pretrained(export_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    onnx_dir = export_dir / "onnx"
    shutil.rmtree(onnx_dir, ignore_errors=True)
    try:
        log("exporting to ONNX (torch.onnx.export)...")
        fp32_path = export_onnx(model, tokenizer, onnx_dir, texts, pairs)
        add_sidecar_files(export_dir, onnx_dir)
        paths = {"onnx_fp32": fp32_path}
        if quantize == "int8":
            log("quantizing to int8 (onnxruntime dynamic quantization)...")
            paths["onnx_int8"] = quantize_int8(fp32_path, onnx_dir / "model.int8.onnx")
        threads = torch.get_num_threads()
        sessions = {name: session(path, threads) for name, path in paths.items()}
        labels = eval_split.labels.cpu().numpy()
        outputs = {"pytorch_fp32": predict(model, eval_split.to("cpu"), 64).numpy()}
        outputs |= {name: onnx_outputs(sess, eval_split) for name, sess in sessions.items()}
        gap, within = max_logit_gap(outputs["onnx_fp32"], outputs["pytorch_fp32"])
        if not within:
            raise DeployError(f"verification failed: ONNX fp32 logits differ from PyTorch's by up to {gap:.3g} on "
                              f"the eval split (tolerance atol {ATOL:g} + rtol {RTOL:g})")
    except BaseException:
        shutil.rmtree(onnx_dir, ignore_errors=True)
        raise
    names = model_input_names(model, tokenizer)
    n1, n32 = latency_rows
    small = latency_batches(tokenizer, names, texts, pairs, 1, n1, max_length)
    large = latency_batches(tokenizer, names, texts, pairs, 32, n32, max_length)
    rows1, rows32 = len(small), sum(len(b["input_ids"]) for b in large)
    log(f"timing on the CPU with {threads} thread(s): {rows1} rows at batch 1, {rows32} at batch 32...")
    variants: dict[str, dict[str, Any]] = {
        "pytorch_fp32": {"file": "model.safetensors", "metrics": compute_metrics(task, outputs["pytorch_fp32"], labels),
                         "ms_batch1": torch_latency_ms(model, small, rows1),
                         "ms_batch32": torch_latency_ms(model, large, rows32)},
    }
    for name, sess in sessions.items():
        variants[name] = {"file": f"onnx/{paths[name].name}", "metrics": compute_metrics(task, outputs[name], labels),
                          "ms_batch1": onnx_latency_ms(sess, small, rows1), "ms_batch32": onnx_latency_ms(sess, large,
                                                                                                           rows32)}
    teacher_ms = None
    if teacher is not None:
        teacher_ms = {"ms_batch1": torch_latency_ms(teacher, small, rows1),
                      "ms_batch32": torch_latency_ms(teacher, large, rows32)}
    record: dict[str, Any] = {
        "metric": task.metric, "eval_rows": len(eval_split), "threads": threads, "machine": machine(),
        "load_1min": load_1min(),
        "latency_rows": {"batch1": rows1, "batch32": rows32},
        "tolerance": {"atol": ATOL, "rtol": RTOL}, "max_abs_logit_diff": gap,
        "variants": variants, "teacher": teacher_ms,
    }
    if "onnx_int8" in variants:
        drop = 100 * (variants["onnx_fp32"]["metrics"][task.metric] - variants["onnx_int8"]["metrics"][task.metric])
        record["int8_drop_points"] = drop
        record["int8_flagged"] = drop > INT8_FLAG_POINTS
    return record
