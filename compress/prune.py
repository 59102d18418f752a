"""Pruning steps: structured channel pruning with torch-pruning (the model really shrinks), and
unstructured / 2:4 magnitude pruning with torch.nn.utils.prune (weights zeroed, made permanent;
dense kernels do not get faster from zeros, and the report says so)."""
from __future__ import annotations

import copy
from typing import Literal, Optional

from pydantic import Field

from workbench.errors import field_error
from workbench.steps import Step, StepParams, register


class PruneParams(StepParams):
    method: Literal["structured", "unstructured", "2:4"] = Field(
        "structured", description="structured: remove conv channels / linear neurons (torch-pruning); "
        "unstructured: zero the smallest weights; 2:4: zero 2 of every 4 weights along the input dimension")
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of channels (structured) or weights to remove; "
                         "ignored by 2:4, which is always 50%")
    importance: Literal["magnitude", "taylor"] = Field(
        "magnitude", description="structured: L2 magnitude, or first-order Taylor (needs task labels)")
    global_pruning: bool = Field(False, description="rank channels across layers instead of per layer")
    ignored_layers: list[str] = Field(default_factory=list, description="module names never pruned "
                                      "(the output layer is always kept)")
    round_to: Optional[int] = Field(None, gt=0, description="keep channel counts multiples of this")


def _kind_is_transformer(recipe) -> bool:
    from workbench.recipe import model_kind

    return model_kind(recipe.model) == "embedding" or getattr(recipe.model, "source", "") == "hf"


@register
class Prune(Step):
    name = "prune"
    summary = "structured channel pruning (torch-pruning) or unstructured / 2:4 magnitude pruning"
    Params = PruneParams
    consumes = "torch"

    @classmethod
    def check(cls, params, *, recipe, variant, where, field):
        if params.method == "structured" and _kind_is_transformer(recipe):
            raise field_error(where, f"{field}.method", "structured pruning of transformer encoders (FFN channels, "
                              "attention heads) is not available yet", value="structured",
                              accepted=["unstructured", "2:4"])

    def run(self, model, params, ctx):
        p = PruneParams.model_validate(params)
        module = copy.deepcopy(model.module).eval()
        if p.method == "structured":
            _structured(module, model.io, p, ctx)
        else:
            _masked(module, p, ctx)
        model.module = module
        return model


def _structured(module, io_spec, p: PruneParams, ctx) -> None:
    import torch
    import torch_pruning as tp
    from torch import nn

    example = {k: torch.from_numpy(v) for k, v in io_spec.make(batch=2, seq=16).items()}
    names = dict(module.named_modules())
    unknown = [n for n in p.ignored_layers if n not in names]
    if unknown:
        raise ValueError(f"ignored_layers {unknown} are not modules of the model; some names: {list(names)[1:8]}")
    ignored = [names[n] for n in p.ignored_layers]
    # The layer that produces the output keeps its width, or the model's output would change shape.
    with torch.no_grad():
        out_dim = module(**example).shape[-1]
    heads = [m for m in module.modules() if isinstance(m, nn.Linear) and m.out_features == out_dim]
    ignored += heads[-1:]
    if p.importance == "taylor":
        imp = tp.importance.TaylorImportance()
    else:
        imp = tp.importance.MagnitudeImportance(p=2)
    before_ops, before_params = tp.utils.count_ops_and_params(module, example)
    pruner = tp.pruner.BasePruner(module, example, importance=imp, pruning_ratio=p.ratio,
                                  global_pruning=p.global_pruning, ignored_layers=ignored, round_to=p.round_to)
    if p.importance == "taylor":
        _taylor_gradients(module, ctx)
    pruner.step()
    module.zero_grad(set_to_none=True)
    after_ops, after_params = tp.utils.count_ops_and_params(module, example)
    ctx.notes.update(params_before=int(before_params), params_after=int(after_params),
                     macs_before=int(before_ops), macs_after=int(after_ops))


def _taylor_gradients(module, ctx) -> None:
    """Taylor importance ranks channels by |weight x gradient|: accumulate gradients of the task loss."""
    import numpy as np
    import torch

    task = ctx.task
    if task is None or task.train_labels is None:
        raise ValueError("importance 'taylor' needs a task with labels (classification); use 'magnitude'")
    module.zero_grad()
    seen = 0
    for b in task.train_batches[:8]:
        n = len(next(iter(b.values())))
        y = torch.from_numpy(np.asarray(task.train_labels[seen:seen + n]))
        seen += n
        out = module(**{k: torch.from_numpy(v) for k, v in b.items()})
        torch.nn.functional.cross_entropy(out, y).backward()


def _masked(module, p: PruneParams, ctx) -> None:
    import torch
    import torch.nn.utils.prune as tprune
    from torch import nn

    layers = [(m, "weight") for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if p.method == "unstructured":
        tprune.global_unstructured(layers, pruning_method=tprune.L1Unstructured, amount=p.ratio)
    else:
        for m, _ in layers:
            w = m.weight.detach()
            flat = w.reshape(w.shape[0], -1)
            if flat.shape[1] % 4:
                continue  # 2:4 needs the input dimension in groups of 4
            groups = flat.abs().reshape(flat.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool)
            keep.scatter_(-1, groups.topk(2, dim=-1).indices, True)
            tprune.custom_from_mask(m, "weight", keep.reshape_as(w))
    for m, name in layers:
        if tprune.is_pruned(m):
            tprune.remove(m, name)  # make permanent: a plain weight tensor with zeros in it
    total = sum(m.weight.numel() for m, _ in layers)
    zeros = sum(int((m.weight == 0).sum()) for m, _ in layers)
    ctx.notes["achieved_sparsity"] = round(zeros / max(total, 1), 4)
    ctx.notes["speedup_note"] = "zeros in dense weights: dense kernels run at the same speed"
