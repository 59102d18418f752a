"""Sequence packing, the `pack-sequences` step: the variant's model learns to take several requests in
one row of tokens, so a server can batch short requests without padding them to the longest.

On a CPU an encoder's time grows with the tokens it is given, padding included: a batch of one 16-token
and one 64-token request costs two 64-token requests, and by-length batching only narrows that. Packed,
the batch is one row holding each request's own tokens one after another; the attention mask numbers
them 1, 2, ... (0: padding), each token attends only to its own request's, positions restart at each
request, and the model answers one embedding per request (core.encoders.EmbeddingModel's `packed`).
The load scenarios' `batching: packed` sends such rows. For an ordinary mask of ones and zeros the
model answers exactly as before, so the variant's accuracy and latency cells measure the same model.

The step checks what it made: a few requests packed in one row must get the answers each gets alone.
An encoder that does not honour a per-token mask or position ids fails there, with the difference."""
from __future__ import annotations

import copy
import inspect
from typing import Optional

from core.steps import Step, StepParams, register

TOLERANCE = 1e-4  # fp32; a half-precision model's answers are held to its own precision's rounding


class PackSequencesParams(StepParams):
    pass


@register
class PackSequences(Step):
    name = "pack-sequences"
    summary = "let the model take several requests in one row of tokens (a server's packed batches)"
    details = ("For sentence-embedding models (a transformer encoder with pooling) whose encoder takes position "
               "ids (BERT, RoBERTa, XLM-R, ELECTRA, MiniLM and their kin). Ordinary inputs get the same answers; "
               "a load scenario with `batching: packed` then serves the variant's requests packed. The step "
               "checks that requests packed together get the answers each gets alone. ONNX Runtime's BERT fusion "
               "does not fuse attention under a packed mask; OpenVINO needs no fusion.")
    Params = PackSequencesParams
    libraries = ("torch", "transformers")

    @classmethod
    def unfit(cls, params: dict, module) -> Optional[str]:
        from core.encoders import EmbeddingModel

        if not isinstance(module, EmbeddingModel):
            return ("packing numbers each request's tokens in the attention mask and pools each request's own: it "
                    "is for sentence-embedding models (a transformer encoder with pooling), and this model is "
                    f"a {type(module).__name__}")
        if "position_ids" not in inspect.signature(module.encoder.forward).parameters:
            return (f"packing restarts each request's positions, and this encoder ({type(module.encoder).__name__}) "
                    "takes no position_ids")
        return None

    def run(self, model, params, ctx):
        import torch

        why = self.unfit(params, model.module)
        if why:
            raise ValueError(f"pack-sequences: {why}")
        module = copy.deepcopy(model.module).eval()
        module.packed = True
        worst = packing_error(module, model.io)
        dtype = next(module.parameters()).dtype
        allowed = TOLERANCE if dtype == torch.float32 else 5e-2
        ctx.notes["packing"] = {"max_abs_diff_vs_alone": float(f"{worst:.3g}"), "tolerance": allowed}
        if not worst <= allowed:
            raise ValueError(f"pack-sequences: requests packed in one row got answers up to {worst:.3g} away from "
                             f"each one's alone (tolerance {allowed:g}): this encoder "
                             f"({type(module.encoder).__name__}) does not honour a per-token attention mask and "
                             "position ids, so its requests cannot share a row")
        model.module = module
        return model


def packing_error(module, io, lengths=(7, 3, 12, 1)) -> float:
    """The largest difference between requests of these lengths packed in one row (with padding after
    them) and each one run alone: 0 up to float rounding when packing is sound."""
    import torch

    spec = io.inputs["input_ids"]
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(spec.get("low", 0), spec.get("high", 2), (1, n), generator=g) for n in lengths]
    with torch.no_grad():
        alone = torch.cat([module(r, torch.ones_like(r)) for r in rows]).float()
        ids = torch.nn.functional.pad(torch.cat(rows, 1), (0, 5))
        seg = torch.nn.functional.pad(torch.cat([torch.full_like(r, k + 1) for k, r in enumerate(rows)], 1), (0, 5))
        packed = module(ids, seg).float()
    if packed.shape != alone.shape:
        return float("inf")
    return float((packed - alone).abs().max())
