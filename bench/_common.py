"""What the resumable grid benches share: the machine's name, results merged into one JSON under a file lock (one
bench process per core may share it), CPU inference latency per row, and mean ± std formatting."""

from __future__ import annotations

import fcntl
import json
import os
import statistics
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any


def machine_name(device: str) -> str:
    """The device a figure was measured on: the GPU's name, or the CPU's model, cores and whether it computes bf16
    natively (``distill.hardware.machine``), which decides what ``auto`` trains in."""
    import torch

    from distill.hardware import machine

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return machine()


def merge_results(path: Path, runs: list[dict[str, Any]], extra: dict[str, Any],
                  key: Callable[[dict[str, Any]], Hashable]) -> None:
    """Merge ``runs`` (a later run replaces an earlier one of the same ``key``) and ``extra`` fields into the JSON at
    ``path``, under a file lock; written to a temporary file and renamed, so a crash never loses recorded runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = json.loads(path.read_text()) if path.is_file() else {}
        merged = {key(r): r for r in old.get("runs", [])}
        merged.update({key(r): r for r in runs})
        payload = {**old, **extra, "runs": list(merged.values())}
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(path)


def per_row_ms(model: Any, tokenizer: Any, texts: list[str], pairs: list[str] | None, batch: int, n: int,
               max_length: int = 128, passes: int = 3) -> float:
    """Median over ``passes`` of the CPU inference time per row (ms) over the first ``n`` rows at ``batch`` rows per
    call, padded per batch, tokenization excluded: ``distill.deploy``'s timing (``export-best --onnx``)."""
    from distill.deploy import latency_batches, model_input_names, torch_latency_ms

    batches = latency_batches(tokenizer, model_input_names(model, tokenizer), texts, pairs, batch, n, max_length)
    return torch_latency_ms(model, batches, sum(len(b["input_ids"]) for b in batches), passes)


def mean_std(values: list[float], bold: bool = False) -> str:
    """``mean ± sample std`` (the std left out for a single value), 4 decimals."""
    mean = statistics.fmean(values)
    text = f"**{mean:.4f}**" if bold else f"{mean:.4f}"
    return text + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")
