"""Causal (decoder) language models as the workbench sees them: a wrapper that gives a Hugging Face
causal LM the pipeline's interface ((input_ids, attention_mask) -> next-token logits). The per-token
summaries that stand for its logits live in core.lm_summary (NumPy only, so a cell need not load torch)."""
from __future__ import annotations

from torch import nn


class CausalLM(nn.Module):
    """(input_ids, attention_mask) -> logits (batch, tokens, vocabulary), for AutoModelForCausalLM
    models. Generation (bench) and KV-cache export reach the Hugging Face model as `.model`."""

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        self.model = model
        # The model's tokenizer, for files that carry a vocabulary (GGUF); not part of the computation.
        self.tokenizer = tokenizer

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def is_causal_lm(module) -> bool:
    return isinstance(module, CausalLM)


def hf_model(module):
    """The Hugging Face causal LM inside the workbench's wrapper (what an engine's own converter reads as a
    folder: llama.cpp's, ORT GenAI's builder), or None."""
    inner = getattr(module, "model", None) if is_causal_lm(module) else None
    return inner if inner is not None and hasattr(inner, "save_pretrained") else None
