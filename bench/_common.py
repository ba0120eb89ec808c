"""What the resumable grid benches share: the machine's name, results merged into one JSON under a file lock (one
bench process per core may share it), CPU inference latency per row, and mean ± std formatting."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any


def machine_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


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
    call, padded per batch; tokenization excluded, one warm-up call."""
    import torch

    chunks = range(0, n, batch)
    encoded = [tokenizer(texts[i : i + batch], None if pairs is None else pairs[i : i + batch], padding=True,
                         truncation=True, max_length=max_length, return_tensors="pt") for i in chunks]
    timings = []
    with torch.inference_mode():
        model.eval()
        model(**encoded[0])  # warm-up
        for _ in range(passes):
            started = time.perf_counter()
            for enc in encoded:
                model(**enc)
            timings.append((time.perf_counter() - started) / n * 1000)
    return statistics.median(timings)


def mean_std(values: list[float], bold: bool = False) -> str:
    """``mean ± sample std`` (the std left out for a single value), 4 decimals."""
    mean = statistics.fmean(values)
    text = f"**{mean:.4f}**" if bold else f"{mean:.4f}"
    return text + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")
