"""What a student costs: its shape, parameters, forward FLOPs per sequence and CPU latency, measured the same way for
every trial and for the teacher (the reference point of the Pareto chart).

- Parameters: ``PreTrainedModel.num_parameters()``; without embeddings, ``exclude_embeddings=True`` (every
  ``nn.Embedding``: the word, position and token-type tables).
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of one sequence as long as the eval
  split's median tokenized length, with eager attention (the counter does not see the CPU's fused attention
  kernel). Every matrix product counts 2 FLOPs per multiply-add, the attention scores and the attention-weighted
  values included; element-wise work (softmax, LayerNorm, GELU, biases of the counted products aside) is not
  counted, the usual convention.
- Latency: batch 1, one CPU thread, tokenization excluded: the median over ``LATENCY_PASSES`` passes of the mean time
  per row over up to ``LATENCY_ROWS`` eval rows spread evenly over the split, each at its own length
  (``distill.deploy``'s timing), with the machine it was measured on.

Weights change none of these, so a profile is taken on the architecture built from its config with random weights:
before training, which is what lets a study skip a student that breaks a constraint.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from distill.data import TokenizedSplit
from distill.deploy import torch_latency_ms
from distill.hardware import load_1min, machine

LATENCY_ROWS = 64
LATENCY_PASSES = 5
LATENCY_THREADS = 1
SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size")


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op CPU threads, then restore the process's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_length(split: TokenizedSplit) -> int:
    """The split's median tokenized length (the lower median: a length some row has)."""
    return int(torch.median(split.lengths.cpu()))


def shape_of(config: Any) -> dict[str, int]:
    """A model config's four dimensions (the names transformers maps for every BERT-like family)."""
    return {key: int(getattr(config, key)) for key in SHAPE_KEYS if getattr(config, key, None) is not None}


def architecture(config: Any) -> Any:
    """A sequence classifier built from ``config`` with random weights, in eval mode, on the CPU."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_config(config).eval()


def _row(split: TokenizedSplit, index: int) -> dict[str, torch.Tensor]:
    return split.batch(torch.tensor([index]))


def count_flops(model: Any, split: TokenizedSplit, seq_len: int) -> int:
    """Forward FLOPs of one sequence of ``seq_len`` tokens (a row of the split of that length, else a longer one
    cut to it), attention computed eagerly so that every product is counted."""
    lengths = split.lengths.cpu()
    index = int(torch.nonzero(lengths >= seq_len)[0])
    inputs = {name: tensor[:, :seq_len] for name, tensor in _row(split, index).items()}
    chosen = model.config._attn_implementation  # restored after: latency is measured on the one that ships
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            model(**inputs)
    finally:
        model.set_attn_implementation(chosen)
    return int(counter.get_total_flops())


def latency_rows(split: TokenizedSplit, rows: int = LATENCY_ROWS) -> list[dict[str, torch.Tensor]]:
    """Up to ``rows`` eval rows spread evenly over the split, each one batch of one at its own length."""
    n = len(split)
    picked = torch.linspace(0, n - 1, steps=min(rows, n)).round().long().unique().tolist()
    return [_row(split, i) for i in picked]


def cpu_latency_ms(model: Any, rows: list[dict[str, torch.Tensor]], passes: int = LATENCY_PASSES,
                   threads: int = LATENCY_THREADS) -> float:
    """Milliseconds per sequence at batch 1 on ``threads`` CPU threads: the median over ``passes`` passes."""
    with cpu_threads(threads):
        return torch_latency_ms(model, rows, len(rows), passes)


def profile_model(model: Any, split: TokenizedSplit, *, rows: int = LATENCY_ROWS,
                  passes: int = LATENCY_PASSES) -> dict[str, Any]:
    """The profile every trial records (and the teacher's): shape, parameters, FLOPs and CPU latency.

    Every cost of the registry (``kdsearch.objectives.COSTS``) is measured here and recorded under its name: a new
    cost is its entry there and its measurement here.

    ``model`` is measured on the CPU (moved there); ``split`` is the eval split, on any device.
    """
    model = model.to("cpu").eval()
    split = split.to("cpu")
    seq_len = median_length(split)
    timed = latency_rows(split, rows)
    return {
        "shape": shape_of(model.config),
        "params": int(model.num_parameters()),
        "params_no_embeddings": int(model.num_parameters(exclude_embeddings=True)),
        "flops": count_flops(model, split, seq_len),
        "flops_seq_len": seq_len,
        "latency_ms": round(cpu_latency_ms(model, timed, passes), 4),
        "latency_rows": len(timed),
        "latency_passes": passes,
        "latency_threads": LATENCY_THREADS,
        "machine": machine(),
        "load_1min": load_1min(),
        "host": socket.gethostname(),
    }
