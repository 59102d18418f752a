"""Decoder (causal LM) layers as the workbench sees them, found by structure as core.encoders finds
encoder layers: the attention's projections and head counts, the FFN's input and output
projections, where each residual sum can be read and which config field holds the FFN width.
Structured pruning of decoder LMs works on this, not on one family's module names."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass
class DecoderLayer:
    """One decoder layer. Projections are nn.Linear, or GPT-2's Conv1D, which stores its weight as
    (in, out): read weights through `weight()` to see both as (out, in)."""
    block: nn.Module  # the layer itself (its forward maps hidden states to hidden states)
    family: str  # "llama" (Llama, Qwen2, Mistral and others of that layout) or "gpt2"
    attn: nn.Module
    qkv: tuple  # (q_proj, k_proj, v_proj); GPT-2: (c_attn,), one projection whose outputs are [q | k | v]
    o: nn.Module
    up: tuple  # the FFN's input projections: (gate_proj, up_proj); GPT-2: (c_fc,)
    down: nn.Module
    heads: int  # query heads
    kv_heads: int  # key / value heads (GQA: fewer than query heads, each serving a group of them)
    head_dim: int
    # (module, "input" | "output"): where o(x) + residual and down(x) + residual are visible
    attn_sum: tuple
    ffn_sum: tuple
    ffn_config_attr: str  # the config field that holds the FFN width


def weight(proj):
    """A projection's weight as (out, in), whether nn.Linear or Conv1D."""
    return proj.weight if isinstance(proj, nn.Linear) else proj.weight.T


def _llama(m) -> Optional[DecoderLayer]:
    """Llama, Qwen2, Mistral and others of that layout: pre-norm, separate q / k / v / o, gated FFN."""
    att, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
    if not all(_linear(att, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) or \
            not all(_linear(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    norm, hd = getattr(m, "post_attention_layernorm", None), getattr(att, "head_dim", None)
    # Gemma 2 / 3 and OLMo 2 normalise the attention and FFN outputs before the residual sum: the sums
    # are then elsewhere, and a refit of o_proj / down_proj would aim at the wrong target.
    if norm is None or not hd or hasattr(m, "post_feedforward_layernorm"):
        return None
    return DecoderLayer(m, "llama", att, (att.q_proj, att.k_proj, att.v_proj), att.o_proj, (mlp.gate_proj, mlp.up_proj),
                        mlp.down_proj, att.q_proj.out_features // hd, att.k_proj.out_features // hd, hd,
                        (norm, "input"), (m, "output"), "intermediate_size")


def _gpt2(m) -> Optional[DecoderLayer]:
    """GPT-2: pre-norm, q, k and v in one Conv1D (c_attn), FFN c_fc -> c_proj."""
    att, mlp = getattr(m, "attn", None), getattr(m, "mlp", None)
    if not all(_conv1d(x, n) for x, n in ((att, "c_attn"), (att, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj"))) \
            or not hasattr(att, "num_heads") or not isinstance(getattr(m, "ln_2", None), nn.LayerNorm):
        return None
    return DecoderLayer(m, "gpt2", att, (att.c_attn,), att.c_proj, (mlp.c_fc,), mlp.c_proj, att.num_heads,
                        att.num_heads, att.head_dim, (m.ln_2, "input"), (m, "output"), "n_inner")


def _linear(owner, name: str) -> bool:
    return isinstance(getattr(owner, name, None), nn.Linear)


def _conv1d(owner, name: str) -> bool:
    """transformers' Conv1D, by its shape: a weight (nx, nf) and a bias (nf)."""
    m = getattr(owner, name, None)
    w = getattr(m, "weight", None)
    return w is not None and hasattr(m, "nf") and tuple(w.shape) == (getattr(m, "nx", None), m.nf)


ADAPTERS = (_llama, _gpt2)
SUPPORTED = ("the Llama layout (Llama, Qwen2, Mistral and others: self_attn.q_proj / k_proj / v_proj / o_proj, "
             "mlp.gate_proj / up_proj / down_proj) and GPT-2 (attn.c_attn / c_proj, mlp.c_fc / c_proj)")


def decoder_layer(m) -> Optional[DecoderLayer]:
    """The layer `m` as a DecoderLayer, or None (read again after a step replaced its projections)."""
    return next((layer for layer in (a(m) for a in ADAPTERS) if layer is not None), None)


def decoder_layers(module) -> list[DecoderLayer]:
    """The layers of a decoder LM, in order; [] when the model has none of the known layouts."""
    return [layer for layer in map(decoder_layer, module.modules() if module is not None else []) if layer]


def unsupported_decoder_pruning(module) -> Optional[str]:
    """Why structured pruning cannot act on this decoder LM, or None when it can."""
    layers = decoder_layers(module)
    cfg = next((m.config for m in module.modules() if hasattr(getattr(m, "config", None), "model_type")), None)
    depth = getattr(cfg, "num_hidden_layers", None)
    if layers and len({x.family for x in layers}) == 1 and depth in (None, len(layers)):
        return None
    names = {n.rsplit(".", 1)[-1] for n, _ in module.named_modules()}
    if names & {"gate_up_proj", "qkv_proj", "query_key_value"}:
        why = ("its FFN's gate and up projections (gate_up_proj) or its attention's q, k and v (qkv_proj, "
               "query_key_value) are one fused matrix")
    elif "post_feedforward_layernorm" in names:
        why = "it normalises the attention and FFN outputs before each residual sum"
    elif "experts" in names:
        why = "its FFNs are mixtures of experts"
    elif layers:
        why = f"only {len(layers)} of its {depth} layers have a known layout"
    else:
        why = "its layers match none of the known layouts"
    return (f"structured pruning of decoder LMs supports {SUPPORTED}; this model (model_type "
            f"'{getattr(cfg, 'model_type', '?')}') is not one: {why}. Use method: unstructured or 2:4, which "
            f"work on any model")
