"""Transformer encoders as the workbench sees them: the wrappers that turn a Hugging Face encoder into
one tensor out (pooled embedding or logits), and introspection of encoder layers by structure (which
layers, projections and heads, which config) that pruning, distillation and ONNX fusion all need."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


class EmbeddingModel(nn.Module):
    """A transformer encoder with pooling: (input_ids, attention_mask) -> sentence embedding.

    `packed` (set by the pack-sequences step): the attention mask may number several requests' tokens in
    one row, 1, 2, ... (0: padding), as a server packs them; each token attends only to its own request's,
    positions restart at each request, and the output is one embedding per request, row by row: (batch x
    requests per row, dim). A mask of ones and zeros is one request per row, so the model answers exactly
    as unpacked for ordinary inputs."""

    packed = False  # a class default: modules pickled before the attribute existed load unpacked

    def __init__(self, encoder: nn.Module, pooling: str = "mean"):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, input_ids, attention_mask):
        if self.packed:
            return self._packed(input_ids, attention_mask)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    def _packed(self, input_ids, segments):
        import torch

        ids = torch.arange(1, segments.max() + 1, device=segments.device)
        member = (segments.unsqueeze(-1) == ids).to(torch.float32)  # (batch, tokens, requests)
        within = ((member.cumsum(1) - 1) * member).sum(-1)  # each token's position in its own request
        same = (segments.unsqueeze(2) == segments.unsqueeze(1)) & (segments.unsqueeze(1) > 0)
        hidden = self.encoder(input_ids=input_ids, attention_mask=same.to(segments.dtype),
                              position_ids=within.to(torch.int64) + position_offset(self.encoder)).last_hidden_state
        # A broadcast product and a sum, not a matmul: a quantizer would put int8 on a matmul's inputs.
        weight = member * (within == 0).unsqueeze(-1) if self.pooling == "cls" else member
        weight = weight.to(hidden.dtype)
        pooled = (weight.unsqueeze(-1) * hidden.unsqueeze(2)).sum(1) / weight.sum(1).unsqueeze(-1).clamp(min=1e-9)
        return pooled.reshape(-1, hidden.shape[-1])


def position_offset(encoder: nn.Module) -> int:
    """Where an encoder's positions start: RoBERTa's family counts from its padding index + 1, BERT's from 0."""
    idx = getattr(getattr(encoder, "embeddings", None), "padding_idx", None)
    return int(idx) + 1 if isinstance(idx, int) else 0


class SequenceClassifier(nn.Module):
    """(input_ids, attention_mask) -> logits, for AutoModelForSequenceClassification models."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass
class EncoderLayer:
    """One layer of a transformer encoder, found by its structure: the attention's query, key, value
    and output projections and its head count, the FFN's up and down projections, and where each
    residual sum (projection output + residual) can be read. Pruning, refitting, distillation and
    ONNX fusion all work on this, not on one family's module names."""
    block: nn.Module  # the layer itself (its forward maps hidden states to hidden states)
    family: str
    heads_owner: nn.Module  # holds the head count, which Hugging Face's prune_heads updates
    heads_attr: str
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    up: nn.Linear
    down: nn.Linear
    # (module, "input" | "output"): where o(x) + residual and down(x) + residual are visible
    attn_sum: tuple
    ffn_sum: tuple
    ffn_config_attr: str  # the config field that holds the FFN width

    @property
    def heads(self) -> int:
        return int(getattr(self.heads_owner, self.heads_attr))


def _bert(m) -> Optional[EncoderLayer]:
    """BERT, RoBERTa / XLM-R / CamemBERT, ELECTRA, MiniLM and others of BERT's layout (post-LN)."""
    att, ffn_in, ffn_out = getattr(m, "attention", None), getattr(m, "intermediate", None), getattr(m, "output", None)
    sa = getattr(att, "self", None)
    if not all(_linear(x, n) for x, n in ((sa, "query"), (sa, "key"), (sa, "value"), (getattr(att, "output", None),
               "dense"), (ffn_in, "dense"), (ffn_out, "dense"))) or not hasattr(sa, "num_attention_heads"):
        return None
    if not (isinstance(getattr(att.output, "LayerNorm", None), nn.LayerNorm)
            and isinstance(getattr(ffn_out, "LayerNorm", None), nn.LayerNorm)):
        return None
    return EncoderLayer(m, "bert", sa, "num_attention_heads", sa.query, sa.key, sa.value, att.output.dense,
                        ffn_in.dense, ffn_out.dense, (att.output.LayerNorm, "input"), (ffn_out.LayerNorm, "input"),
                        "intermediate_size")


def _vit(m) -> Optional[EncoderLayer]:
    """ViT / DeiT: pre-LN, the attention's sum enters layernorm_after, the FFN's leaves the layer."""
    att = getattr(m, "attention", None)
    sa = getattr(att, "attention", None)
    if not isinstance(getattr(m, "layernorm_after", None), nn.LayerNorm) or not hasattr(sa, "num_attention_heads"):
        return None
    if not all(_linear(x, n) for x, n in ((sa, "query"), (sa, "key"), (sa, "value"), (getattr(att, "output", None),
               "dense"), (getattr(m, "intermediate", None), "dense"), (getattr(m, "output", None), "dense"))):
        return None
    return EncoderLayer(m, "vit", sa, "num_attention_heads", sa.query, sa.key, sa.value, att.output.dense,
                        m.intermediate.dense, m.output.dense, (m.layernorm_after, "input"), (m, "output"),
                        "intermediate_size")


def _distilbert(m) -> Optional[EncoderLayer]:
    """DistilBERT: q_lin / k_lin / v_lin / out_lin, ffn.lin1 / lin2, post-LN."""
    att, ffn = getattr(m, "attention", None), getattr(m, "ffn", None)
    if not all(_linear(x, n) for x, n in ((att, "q_lin"), (att, "k_lin"), (att, "v_lin"), (att, "out_lin"),
                                          (ffn, "lin1"), (ffn, "lin2"))) or not hasattr(att, "n_heads"):
        return None
    if not all(isinstance(getattr(m, n, None), nn.LayerNorm) for n in ("sa_layer_norm", "output_layer_norm")):
        return None
    return EncoderLayer(m, "distilbert", att, "n_heads", att.q_lin, att.k_lin, att.v_lin, att.out_lin, ffn.lin1,
                        ffn.lin2, (m.sa_layer_norm, "input"), (m.output_layer_norm, "input"), "hidden_dim")


def _linear(owner, name: str) -> bool:
    return isinstance(getattr(owner, name, None), nn.Linear)


ADAPTERS = (_bert, _vit, _distilbert)
SUPPORTED = "BERT-layout encoders (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM), DistilBERT and ViT / DeiT"


def encoder_layers(module) -> list[EncoderLayer]:
    """The layers of a transformer encoder, in order; [] when the model has none of the known layouts.
    ALBERT has none: it runs one layer's weights at every depth, and removing a unit from that layer
    would remove it everywhere, which a per-layer ranking and refit cannot account for."""
    mods = list(module.modules()) if module is not None else []
    return [layer for layer in (next((a(m) for a in ADAPTERS if a(m) is not None), None) for m in mods) if layer]


def shares_layers(module) -> bool:
    """True for ALBERT-style encoders that run one layer's weights at several depths."""
    cfg = transformer_config(module)
    return bool(cfg is not None and getattr(cfg, "num_hidden_groups", None) is not None
                and getattr(cfg, "num_hidden_groups", 1) < getattr(cfg, "num_hidden_layers", 1))


def unsupported_for_pruning(module) -> Optional[str]:
    """Why structured transformer pruning cannot act on this module, or None when it can (or when the
    module is not a transformer, which the generic torch-pruning path handles)."""
    cfg = transformer_config(module)
    if encoder_layers(module) or cfg is None:
        return None
    kind = getattr(cfg, "model_type", "?")
    why = "its layers share weights across the depth" if shares_layers(module) else \
        "its layers match none of the known layouts"
    return (f"structured pruning of transformer encoders supports {SUPPORTED}; this model (model_type "
            f"'{kind}') is not one: {why}. Use method: unstructured or 2:4, which work on any model")


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
    (0, 0) lets ORT's fusion detect each layer's from its graph. None: not a known encoder."""
    layers = encoder_layers(module) if module is not None else []
    shapes = {(layer.heads, layer.q.out_features) for layer in layers}
    if not layers:
        return None
    return shapes.pop() if len(shapes) == 1 else (0, 0)
