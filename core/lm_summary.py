"""The compact per-token summary that stands for a causal LM's logits wherever outputs are stored,
compared or scored, in NumPy alone (no torch: an ONNX Runtime cell scores with it). Full logits are
batch x tokens x vocabulary (a 150k vocabulary makes that gigabytes), so each position keeps the
log-probability of the token that really came next, the argmax and the top-K tokens with their
log-probabilities: enough for perplexity, top-1 agreement and the KL of next-token distributions
(over the reference's top K), in bounded memory. Also the KV cache's shape from a config."""
from __future__ import annotations

import numpy as np

TOP_K = 32
# Columns of a summary row: [log p(next token), argmax id, scored?, top-K ids..., top-K log-probs...]
NEXT_LOGP, ARGMAX, SCORED, IDS = 0, 1, 2, 3


def summarize(logits, input_ids: np.ndarray, attention_mask: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(batch, tokens, 3 + 2k) float32 rows: see the module docstring. Position t predicts token t+1;
    it is scored when both are real tokens. Ids are exact in float32 up to 2**24. NumPy only: an ONNX
    Runtime cell scores its outputs without loading torch (a CPU tensor is accepted too)."""
    if hasattr(logits, "detach"):  # a torch tensor: to the host, as float32
        logits = logits.detach().float().cpu().numpy()
    x = np.asarray(logits, dtype=np.float32)
    shifted = x - x.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    b, s, v = logp.shape
    k = min(k, v)
    ids = np.asarray(input_ids, dtype=np.int64)
    mask = np.asarray(attention_mask).astype(bool)
    nxt = np.zeros((b, s), dtype=np.int64)
    nxt[:, :-1] = ids[:, 1:]
    scored = np.zeros((b, s), dtype=bool)
    scored[:, :-1] = mask[:, :-1] & mask[:, 1:]
    # The k best, best first (argpartition, then a sort of those k; ties keep the lower id first).
    part = np.argpartition(-logp, k - 1, axis=-1)[..., :k]
    part_vals = np.take_along_axis(logp, part, -1)
    order = np.lexsort((part, -part_vals), axis=-1)
    top_ids = np.take_along_axis(part, order, -1)
    top_vals = np.take_along_axis(part_vals, order, -1)
    out = np.concatenate([np.take_along_axis(logp, nxt[..., None], -1), logp.argmax(-1)[..., None].astype(np.float32),
                          scored[..., None].astype(np.float32), top_ids.astype(np.float32), top_vals], -1)
    return out.astype(np.float32)


def is_summary(arr: np.ndarray) -> bool:
    """Whether `arr` is a summarize() result (the layout, and a 0/1 scored column)."""
    return (arr.ndim == 3 and arr.shape[-1] == IDS + 2 * TOP_K
            and bool(np.isin(arr[..., SCORED], (0.0, 1.0)).all()))


def lm_metrics(summary: np.ndarray, reference: np.ndarray | None = None) -> dict[str, float]:
    """Perplexity on the scored tokens; against a reference summary (the source model's), top-1
    agreement of next-token predictions and the mean KL(reference || variant) over the reference's
    top-K tokens. Where the variant's own top K lacks one of those tokens, its log-probability is
    taken as its K-th best, an upper bound: the KL is then an underestimate, never inflated."""
    m = summary[..., SCORED] > 0.5
    nll = -summary[..., NEXT_LOGP][m].astype(np.float64)
    out = {"perplexity": float(np.exp(nll.mean())) if nll.size else float("nan"), "nll": float(nll.mean())}
    if reference is None or reference.shape != summary.shape:
        return out
    k = (summary.shape[-1] - IDS) // 2
    r, s = reference[m], summary[m]
    out["top1_agreement"] = float((r[:, ARGMAX] == s[:, ARGMAX]).mean())
    r_ids, r_lp = r[:, IDS:IDS + k], r[:, IDS + k:].astype(np.float64)
    s_ids, s_lp = s[:, IDS:IDS + k], s[:, IDS + k:].astype(np.float64)
    match = r_ids[:, :, None] == s_ids[:, None, :]  # (n, k ref, k variant)
    var_lp = np.where(match.any(-1), (match * s_lp[:, None, :]).sum(-1), s_lp[:, -1:])
    kl = (np.exp(r_lp) * (r_lp - var_lp)).sum(-1)
    out["kl"] = float(np.clip(kl, 0, None).mean())
    return out


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head size) of a transformers config, or of its to_dict(): the names
    differ by family (GPT-2's n_layer / n_head / n_embd), and head_dim is explicit only when set."""
    get = config.get if isinstance(config, dict) else (lambda key: getattr(config, key, None))
    layers = get("num_hidden_layers") or get("n_layer")
    heads = get("num_attention_heads") or get("n_head")
    hidden = get("hidden_size") or get("n_embd")
    kv_heads = get("num_key_value_heads") or heads
    # GPT-2 keeps n_head when heads are pruned and lists them in pruned_heads ({layer: [heads]}): each layer's
    # cache holds what is left (the workbench's pruner removes as many in every layer).
    pruned = get("pruned_heads") or {}
    if pruned:
        kv_heads -= max(len(set(h)) for h in pruned.values())
    return layers, kv_heads, get("head_dim") or hidden // heads


def kv_cache_bytes(config, batch: int, context: int, dtype_bytes: int = 4) -> int:
    """Bytes of the key/value cache at `context` tokens: 2 x layers x kv-heads x head size x tokens."""
    layers, kv_heads, head_dim = cache_shape(config)
    return int(2 * layers * kv_heads * head_dim * context * batch * dtype_bytes)
