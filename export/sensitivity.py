"""Per-node quantization sensitivity: quantize one node at a time, everything else float, and see how
far the outputs move from the float graph's on a few training batches. The ranking says which nodes
to keep in float (onnx-quantize keep_fp32), and `fewest_to_keep` finds the shortest such list that
meets a fidelity target, each candidate list checked by quantizing with it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from export.graph_kernels import FLOAT_MATMULS

MAX_SUGGESTION_TRIES = 12  # quantizations fewest_to_keep may spend


FIDELITY = {False: "cosine of outputs to the float graph",
            True: "exp(-KL) of next-token distributions against the float graph"}


def fidelity(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean cosine between rows of the float graph's outputs and the quantized graph's; for a causal
    LM (outputs are core.lm summaries), exp(-KL) of next-token distributions: 1 when identical."""
    from core.lm_summary import is_summary, lm_metrics

    if is_summary(ref):
        return float(np.exp(-lm_metrics(out, ref)["kl"]))
    a, b = ref.reshape(len(ref), -1).astype(np.float64), out.reshape(len(out), -1).astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.clip(den, 1e-12, None)))


def candidate_nodes(src: Path, op_types: Optional[list[str]]) -> list[tuple[str, str]]:
    """(name, op type) of the nodes int8 quantization acts on: products with a constant weight, and
    fused Attention; restricted to `op_types` when given."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    consts = {i.name for i in graph.initializer}
    wanted = set(op_types) if op_types else set(FLOAT_MATMULS) | {"Attention", "Conv"}
    return [(n.name, n.op_type) for n in graph.node if n.op_type in wanted and n.name
            and (n.op_type == "Attention" or any(i in consts for i in n.input))]


@dataclass
class Ranking:
    rows: list[dict]  # most sensitive first: {node, op_type, fidelity}
    reference: np.ndarray

    def top(self, k: int) -> list[str]:
        return [r["node"] for r in self.rows[:k]]


def rank_nodes(src: Path, batches: list[dict], op_types, quantize: Callable, work: Path) -> Ranking:
    """`quantize(excluded, only, dest)` writes the graph with only the `only` nodes quantized."""
    from runtime.infer import onnx_outputs
    from core.progress import progress

    reference = onnx_outputs(src, batches)
    rows = []
    dest = Path(work) / "sensitivity-one.onnx"
    nodes = candidate_nodes(src, op_types)
    bar = progress(nodes, desc="sensitivity: one node at a time", unit="node", leave=False)
    for name, op in bar:
        quantize([], [name], dest)
        rows.append({"node": name, "op_type": op, "fidelity": round(fidelity(reference, onnx_outputs(dest, batches)),
                                                                    6)})
    dest.unlink(missing_ok=True)
    rows.sort(key=lambda r: r["fidelity"])
    return Ranking(rows, reference)


def fewest_to_keep(src: Path, batches: list[dict], ranking: Ranking, target: float, quantize: Callable,
                   work: Path) -> dict:
    """The fewest most-sensitive nodes to keep in float for the whole quantized graph to reach
    `target` fidelity: k = 0, 1, 2, 4, ... then a bisection, each k checked by quantizing."""
    from runtime.infer import onnx_outputs

    dest = Path(work) / "sensitivity-keep.onnx"
    tried: dict[int, float] = {}

    def score(k: int) -> float:
        if k not in tried:
            quantize(ranking.top(k), None, dest)
            tried[k] = round(fidelity(ranking.reference, onnx_outputs(dest, batches)), 6)
        return tried[k]

    n = len(ranking.rows)
    k, good = 0, None
    while len(tried) < MAX_SUGGESTION_TRIES:
        if score(k) >= target:
            good = k
            break
        if k >= n:
            break
        k = min(n, max(1, 2 * k))
    if good is not None and good > 1:  # bisect between the last failing and the first passing k
        lo = max(x for x in tried if tried[x] < target and x < good)
        while good - lo > 1 and len(tried) < MAX_SUGGESTION_TRIES:
            mid = (lo + good) // 2
            lo, good = (lo, mid) if score(mid) >= target else (mid, good)
    dest.unlink(missing_ok=True)
    return {"target": target, "met": good is not None, "nodes": ranking.top(good if good is not None else 0),
            "fidelity_by_kept": {str(k): v for k, v in sorted(tried.items())}}
