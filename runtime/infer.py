"""Run a model over batches of named numpy inputs and return the stacked outputs (one array). Per-token
logits of a causal LM are summarised per batch (core.lm_summary.summarize) before they are stacked."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.sessions import onnx_session


def torch_outputs(module, batches: list[dict[str, np.ndarray]], device=None) -> np.ndarray:
    import torch

    outs = []
    with torch.inference_mode():
        for b in batches:
            out = module(**{k: torch.from_numpy(v).to(device or "cpu") for k, v in b.items()})
            outs.append(reduce_outputs(out.float().cpu(), b))
    return np.concatenate(outs)


def reduce_outputs(out, batch: dict[str, np.ndarray]) -> np.ndarray:
    """What is kept of one batch's outputs (a numpy array or a CPU tensor): as they are, or, for
    per-token outputs over a vocabulary (a causal LM's logits), their core.lm summary."""
    from core.lm_summary import summarize

    ids = batch.get("input_ids")
    if len(out.shape) == 3 and ids is not None and tuple(out.shape[:2]) == ids.shape:
        mask = batch.get("attention_mask")
        return summarize(out, ids, mask if mask is not None else np.ones(ids.shape, np.int64))
    return out if isinstance(out, np.ndarray) else out.numpy()


def onnx_outputs(path_or_session, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = path_or_session if hasattr(path_or_session, "run") else onnx_session(path_or_session)
    names = {i.name for i in sess.get_inputs()}
    if any(n.startswith("past_key_values") for n in names):  # a causal LM with a KV cache: an empty past
        from runtime.decode import OrtLM

        lm = OrtLM(sess)
        return np.concatenate([reduce_outputs(lm.logits(b["input_ids"], b["attention_mask"]), b) for b in batches])
    return np.concatenate([reduce_outputs(sess.run(None, {k: v for k, v in b.items() if k in names})[0], b)
                           for b in batches])


def graph_feeds(onnx_path, batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Batches as the graph takes them, for calibration: the inputs it has, and for a causal LM's graph
    with a KV cache also position ids and an empty cache (a prefill)."""
    sess = onnx_session(onnx_path)
    names = {i.name for i in sess.get_inputs()}
    if any(n.startswith("past_key_values") for n in names):
        from runtime.decode import OrtLM

        lm = OrtLM(sess)
        return [lm.prefill_feeds(b["input_ids"], b["attention_mask"]) for b in batches]
    return [{k: v for k, v in b.items() if k in names} for b in batches]


def variant_outputs(model, batches: list[dict[str, np.ndarray]]) -> np.ndarray:
    """Outputs of a VariantModel, whichever form it has (torch module or ONNX graph)."""
    return (torch_outputs(model.module, batches) if model.format == "torch"
            else onnx_outputs(model.onnx_path, batches))


def save_batches(path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    """Batches (which may differ in shape) in one .npz: keys "<batch index>/<input name>"."""
    from core import atomic

    arrays = {f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
    atomic.write_with(Path(path), lambda tmp: np.savez(open(tmp, "wb"), n_batches=len(batches), **arrays))


def load_batches(path) -> list[dict[str, np.ndarray]]:
    data = np.load(path)
    n = int(data["n_batches"])
    out: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    for key in data.files:
        if key != "n_batches":
            i, name = key.split("/", 1)
            out[int(i)][name] = data[key]
    return out
