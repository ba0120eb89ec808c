"""A siamese (bi-encoder) BERT pair classifier: each sentence encoded on its own, the pair scored from the two
mean-pooled encodings ``u`` and ``v`` through an affine head: of their cosine alone (``pair_features: "cosine"``,
a score along one axis of similarity), or of the interaction features ``(cos, u, v, |u - v|, u * v)``
(``"interaction"``, InferSent's, for classes that are not degrees of similarity, such as entailment).

It takes the tokenizer's pair encoding, the same inputs as a cross-encoder (``BertForSequenceClassification``):
``token_type_ids`` mark the two segments, and a block attention mask keeps each segment's tokens from attending to
the other's, with positions restarting at the second segment and one token type for both. So the pair is scored in
one forward pass, and each side's encoding is exactly the encoding of that sentence alone (the second without a
leading [CLS]). A narrow student keeps, from its first step, the sentence geometry of the embeddings it starts from
(the cosine of teacher-PCA mean embeddings already orders STS-B pairs at Pearson 0.65), which a small cross-encoder
trained on a few thousand pairs loses.

This file is self-contained (torch and transformers only): ``save_pretrained`` copies it beside an exported model,
whose ``config.json`` maps the Auto classes to it, so the model loads anywhere with ``trust_remote_code=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

MODEL_TYPE = "kdsearch-siamese-bert"


PAIR_FEATURES = ("cosine", "interaction")


class SiameseBertConfig(BertConfig):
    """A BERT encoder's config; the model scores a pair from its two segments' mean encodings, by their cosine
    (``pair_features="cosine"``) or their interaction features (``"interaction"``)."""

    model_type = MODEL_TYPE

    def __init__(self, pair_features: str = "cosine", **kwargs: Any) -> None:
        if pair_features not in PAIR_FEATURES:
            raise ValueError(f"pair_features must be one of {PAIR_FEATURES}, not {pair_features!r}")
        self.pair_features = pair_features
        super().__init__(**kwargs)

    @property
    def pair_feature_size(self) -> int:
        """The width of the head's input: 1 (the cosine), or 1 + 4 * hidden_size (cos, u, v, |u - v|, u * v)."""
        return 1 if self.pair_features == "cosine" else 1 + 4 * self.hidden_size


def segment_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a right-padded pair encoding: the [B, L] segment of each token (0 or 1; padding -1), its position within
    its own segment, and the [B, L] masks of the first and the second segment's tokens."""
    real = attention_mask.bool()
    second = real & token_type_ids.bool()
    first = real & ~second
    segment = torch.where(second, 1, torch.where(first, 0, -1))
    first_len = first.sum(1, keepdim=True)
    index = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    positions = torch.where(second, index - first_len, index)
    return segment, positions, first, second


class SiameseBertForSequenceClassification(BertPreTrainedModel):
    """The two segments' mean-pooled encodings, their pair features (the cosine, or the interaction features), then
    ``pair_head`` (a ``Linear(pair_feature_size, num_labels)``): a regression score, or class logits. A single
    segment (no second sentence) has cosine 0 and a zero ``v``."""

    config_class = SiameseBertConfig

    def __init__(self, config: SiameseBertConfig) -> None:
        super().__init__(config)
        self.num_labels = int(config.num_labels or 1)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.pair_head = nn.Linear(config.pair_feature_size, self.num_labels)
        self.post_init()

    def pair_cosine(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The [B] cosine of the two segments' mean encodings, and the encoder's output."""
        u, v, out = self.pair_encodings(input_ids, attention_mask, token_type_ids, **kwargs)
        return nn.functional.cosine_similarity(u, v, dim=-1, eps=1e-6), out

    def pair_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
        """The [B, pair_feature_size] input of ``pair_head`` (float32), and the encoder's output."""
        u, v, out = self.pair_encodings(input_ids, attention_mask, token_type_ids, **kwargs)
        cosine = nn.functional.cosine_similarity(u, v, dim=-1, eps=1e-6).unsqueeze(-1)
        if self.config.pair_features == "cosine":
            return cosine, out
        return torch.cat([cosine, u, v, (u - v).abs(), u * v], dim=-1), out

    def pair_encodings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       token_type_ids: torch.Tensor | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The [B, H] mean encodings of the first and the second segment (float32), and the encoder's output."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        segment, positions, first, second = segment_inputs(input_ids, attention_mask, token_type_ids)
        # A token attends to its own segment only: [B, 1, L, L], boolean for SDPA, additive for eager attention.
        block = (segment.unsqueeze(2) == segment.unsqueeze(1)) & (segment.unsqueeze(1) >= 0)
        block = block | torch.eye(input_ids.shape[1], dtype=torch.bool, device=input_ids.device)  # padding rows
        mask: torch.Tensor = block.unsqueeze(1)
        if self.config._attn_implementation == "eager":
            dtype = self.bert.embeddings.word_embeddings.weight.dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        out = self.bert(input_ids=input_ids, attention_mask=mask, token_type_ids=torch.zeros_like(input_ids),
                        position_ids=positions, **kwargs)
        hidden = out.last_hidden_state

        def mean(which: torch.Tensor) -> torch.Tensor:
            weights = which.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)

        return mean(first).float(), mean(second).float(), out

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, output_attentions: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> SequenceClassifierOutput:
        features, out = self.pair_features(input_ids, attention_mask, token_type_ids,
                                           output_hidden_states=output_hidden_states,
                                           output_attentions=output_attentions)
        logits = self.pair_head(features.to(self.pair_head.weight.dtype))
        loss = None
        if labels is not None:
            if self.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
            else:
                loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


SiameseBertConfig.register_for_auto_class()
SiameseBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
