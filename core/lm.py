"""Causal (decoder) language models as the workbench sees them: a wrapper that gives a Hugging Face
causal LM the pipeline's interface ((input_ids, attention_mask) -> next-token logits). The per-token
summaries that stand for its logits live in core.lm_summary (NumPy only) and are named here too."""
from __future__ import annotations

from torch import nn

from core.lm_summary import (ARGMAX, IDS, NEXT_LOGP, SCORED, TOP_K, cache_shape, is_summary,  # noqa: F401
                             kv_cache_bytes, lm_metrics, summarize)


class CausalLM(nn.Module):
    """(input_ids, attention_mask) -> logits (batch, tokens, vocabulary), for AutoModelForCausalLM
    models. Generation (bench) and KV-cache export reach the Hugging Face model as `.model`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def is_causal_lm(module) -> bool:
    return isinstance(module, CausalLM)
