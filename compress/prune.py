"""Pruning steps: structured channel pruning with torch-pruning (the model really shrinks), and
unstructured / 2:4 magnitude pruning with torch.nn.utils.prune (weights zeroed, made permanent;
dense kernels do not get faster from zeros, and the report says so).

Transformer encoders lose FFN channels and attention heads. Ranked by activation, what a removed
unit contributed is not simply lost: layer by layer, front to back, the output projection over the
kept units is refit by least squares so that the pruned model reproduces the unpruned one's
LayerNorm inputs on training text (FLAP's bias compensation taken to the weights, with each layer
also correcting the error its predecessors left), which keeps far more of the model before any
distillation.

Decoder LMs (Llama layout, GPT-2) lose FFN channels and whole key/value heads with their query
groups, the same way: ranked by magnitude or activation, refit front to back."""
from __future__ import annotations

import copy
from typing import Literal, Optional

from pydantic import Field

from core.decoders import decoder_layer, decoder_layers, unsupported_decoder_pruning, weight
from core.encoders import encoder_layers, unsupported_for_pruning
from core.errors import field_error
from core.lm import is_causal_lm
from core.progress import library_prints
from core.steps import Step, StepParams, register

DECODER_ROUND_TO = 32  # decoders' FFN widths when round_to is unset: bitsandbytes' 4-bit CPU kernel needs it


class PruneParams(StepParams):
    method: Literal["structured", "unstructured", "2:4"] = Field(
        "structured", description="structured: remove conv channels / linear neurons (torch-pruning); "
        "unstructured: zero the smallest weights; 2:4: zero 2 of every 4 weights along the input dimension")
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of channels (structured) or weights to remove; "
                         "ignored by 2:4, which is always 50%")
    importance: Literal["magnitude", "taylor", "activation"] = Field(
        "magnitude", description="structured: L2 magnitude; taylor: first-order Taylor (CNNs, needs task labels); "
        "activation: how much what a channel or head adds to its layer's output varies on the task's training "
        "batches; layer by layer, what stays is then refit by least squares to reproduce the unpruned model "
        "(transformer encoders and decoder LMs, no labels needed)")
    global_pruning: bool = Field(False, description="rank channels across layers instead of per layer")
    ignored_layers: list[str] = Field(default_factory=list, description="module names never pruned "
                                      "(the output layer is always kept)")
    round_to: Optional[int] = Field(None, gt=0, description="keep channel counts multiples of this (decoder LMs: "
                                    f"{DECODER_ROUND_TO} when unset, as bitsandbytes' 4-bit CPU kernel needs "
                                    "out_features % 32 == 0)")
    targets: list[Literal["ffn", "heads"]] = Field(
        default_factory=lambda: ["ffn", "heads"], description="transformer encoders and decoder LMs (structured): "
        "FFN intermediate channels and/or whole attention heads (decoders with grouped-query attention: whole "
        "key/value heads with their query heads); the model's config is fixed up to match")
    head_ratio: Optional[float] = Field(None, ge=0, lt=1, description="fraction of heads (decoders: of key/value "
                                        "heads) removed per layer (default: ratio); at least one is kept, and "
                                        "every layer keeps the same number")


STATS_BATCHES = 16  # training batches whose activations rank and refit (importance: activation)


def _kind_is_transformer(recipe) -> bool:
    return recipe.model_kind == "embedding" or getattr(recipe.model, "source", "") == "hf"


@register
class Prune(Step):
    name = "prune"
    details = (
        '`structured` really shrinks the model. CNNs and MLPs: torch-pruning removes conv channels and '
        'neurons. Transformer encoders (found by structure: the BERT layout (BERT, RoBERTa, XLM-R, CamemBERT, '
        'ELECTRA, MiniLM), DistilBERT, ViT / DeiT) lose FFN intermediate channels and whole attention heads, '
        'with the config fixed so `save_pretrained` / `from_pretrained` round-trip. Decoder LMs (the Llama '
        'layout: Llama, Qwen2, Mistral; GPT-2) lose FFN channels and whole key/value heads with their query '
        "group. A layout the pruner cannot serve (ALBERT's shared layers, fused `gate_up_proj` / `qkv_proj` "
        "as in Phi-3, Gemma 2's norms, mixture-of-experts FFNs) is refused by `validate` for `hf` models, by "
        'the step otherwise, with the advice to use `unstructured` or `2:4`. With `importance: activation`, '
        'layers are pruned front to back on 16 training batches and the output projections refit by least '
        'squares (on MiniLM at 60 % of the FFN channels and half the heads: cosine 0.84 to the original '
        'before any training, against 0.48 for magnitude). The notes say which layout was found. Zeros in '
        'dense weights (`unstructured`, `2:4`) do not make dense kernels faster, and the report says so.'
    )
    summary = "structured channel pruning (torch-pruning) or unstructured / 2:4 magnitude pruning"
    Params = PruneParams
    consumes = "torch"
    libraries = ("torch", "torch-pruning")
    module_fields = ("ignored_layers",)

    @classmethod
    def check(cls, params, *, recipe, variant, where, field):
        if params.method == "structured":
            # A transformer whose layers the pruner does not know fails here, not after minutes of work.
            skeleton = recipe.skeleton()
            if skeleton is not None:
                why = unsupported_decoder_pruning(skeleton) if is_causal_lm(skeleton) \
                    else unsupported_for_pruning(skeleton)
                if why:
                    raise field_error(where, f"{field}.method", why, value="structured",
                                      accepted=["unstructured", "2:4"])
        if params.method == "structured" and _kind_is_transformer(recipe):
            if params.importance == "taylor":
                raise field_error(where, f"{field}.importance", "transformer pruning ranks FFN channels and heads by "
                                  "weight magnitude or by their activations", value=params.importance,
                                  accepted=["magnitude", "activation"])
            if params.importance == "activation" and recipe.task.type == "none":
                raise field_error(where, f"{field}.importance", "needs the task's training batches: set a task with "
                                  "data, or use magnitude", value=params.importance)
            if not params.targets:
                raise field_error(where, f"{field}.targets", "names nothing to prune", value=[],
                                  accepted=["ffn", "heads"])

    def run(self, model, params, ctx):
        p = PruneParams.model_validate(params)
        decoder = p.method == "structured" and is_causal_lm(model.module)
        if decoder:  # before the encoder checks, which would reject a decoder as an unknown encoder
            why = unsupported_decoder_pruning(model.module)
            if why:
                raise ValueError(why)
        elif p.method == "structured":
            why = unsupported_for_pruning(model.module)
            if why:
                raise ValueError(why)
            if p.importance == "activation" and not encoder_layers(model.module):
                raise ValueError("importance 'activation' ranks FFN channels and heads of transformer encoders, and "
                                 "this model has none; use magnitude (or taylor, for a classifier with labels)")
        module = copy.deepcopy(model.module).eval()
        if decoder:
            _decoder(module, model.module, p, ctx)
        elif p.method == "structured" and encoder_layers(module):
            _transformer(module, model.module, p, ctx)
        elif p.method == "structured":
            _structured(module, model.io, p, ctx)
        else:
            _masked(module, p, ctx)
        model.module = module
        return model


def _transformer(module, teacher, p: PruneParams, ctx) -> None:
    """FFN channels with torch-pruning's linear pruners (the up projection's outputs, the down
    projection's matching inputs), heads with Hugging Face's prune_heads; the config follows, so
    save_pretrained / from_pretrained round-trip. Layers are found by structure (core.encoders), so
    BERT, RoBERTa, DistilBERT and ViT take the same path.

    With importance 'activation' the layers are pruned one after another, front to back. Each is
    ranked on the activations the already-pruned model feeds it, and its output projections are
    refit so that each residual sum matches the unpruned model's: the refit of layer i also absorbs
    the error that layers before it left in the residual stream, instead of letting errors compound
    through the depth."""
    import torch
    import torch_pruning as tp

    from compress.capture import layer_inputs, next_inputs, real_tokens

    layers = encoder_layers(module)
    hf = next(m for m in module.modules() if hasattr(m, "prune_heads") and hasattr(m, "config"))
    cfg = hf.config
    n_heads = layers[0].heads
    size = layers[0].q.out_features // n_heads
    before = sum(x.numel() for x in module.parameters())
    if "heads" in p.targets and (getattr(cfg, "pruned_heads", None) or len({x.heads for x in layers}) > 1):
        raise ValueError("this model's heads were pruned already (config.pruned_heads); prune heads in one step")
    n_stats = STATS_BATCHES // 4 if ctx.quick else STATS_BATCHES  # --quick: a smoke run
    batches = (ctx.task.train_batches if ctx.task else [])[:n_stats] if p.importance == "activation" else None
    if p.importance == "activation" and not batches:
        raise ValueError("importance 'activation' needs the task's training batches, and there are none")
    t_layers = encoder_layers(teacher.eval()) if batches else None
    ctx.notes["importance"] = p.importance
    ctx.notes["layout"] = layers[0].family
    n_drop = min(n_heads - 1, int((p.head_ratio if p.head_ratio is not None else p.ratio) * n_heads)) \
        if "heads" in p.targets else 0
    if "ffn" in p.targets:
        width = layers[0].up.out_features
        keep = max(1, round(width * (1 - p.ratio)))
        if p.round_to:
            keep = max(p.round_to, keep // p.round_to * p.round_to)
    tokens = 0
    if batches:  # what reaches layer 0 of each model; after each layer, what the next one gets
        s_in, t_in = layer_inputs(module, layers[0].block, batches), layer_inputs(teacher, t_layers[0].block, batches)
        masks = [real_tokens(b).reshape(-1) for b in batches]
    for i, layer in enumerate(layers):
        if batches and i:
            s_in, t_in = next_inputs(layers[i - 1].block, s_in), next_inputs(t_layers[i - 1].block, t_in)
        if n_drop:
            o = layer.o.weight.detach()
            pair = _paired_stats((layer.block, layer.o, layer.attn_sum, s_in),
                                 (t_layers[i].block, t_layers[i].o, t_layers[i].attn_sum, t_in), masks) \
                if batches else None
            with torch.no_grad():
                if pair:  # the variance of what each head adds to the attention output
                    cov = _covariance(pair[0])
                    score = [float(((o[:, sl].double() @ cov[sl, sl]) * o[:, sl].double()).sum())
                             for sl in (slice(h * size, (h + 1) * size) for h in range(n_heads))]
                else:  # the weights that compute the head and the weights that read it
                    score = [sum(float(w[h * size:(h + 1) * size].norm()) for w in
                                 (layer.q.weight, layer.k.weight, layer.v.weight))
                             + float(o[:, h * size:(h + 1) * size].norm()) for h in range(n_heads)]
            drop = sorted(range(n_heads), key=lambda h: score[h])[:n_drop]
            hf.prune_heads({i: drop})  # also records config.pruned_heads, so save/from_pretrained round-trips
            if pair:  # prune_heads keeps the remaining heads in their order, as the refit does
                kept = [d for h in range(n_heads) if h not in drop for d in range(h * size, (h + 1) * size)]
                _set(layer.o, *_refit(*pair, kept))
                tokens = int(pair[0][-1, -1])
        if "ffn" in p.targets:
            w_in, w_out = layer.up.weight, layer.down.weight
            pair = _paired_stats((layer.block, layer.down, layer.ffn_sum, s_in),
                                 (t_layers[i].block, t_layers[i].down, t_layers[i].ffn_sum, t_in), masks) \
                if batches else None
            with torch.no_grad():
                if pair:  # how much what the channel adds to the output varies around its mean
                    importance = _covariance(pair[0]).diagonal().float() * (w_out.detach() ** 2).sum(0)
                else:  # the weights that write the channel and the weights that read it
                    importance = w_in.detach().norm(dim=1) * w_out.detach().norm(dim=0)
            drop = importance.argsort()[:width - keep].tolist()
            if drop:
                with torch.no_grad():
                    tp.prune_linear_out_channels(layer.up, drop)
                    tp.prune_linear_in_channels(layer.down, drop)
            if pair:  # torch-pruning keeps the remaining channels in their order, as the refit does
                _set(layer.down, *_refit(*pair, sorted(set(range(width)) - set(drop))))
                tokens = int(pair[0][-1, -1])
    if "ffn" in p.targets:
        setattr(cfg, layers[0].ffn_config_attr, keep)
        ctx.notes["intermediate_size"] = _before_after(width, keep)
    if "heads" in p.targets:
        ctx.notes["heads"] = _before_after(n_heads, n_heads - n_drop)
    if tokens:
        ctx.notes["refit"] = f"least squares, layer by layer, on {tokens} training tokens"
    after = sum(x.numel() for x in module.parameters())
    ctx.notes.update(params_before=int(before), params_after=int(after))


def _before_after(before: int, after: int) -> dict:
    """A width per layer before and after pruning, as the notes give it: named, since a pair such as [4, 2] reads as
    two layers' values."""
    return {"per_layer_before": int(before), "per_layer_after": int(after)}


def _decoder(module, teacher, p: PruneParams, ctx) -> None:
    """Decoder LMs, layers found by structure (core.decoders). FFN channels leave the input
    projections (Llama's gate and up, GPT-2's c_fc) and the down projection's inputs; heads leave as
    whole key/value heads with their group of query heads, so grouped-query attention keeps its group
    size, and every layer keeps the same count (the KV cache has one shape). The config follows
    (intermediate_size / n_inner; num_attention_heads, num_key_value_heads and an explicit head_dim,
    so the head size stays), so save_pretrained / from_pretrained round-trip; GPT-2's heads go through
    Hugging Face's prune_heads, which records them in config.pruned_heads instead.

    Ranking and the layer-by-layer refit are the encoders' (see _transformer). Llama's projections
    have no bias: there the refit fits none, and activations rank by second moments."""
    import torch

    from compress.capture import layer_inputs, next_inputs, real_tokens

    if p.importance == "taylor":
        raise ValueError("decoder LMs are pruned by importance magnitude or activation, not taylor")
    layers = decoder_layers(module)
    hf, first = module.model, layers[0]
    cfg = hf.config
    before = sum(x.numel() for x in module.parameters())
    n_stats = STATS_BATCHES // 4 if ctx.quick else STATS_BATCHES  # --quick: a smoke run
    batches = (ctx.task.train_batches if ctx.task else [])[:n_stats] if p.importance == "activation" else None
    if p.importance == "activation" and not batches:
        raise ValueError("importance 'activation' needs the task's training batches, and there are none")
    t_layers = decoder_layers(teacher.eval()) if batches else None
    ctx.notes.update(importance=p.importance, layout=first.family)
    n_kv, group, drop_kv = first.kv_heads, first.heads // first.kv_heads, 0
    if "heads" in p.targets:
        if getattr(cfg, "pruned_heads", None) or len({(x.heads, x.kv_heads) for x in layers}) > 1:
            raise ValueError("this model's heads were pruned already (config.pruned_heads); prune heads in one step")
        if first.family == "gpt2" and not hasattr(hf.base_model, "_prune_heads"):
            raise ValueError("this transformers version has no prune_heads for GPT-2; use targets: [ffn]")
        drop_kv = min(n_kv - 1, int((p.head_ratio if p.head_ratio is not None else p.ratio) * n_kv))
    if "ffn" in p.targets:
        width, round_to = weight(first.down).shape[1], p.round_to or DECODER_ROUND_TO
        keep = min(width, max(round_to, round(width * (1 - p.ratio)) // round_to * round_to))
    tokens = 0
    if batches:  # what reaches layer 0 of each model; after each layer, what the next one gets
        s_in, t_in = layer_inputs(module, first.block, batches), layer_inputs(teacher, t_layers[0].block, batches)
        masks = [real_tokens(b).reshape(-1) for b in batches]
    for i, layer in enumerate(layers):
        if batches and i:
            s_in, t_in = next_inputs(layers[i - 1].block, s_in), next_inputs(t_layers[i - 1].block, t_in)
        t = t_layers[i] if batches else None
        if drop_kv:
            pair = _paired_stats((layer.block, layer.o, layer.attn_sum, s_in), (t.block, t.o, t.attn_sum, t_in),
                                 masks) if batches else None
            wo, size = weight(layer.o).detach().double(), group * layer.head_dim
            with torch.no_grad():
                if pair:  # the variance of what each key/value head's query group adds to the output
                    cov = _covariance(pair[0], centered=layer.o.bias is not None)
                    score = [float(((wo[:, sl] @ cov[sl, sl]) * wo[:, sl]).sum())
                             for sl in (slice(j * size, (j + 1) * size) for j in range(n_kv))]
                else:  # the weights that compute the heads and the weights that read them
                    score = [float(wo[:, j * size:(j + 1) * size].norm()) + sum(
                        float(weight(proj)[r].norm()) for proj, r in zip(layer.qkv, _head_rows(layer, [j])[0]))
                        for j in range(n_kv)]
            kept = sorted(sorted(range(n_kv), key=lambda j: score[j])[drop_kv:])
            rows, cols = _head_rows(layer, kept)
            if layer.family == "gpt2":  # replaces c_attn and c_proj, and records the heads in config.pruned_heads
                hf.prune_heads({i: [j for j in range(n_kv) if j not in kept]})
                layer = decoder_layer(layer.block)
            else:
                for proj, r in zip(layer.qkv, rows):
                    _keep(proj, r, "out")
                _keep(layer.o, cols, "in")
            if pair:  # both keep the remaining heads in their order, as the refit does
                _set(layer.o, *_refit(*pair, cols, bias=layer.o.bias is not None))
                tokens = int(pair[0][-1, -1])
        if "ffn" in p.targets:
            pair = _paired_stats((layer.block, layer.down, layer.ffn_sum, s_in),
                                 (t.block, t.down, t.ffn_sum, t_in), masks) if batches else None
            w_out = weight(layer.down).detach()
            with torch.no_grad():
                if pair:  # how much what the channel adds to the output varies
                    importance = (_covariance(pair[0], centered=layer.down.bias is not None).diagonal().float()
                                  * (w_out ** 2).sum(0))
                else:  # the weights that write the channel (gate and up) and the weights that read it
                    importance = w_out.norm(dim=0)
                    for proj in layer.up:
                        importance = importance * weight(proj).detach().norm(dim=1)
            kept = sorted(importance.argsort(descending=True)[:keep].tolist())
            for proj in layer.up:
                _keep(proj, kept, "out")
            _keep(layer.down, kept, "in")
            if pair:
                _set(layer.down, *_refit(*pair, kept, bias=layer.down.bias is not None))
                tokens = int(pair[0][-1, -1])
    if "ffn" in p.targets:
        setattr(cfg, first.ffn_config_attr, keep)
        ctx.notes.update(intermediate_size=_before_after(width, keep), round_to=round_to)
        if not p.round_to:
            ctx.notes["round_to_why"] = "the default for decoders: bitsandbytes' 4-bit CPU kernel needs " \
                                        "out_features % 32 == 0"
    if "heads" in p.targets:
        ctx.notes.update(heads=_before_after(first.heads, group * (n_kv - drop_kv)),
                         kv_heads=_before_after(n_kv, n_kv - drop_kv))
        if drop_kv and first.family == "gpt2":
            ctx.notes["heads_config"] = "GPT-2 keeps n_head as it was; config.pruned_heads lists the removed heads"
        elif drop_kv:
            cfg.num_attention_heads, cfg.num_key_value_heads = group * (n_kv - drop_kv), n_kv - drop_kv
            cfg.head_dim = first.head_dim  # else it would be derived again as hidden_size // heads
    if tokens:
        ctx.notes["refit"] = f"least squares, layer by layer, on {tokens} training tokens"
    after = sum(x.numel() for x in module.parameters())
    ctx.notes.update(params_before=int(before), params_after=int(after))


def _head_rows(layer, groups: list[int]):
    """For these key/value heads with their query heads: the output rows to keep of each of
    layer.qkv (GPT-2's fused c_attn is laid out [q | k | v]) and the matching input columns of o."""
    hd, g = layer.head_dim, layer.heads // layer.kv_heads
    q = [d for j in groups for d in range(j * g * hd, (j + 1) * g * hd)]  # query head j*g + r reads kv head j
    kv = [d for j in groups for d in range(j * hd, (j + 1) * hd)]
    if len(layer.qkv) == 1:
        n = layer.heads * hd
        return [q + [n + d for d in kv] + [2 * n + d for d in kv]], q
    return [q, kv, kv], q


def _keep(proj, idx: list[int], side: str) -> None:
    """Keep only these output ("out") or input ("in") channels of an nn.Linear or a Conv1D, in place:
    the DecoderLayer that holds the projection stays valid (torch-pruning knows no Conv1D)."""
    import torch

    linear = isinstance(proj, torch.nn.Linear)
    dim = (side == "out") != linear  # Linear weights are (out, in), Conv1D weights (in, out)
    idx = torch.as_tensor(idx, dtype=torch.long)
    proj.weight = torch.nn.Parameter(proj.weight.detach().index_select(int(dim), idx).contiguous())
    if side == "out" and proj.bias is not None:
        proj.bias = torch.nn.Parameter(proj.bias.detach()[idx].contiguous())
    if linear:
        proj.out_features, proj.in_features = proj.weight.shape
    else:
        proj.nx, proj.nf = proj.weight.shape


def _paired_stats(student, teacher, masks):
    """For an output projection and the residual sum it feeds (proj(x) + residual), over the real
    tokens of some training batches: the Gram matrix of the student's input x with a column of ones
    appended (so means come with it), and its cross product with the target of a refit, the
    teacher's sum minus the student's residual. `student` and `teacher` are (layer, projection,
    (module, "input" | "output") where the sum is read, the layer's inputs per batch): only the
    layer runs, as far as the sum. The residual is the sum minus the projection's output, so no
    family's block signature is assumed."""
    import torch

    from compress.capture import StopForward, call_until

    sums, seen = {}, {}

    def tap(role):
        def on_proj(mod, args, out):
            seen[role + "_x"], seen[role + "_y"] = args[0].detach(), out.detach()

        def on_sum(total):
            total = (total[0] if isinstance(total, tuple) else total).detach()
            if role == "teacher":
                seen["target"] = total
                raise StopForward
            x, y = seen["student_x"], seen["student_y"]
            rows = x.reshape(-1, x.shape[-1])
            mask = seen["mask"] if seen["mask"].numel() == len(rows) else torch.ones(len(rows), dtype=torch.bool)
            x = rows[mask]
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
            residual = total - y
            y = (seen["target"] - residual).reshape(-1, residual.shape[-1])[mask]
            for key, value in (("gram", x.T @ x), ("cross", x.T @ y)):  # a batch in float32, the sum in float64
                sums[key] = sums[key] + value.double() if key in sums else value.double()
            raise StopForward
        return on_proj, on_sum

    hooks = []
    for role, (layer, proj, (where, side), _) in (("teacher", teacher), ("student", student)):
        on_proj, on_sum = tap(role)
        hooks.append(proj.register_forward_hook(on_proj))
        hooks.append(where.register_forward_pre_hook(lambda mod, args, f=on_sum: f(args[0])) if side == "input"
                     else where.register_forward_hook(lambda mod, args, out, f=on_sum: f(out)))
    try:
        for mask, t_args, s_args in zip(masks, teacher[3], student[3]):
            seen["mask"] = mask
            call_until(teacher[0], *t_args)
            call_until(student[0], *s_args)
    finally:
        for h in hooks:
            h.remove()
    return sums["gram"], sums["cross"]


def _covariance(gram, centered: bool = True):
    """Covariance of the inputs from a Gram matrix whose last row and column are the ones column;
    not centered: second moments, what an input varies around zero (a projection with no bias cannot
    absorb its mean)."""
    n = gram[-1, -1]
    if not centered:
        return gram[:-1, :-1] / n
    mean = gram[:-1, -1] / n
    return gram[:-1, :-1] / n - mean[:, None] * mean[None, :]


def _refit(gram, cross, keep: list[int], bias: bool = True):
    """Weights (out, in) and bias over the kept inputs that best reproduce the target (least squares,
    lightly ridged). Removing a channel then costs only what the kept ones cannot express of it.
    bias=False: for a projection without one (Llama's), which cannot gain one and still load."""
    import torch

    idx = torch.tensor(list(keep) + ([gram.shape[0] - 1] if bias else []))
    lhs, rhs = gram[idx][:, idx], cross[idx]
    ridge = 1e-5 * lhs.diagonal()[:len(keep)].mean() * torch.eye(len(idx), dtype=lhs.dtype)
    if bias:
        ridge[-1, -1] = 0  # the bias is free
    sol = torch.linalg.solve(lhs + ridge, rhs)
    w = sol[:len(keep)].T.float().contiguous()
    return (w, sol[-1].float().contiguous()) if bias else (w, None)


def _set(proj, weight, bias) -> None:
    """Weight (out, in) and bias into an nn.Linear or a Conv1D (whose weight is (in, out))."""
    import torch

    proj.weight.data = weight if isinstance(proj, torch.nn.Linear) else weight.T.contiguous()
    if bias is not None:
        proj.bias.data = bias


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
    with library_prints("torch_pruning"):
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
    if after_params >= before_params:
        # A variant identical to its parent would be measured and reported as if pruned at `ratio`.
        kinds = sorted({type(m).__name__ for m in module.modules() if isinstance(m, (nn.RNNBase, nn.MultiheadAttention))})
        raise ValueError(f"structured pruning at ratio {p.ratio} removed nothing: torch-pruning found no channel it "
                         "could remove (the layer that makes the output keeps its width"
                         + (f"; {', '.join(kinds)} layers are not pruned by channel" if kinds else "")
                         + "). Use method: unstructured, or a model with prunable Linear / Conv layers")


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
    ctx.notes["achieved_sparsity"] = round(zeros / max(total, 1), 4)  # of the Linear / Conv weights it prunes
    # What the whole model holds: weights of other layers (RNNs, attention's packed projections, embeddings)
    # are not pruned, so a model made mostly of them is far less sparse than `ratio` says.
    pruned = {id(m.weight) for m, _ in layers}
    others = {id(w): w for w in module.parameters() if w.dim() >= 2 and id(w) not in pruned}
    every = total + sum(w.numel() for w in others.values())
    ctx.notes["model_sparsity"] = round(zeros / max(every, 1), 4)
    if others and total < every / 2:
        kinds = sorted({type(m).__name__ for m in module.modules()
                        if any(id(w) in others for w in m.parameters(recurse=False))})
        ctx.notes["not_pruned"] = (f"{every - total} of {every} weights are in layers this method does not prune "
                                   f"({', '.join(kinds)}): the model is {ctx.notes['model_sparsity']:.0%} zeros")
    ctx.notes["speedup_note"] = "zeros in dense weights: dense kernels run at the same speed"
