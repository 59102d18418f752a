"""Transformer encoders as the workbench sees them: the wrappers that turn a Hugging Face encoder into
one tensor out (pooled embedding or logits), and introspection of BERT-like layers (which layers,
how many heads, which config) that pruning, distillation and ONNX fusion all need."""
from __future__ import annotations

from typing import Optional

from torch import nn


class EmbeddingModel(nn.Module):
    """A transformer encoder with pooling: (input_ids, attention_mask) -> sentence embedding."""

    def __init__(self, encoder: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class SequenceClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits, for AutoModelForSequenceClassification models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def bert_layers(module) -> list:
    """The layers of a BERT-like encoder (attention + intermediate.dense + output.dense), in order."""
    return [m for m in module.modules() if hasattr(m, "attention") and isinstance(
        getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear) and isinstance(
        getattr(getattr(m, "output", None), "dense", None), nn.Linear)]


def transformer_config(module):
    """The Hugging Face config inside a wrapped module (the one that knows heads and hidden size)."""
    for m in module.modules() if module is not None else []:
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "num_attention_heads"):
            return cfg
    return None


def attention_shape(module) -> Optional[tuple[int, int]]:
    """(heads, attention width) of an encoder's layers as they are now. Pruned heads leave the config's
    num_attention_heads and hidden_size unchanged, so read the attention modules; when layers differ,
    (0, 0) lets ORT's fusion detect each layer's from its graph. None: not a BERT-like encoder."""
    layers = bert_layers(module) if module is not None else []
    shapes = {(getattr(layer.attention.self, "num_attention_heads", 0),
               getattr(layer.attention.self, "all_head_size", 0)) for layer in layers}
    if not layers:
        return None
    return shapes.pop() if len(shapes) == 1 else (0, 0)
