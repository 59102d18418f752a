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
    targets: list[Literal["ffn", "heads"]] = Field(
        default_factory=lambda: ["ffn", "heads"], description="transformer encoders (structured): FFN intermediate "
        "channels and/or whole attention heads; the model's config is fixed up to match")
    head_ratio: Optional[float] = Field(None, ge=0, lt=1, description="fraction of heads removed per layer "
                                        "(default: ratio); at least one head is kept")


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
            if params.importance != "magnitude":
                raise field_error(where, f"{field}.importance", "transformer pruning ranks FFN channels and heads by "
                                  "weight magnitude", value=params.importance, accepted=["magnitude"])
            if not params.targets:
                raise field_error(where, f"{field}.targets", "names nothing to prune", value=[],
                                  accepted=["ffn", "heads"])

    def run(self, model, params, ctx):
        p = PruneParams.model_validate(params)
        module = copy.deepcopy(model.module).eval()
        if p.method == "structured" and _bert_layers(module):
            _transformer(module, model.io, p, ctx)
        elif p.method == "structured":
            _structured(module, model.io, p, ctx)
        else:
            _masked(module, p, ctx)
        model.module = module
        return model


def _bert_layers(module) -> list:
    """The layers of a BERT-like encoder (attention + intermediate.dense + output.dense), in order."""
    from torch import nn

    return [m for m in module.modules() if hasattr(m, "attention") and isinstance(
        getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear) and isinstance(
        getattr(getattr(m, "output", None), "dense", None), nn.Linear)]


def _transformer(module, io_spec, p: PruneParams, ctx) -> None:
    """FFN channels through torch-pruning's dependency graph (intermediate.dense outputs, with the
    matching output.dense inputs), heads with Hugging Face's prune_heads; the config follows."""
    import torch
    import torch_pruning as tp

    from export.onnx import example_inputs

    layers = _bert_layers(module)
    hf = next(m for m in module.modules() if hasattr(m, "prune_heads") and hasattr(m, "config"))
    cfg = hf.config
    before = sum(x.numel() for x in module.parameters())
    if "ffn" in p.targets:
        width = layers[0].intermediate.dense.out_features
        keep = max(1, round(width * (1 - p.ratio)))
        if p.round_to:
            keep = max(p.round_to, keep // p.round_to * p.round_to)
        graph = tp.DependencyGraph().build_dependency(module, example_inputs=example_inputs(io_spec))
        for layer in layers:
            w_in, w_out = layer.intermediate.dense.weight, layer.output.dense.weight
            # A channel matters by the weights that write it and the weights that read it.
            importance = w_in.detach().norm(dim=1) * w_out.detach().norm(dim=0)
            drop = importance.argsort()[:width - keep].tolist()
            if drop:
                graph.get_pruning_group(layer.intermediate.dense, tp.prune_linear_out_channels, idxs=drop).prune()
        cfg.intermediate_size = keep
        ctx.notes["intermediate_size"] = [width, keep]
    if "heads" in p.targets:
        n_heads = cfg.num_attention_heads
        size = cfg.hidden_size // n_heads
        n_drop = min(n_heads - 1, int((p.head_ratio if p.head_ratio is not None else p.ratio) * n_heads))
        plan = {}
        for i, layer in enumerate(layers):
            att = layer.attention
            q, k, v = att.self.query.weight, att.self.key.weight, att.self.value.weight
            o = att.output.dense.weight
            with torch.no_grad():
                score = [sum(float(w[h * size:(h + 1) * size].norm()) for w in (q, k, v))
                         + float(o[:, h * size:(h + 1) * size].norm()) for h in range(n_heads)]
            plan[i] = sorted(range(n_heads), key=lambda h: score[h])[:n_drop]
        if n_drop:
            hf.prune_heads(plan)  # also records config.pruned_heads, so save/from_pretrained round-trips
        ctx.notes["heads_removed_per_layer"] = [n_drop, n_heads]
    after = sum(x.numel() for x in module.parameters())
    ctx.notes.update(params_before=int(before), params_after=int(after))


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
