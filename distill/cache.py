"""Build-once cache entries under the artifacts directory: safetensors tensors plus ``meta.json``.

One process builds an entry under the entry's file lock while the others wait; it is written to a temporary
directory and renamed into place, so a reader never sees half an entry. Used by the teacher-logit cache and the
transfer set.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from distill.data import TokenizedSplit
from storage import ENTRY_META, ENTRY_TENSORS, ArtifactLayout

# Bumped whenever the tensors or meta change shape: 2 added segment ids, float targets and the task.
CACHE_FORMAT = 2

Entry = tuple[dict[str, torch.Tensor], dict[str, Any]]  # a cache entry: safetensors tensors and meta.json


def build_once(layout: ArtifactLayout, key: str, build: Callable[[], Entry]) -> Entry:
    """Cache entry ``key``, built first if missing: by one process of the cluster (``layout.build_lock``), the
    others waiting, then loading what it published."""
    directory = layout.fetch_entry(key)
    if directory is None:
        with layout.build_lock(key):
            directory = layout.fetch_entry(key)  # built by another process while this one waited
            if directory is None:
                tensors, meta = build()
                tmp = layout.scratch_dir(key)
                save_file(tensors, str(tmp / ENTRY_TENSORS))
                (tmp / ENTRY_META).write_text(json.dumps(meta, indent=2))
                directory = layout.publish_entry(key, tmp)
    return load_file(str(directory / ENTRY_TENSORS)), json.loads((directory / ENTRY_META).read_text())


def split_tensors(prefix: str, split: TokenizedSplit, logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tokenized split and its teacher logits as named tensors, stored compactly."""
    tensors = {f"{prefix}input_ids": split.input_ids.to(torch.int32),  # vocab ids fit; halves the file
               f"{prefix}lengths": split.lengths, f"{prefix}labels": split.labels,
               f"{prefix}teacher_logits": logits}
    if split.token_type_ids is not None:
        tensors[f"{prefix}token_type_ids"] = split.token_type_ids.to(torch.uint8)  # segment ids: 0 or 1
    return tensors


def split_from_tensors(prefix: str, tensors: dict[str, torch.Tensor], pad_id: int) -> TokenizedSplit:
    types = tensors.get(f"{prefix}token_type_ids")
    return TokenizedSplit(tensors[f"{prefix}input_ids"].long(), tensors[f"{prefix}lengths"],
                          tensors[f"{prefix}labels"], pad_id, None if types is None else types.long())
