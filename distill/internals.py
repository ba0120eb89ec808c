"""The internals the layer-wise distillation terms read (``kdsearch.terms``): each layer's self-attention queries,
keys and values (captured by forward hooks on the attention's projections, so the model keeps its fused SDPA
attention), and the teacher's live forward pass on a batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from distill.precision import Precision, autocast
from kdsearch.terms import Needs, TeacherOutputs

# The names of a self-attention's query, key and value projections: BERT's family, then DistilBERT's.
_QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"))

QKV = tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...]


def attention_projections(model: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]]:
    """Each layer's (query, key, value) projections, in layer order; ValueError for a model it cannot find them in."""
    found: list[tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]] = []
    for module in model.modules():
        for names in _QKV_NAMES:
            parts = [getattr(module, n, None) for n in names]
            q, k, v = parts
            if isinstance(q, torch.nn.Linear) and isinstance(k, torch.nn.Linear) and isinstance(v, torch.nn.Linear):
                found.append((q, k, v))
                break
    layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not found or (layers is not None and len(found) != layers):
        raise ValueError(f"cannot find the self-attention query/key/value projections of {type(model).__name__} "
                         f"(found {len(found)} layers' of {layers}): the attention term reads them")
    return found


@contextlib.contextmanager
def capture_qkv(model: torch.nn.Module) -> Iterator[list[list[torch.Tensor]]]:
    """While open, every forward pass of ``model`` records each layer's [queries, keys, values] ([B, T, D] each)
    into the yielded list (one entry per layer, overwritten by the next forward pass)."""
    layers = attention_projections(model)
    captured: list[list[torch.Tensor]] = [[torch.empty(0)] * 3 for _ in layers]

    def keep(layer: int, which: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            captured[layer][which] = output
        return hook

    handles = [projection.register_forward_hook(keep(layer, which))
               for layer, projections in enumerate(layers) for which, projection in enumerate(projections)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def as_qkv(captured: list[list[torch.Tensor]]) -> QKV:
    return tuple((q, k, v) for q, k, v in captured)


@torch.no_grad()
def teacher_internals(teacher: Any, inputs: dict[str, torch.Tensor], logits: torch.Tensor, needs: Needs,
                      precision: Precision) -> TeacherOutputs:
    """The teacher's outputs on one batch: its cached ``logits``, and the internals ``needs`` asks for from a live
    forward pass in the trial's ``precision`` (all layers: each member aligns them to its own layer mapping)."""
    device = next(teacher.parameters()).device
    with autocast(device, precision), contextlib.ExitStack() as stack:
        captured = stack.enter_context(capture_qkv(teacher)) if needs.teacher_qkv else None
        if needs.teacher_hidden_states or needs.teacher_attentions:
            out = teacher(**inputs, output_hidden_states=needs.teacher_hidden_states,
                          output_attentions=needs.teacher_attentions)
            hidden, attentions = out.hidden_states, out.attentions
        else:  # the queries, keys and values alone: the encoder suffices, no pooler or head
            encoder = getattr(teacher, "base_model", teacher)
            encoder(**inputs)
            hidden, attentions = None, None
    return TeacherOutputs(logits, hidden, attentions, None if captured is None else as_qkv(captured))
