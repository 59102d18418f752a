"""Numerical parity of an artifact against the module it came from, on real evaluation inputs."""
from __future__ import annotations

from typing import Optional

import numpy as np


def parity(reference: np.ndarray, outputs: np.ndarray, kind: str) -> dict:
    ref, out = reference.astype(np.float64), outputs.astype(np.float64)
    if ref.shape != out.shape:
        return {"shape_mismatch": [list(ref.shape), list(out.shape)]}
    if kind == "causal-lm":
        return lm_parity(reference, outputs)
    r2, o2 = ref.reshape(len(ref), -1), out.reshape(len(out), -1)
    cos = (r2 * o2).sum(1) / np.clip(np.linalg.norm(r2, axis=1) * np.linalg.norm(o2, axis=1), 1e-12, None)
    result = {"max_abs_diff": float(np.abs(ref - out).max()), "cosine_min": float(cos.min()), "n": int(len(ref))}
    if kind == "classifier":
        result["top1_agreement"] = float((ref.argmax(-1) == out.argmax(-1)).mean())
    return result


def violations(par: dict, tol) -> Optional[str]:
    """Why `par` exceeds the recipe's tolerance (`export.parity`), or None when within it."""
    if "shape_mismatch" in par:
        return f"output shape {par['shape_mismatch'][1]} differs from the source's {par['shape_mismatch'][0]}"
    bad = []
    if tol.max_abs_diff is not None and par["max_abs_diff"] > tol.max_abs_diff:
        bad.append(f"max_abs_diff {par['max_abs_diff']:.3g} > {tol.max_abs_diff:g}")
    if tol.min_cosine is not None and par["cosine_min"] < tol.min_cosine:
        bad.append(f"cosine_min {par['cosine_min']:.6f} < {tol.min_cosine:g}")
    if tol.min_top1_agreement is not None and par.get("top1_agreement", 1.0) < tol.min_top1_agreement:
        bad.append(f"top1_agreement {par['top1_agreement']:.4f} < {tol.min_top1_agreement:g}")
    return "; ".join(bad) or None


def lm_parity(reference: np.ndarray, outputs: np.ndarray) -> dict:
    """Causal LMs, on core.lm summaries of the logits: the largest difference in the log-probability of
    the token that came next, agreement of the argmax and the KL of next-token distributions."""
    from core.lm_summary import NEXT_LOGP, SCORED, lm_metrics

    m = reference[..., SCORED] > 0.5
    diff = np.abs(reference[..., NEXT_LOGP][m].astype(np.float64) - outputs[..., NEXT_LOGP][m])
    fit = lm_metrics(outputs, reference)
    return {"max_abs_diff": float(diff.max()) if diff.size else 0.0, "top1_agreement": fit["top1_agreement"],
            "kl_mean": fit["kl"], "n": int(m.sum()), "compared": "log-probability of the next token"}
