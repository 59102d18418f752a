"""Knowledge distillation: train the current variant (student) against an earlier variant
(teacher). Classifiers: KL divergence on temperature-scaled logits plus cross-entropy on the labels;
embedding models: cosine or MSE to the teacher's embeddings (no labels needed); causal LMs: KL
divergence of next-token distributions, token by token, plus cross-entropy on the text. The last
tenth of the training split is held out for early stopping, so the evaluation split never steers
training."""
from __future__ import annotations

import copy
from typing import Literal, Optional

from pydantic import Field

from core.encoders import encoder_layers
from core.errors import field_error
from core.lm import is_causal_lm
from core.steps import Step, StepParams, register


class DistillParams(StepParams):
    teacher: str = Field("baseline", description="the variant whose outputs the student learns")
    epochs: int = Field(3, gt=0, description="passes over the training batches (`--quick`: 1)")
    lr: float = Field(1e-3, gt=0, description="learning rate of the AdamW optimiser (the peak, with "
                      "`schedule: onecycle`)")
    batch_size: int = Field(64, gt=0, description="for inputs of fixed shape; text keeps the task's batches")
    max_steps: Optional[int] = Field(None, gt=0, description="stop after this many optimiser steps")
    loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="auto: kl (+ task loss) for classifiers and causal LMs (per token, on next-token "
        "distributions), cosine for embedding models")
    temperature: float = Field(4.0, gt=0, description="softens both distributions for the KL term")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term; 1 - alpha on the labels "
                         "(causal LMs: on next-token cross-entropy of the training text; 1: KL alone)")
    patience: int = Field(2, ge=0, description="epochs without improvement on the held-out tenth before stopping")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_batches: Optional[int] = Field(None, gt=1, description="use at most this many batches of the training "
                                       "split (the teacher runs over each once); --quick uses at most 8")
    hidden_weight: float = Field(0.0, ge=0, description="transformer encoders: weight of a layer-by-layer MSE "
                                 "between student and teacher hidden states (same depth and width, as FFN / head "
                                 "pruning leaves them); guides a heavily pruned student far faster than the "
                                 "output alone")
    schedule: Literal["constant", "onecycle"] = Field(
        "constant", description="learning rate: constant, or one cycle (warm up over the first tenth of the "
        "steps to lr, then anneal to zero)")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="dropout probability while training "
                                     "(default: the model's own; 0 makes the student fit the teacher's "
                                     "deterministic outputs)")
    freeze_embeddings: bool = Field(False, description="keep token embedding tables fixed (most of a small "
                                    "encoder's parameters; pruning does not touch them)")
    layerwise_epochs: int = Field(0, ge=0, description="transformer encoders: before end-to-end training, train "
                                  "each encoder layer in turn, front to back, to reproduce the teacher layer's "
                                  "output from the input the already-trained student layers give it (this many "
                                  "passes over the batches per layer). A step costs one layer's forward and "
                                  "backward, and errors stop compounding through the depth; needs the same depth "
                                  "and width in teacher and student, as FFN / head pruning leaves them")
    layerwise_lr: float = Field(5e-4, gt=0, description="peak learning rate of the layer-by-layer phase "
                                "(one cycle per layer)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where teacher and student run while training: auto takes the GPU when torch "
        "sees one; the student is handed back on the CPU either way")


@register
class Distill(Step):
    name = "distill"
    details = (
        'The last tenth of the training split is held out for early stopping (the best epoch is kept), so '
        'evaluation rows never steer training. `--quick`: one epoch, at most 8 batches. Causal LMs: the '
        "teacher's logits are computed batch by batch; `hidden_weight` and `layerwise_epochs` are refused. "
        'The notes keep, per epoch, the held-out score and the seconds spent.'
    )
    summary = ("knowledge distillation from another variant (KL + labels, per-token KL for causal LMs, or "
               "cosine/MSE on embeddings)")
    Params = DistillParams
    consumes = "torch"
    libraries = ("torch", "transformers")

    @classmethod
    def references(cls, params: dict) -> list[str]:
        return [params.get("teacher", "baseline")]

    @classmethod
    def unfit(cls, params: dict, module) -> Optional[str]:
        from core.encoders import encoder_layers

        asked = [k for k in ("hidden_weight", "layerwise_epochs") if params.get(k)]
        if asked and not encoder_layers(module):
            return (f"{asked[0]} matches a transformer encoder's layers, and this model has none that the workbench "
                    "knows: set it to 0")
        return None

    @classmethod
    def check(cls, params, *, recipe, variant, where, field):
        if params.teacher not in recipe.variants:
            raise field_error(where, f"{field}.teacher", "names no variant", value=params.teacher,
                              accepted=[n for n in recipe.variants if n != variant])
        if params.teacher == variant or variant in _ancestors(recipe, params.teacher):
            raise field_error(where, f"{field}.teacher", "must be computed before this variant (not itself or "
                              "one of its descendants)", value=params.teacher)
        if recipe.task.type == "none":
            raise field_error(where, field, "needs training data: set a task with data", value="task.type: none")

    def run(self, model, params, ctx):
        p = DistillParams.model_validate(params)
        teacher = ctx.lookup(p.teacher)
        if teacher is None:
            raise ValueError(f"teacher variant '{p.teacher}' is not available (it failed)")
        student = copy.deepcopy(model.module)
        if any(getattr(m, "_packed_params", None) is not None for m in student.modules()):
            raise ValueError("the student has quantized layers, which cannot train: distill before quantizing")
        epochs = min(p.epochs, 1) if ctx.quick else p.epochs
        device = _device(p.device)
        # The teacher is another variant's module, shared with the rest of the run: it goes back to
        # the CPU afterwards, as it came.
        teacher_module = teacher.module if teacher.format == "torch" else None
        try:
            if teacher_module is not None:
                teacher_module.to(device)
            student.to(device)
            ctx.notes.update(_train(student, teacher, p, ctx, epochs, device))
        finally:
            if teacher_module is not None:
                teacher_module.to("cpu")
            student.to("cpu")
        ctx.notes["device"] = _device_name(device)
        model.module = student.eval()
        return model


def _device(choice: str):
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("distill.device is 'cuda' but torch sees no CUDA device here; use auto or cpu")
    return torch.device("cuda" if choice in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _ancestors(recipe, name: str) -> set[str]:
    seen = set()
    cur = recipe.variants[name].from_
    while cur is not None and cur not in seen:
        seen.add(cur)
        cur = recipe.variants[cur].from_
    return seen


def _rebatch(batches, labels, batch_size):
    """Concatenate fixed-shape batches and cut them again at batch_size; leave text batches alone."""
    import numpy as np

    shapes = {tuple(v.shape[1:]) for b in batches for v in b.values()}
    if len(shapes) > len(batches[0]):  # shapes vary between batches (padded text): keep them
        return batches, labels
    arrays = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)], labels


class _LayerTap:
    """Collects the hidden states each encoder layer outputs during a forward pass."""

    def __init__(self, layers):
        self.states: list = []
        self.hooks = [layer.register_forward_hook(self._hook) for layer in layers]

    def _hook(self, module, inputs, out):
        self.states.append(out[0] if isinstance(out, tuple) else out)

    def take(self) -> list:
        states, self.states = self.states, []
        return states

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def _encoder_layers(teacher, student, name: str) -> tuple[list, list]:
    """The matching layers of teacher and student for hidden-state distillation, or a clear error."""
    if teacher.format != "torch":
        raise ValueError(f"hidden_weight needs a PyTorch teacher; '{name}' is an ONNX graph")
    t_layers, s_layers = encoder_layers(teacher.module), encoder_layers(student)
    if not t_layers or len(t_layers) != len(s_layers):
        raise ValueError(f"hidden_weight needs teacher and student encoders of the same depth (encoder layers: "
                         f"teacher {len(t_layers)}, student {len(s_layers)}); set hidden_weight: 0")
    widths = {layer.down.out_features for layer in t_layers + s_layers}
    if len(widths) != 1:
        raise ValueError(f"hidden_weight needs the same hidden size in teacher and student, found {sorted(widths)}")
    return [x.block for x in t_layers], [x.block for x in s_layers]


def _teacher_hidden(teacher, layers, batches, device) -> tuple:
    """The teacher's outputs and, per batch, its layers' hidden states (float16 to halve the memory),
    kept on `device`."""
    import numpy as np
    import torch

    from core.progress import progress

    tap, outs, hidden = _LayerTap(layers), [], []
    try:
        with torch.inference_mode():
            for b in progress(batches, desc="teacher outputs and hidden states", unit="batch", leave=False):
                outs.append(teacher.module(**{k: torch.from_numpy(v).to(device) for k, v in b.items()})
                            .float().cpu().numpy())
                hidden.append([h.half() for h in tap.take()])
    finally:
        tap.close()
    return np.concatenate(outs), hidden


class _TrainingSettings:
    """Dropout override and frozen embeddings for the length of training, then put back as found."""

    def __init__(self, module, p: DistillParams):
        from torch import nn

        self.module, self.p, self.saved = module, p, []
        self.nn = nn

    def __enter__(self):
        for m in self.module.modules():
            if self.p.dropout is not None and isinstance(m, self.nn.Dropout):
                self.saved.append((m, "p", m.p))
                m.p = self.p.dropout
            # Attention dropout inside fused SDPA kernels is a float attribute, not a Dropout module.
            if self.p.dropout is not None and isinstance(getattr(m, "dropout_prob", None), float):
                self.saved.append((m, "dropout_prob", m.dropout_prob))
                m.dropout_prob = self.p.dropout
            if self.p.freeze_embeddings and isinstance(m, self.nn.Embedding):
                self.saved.append((m.weight, "requires_grad", m.weight.requires_grad))
                m.weight.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for obj, attr, value in reversed(self.saved):
            setattr(obj, attr, value)


def _train(student, teacher, p: DistillParams, ctx, epochs: int, device) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from runtime.infer import torch_outputs, variant_outputs

    task = ctx.task
    lm = is_causal_lm(student)
    if lm:
        _check_lm(teacher, p)
    # A causal LM keeps the task's batches: logits are batch x tokens x vocabulary, and batch_size
    # rows of them at once could exhaust the memory.
    batches, labels = (task.train_batches, None) if lm else _rebatch(task.train_batches, task.train_labels,
                                                                    p.batch_size)
    limit = min(p.max_batches or len(batches), 8 if ctx.quick else len(batches))
    batches = batches[:limit]  # labels stay aligned: they are indexed from the start
    tap = None
    if p.hidden_weight > 0 or p.layerwise_epochs:
        t_layers, s_layers = _encoder_layers(teacher, student, p.teacher)
        teacher_out, teacher_hidden = _teacher_hidden(teacher, t_layers, batches, device)
    elif lm:  # the teacher runs batch by batch in tensors(): all of its logits at once would not fit
        teacher_out = None
    elif teacher.format == "torch":
        teacher_out = torch_outputs(teacher.module, batches, device)
    else:
        teacher_out = variant_outputs(teacher, batches)
    sizes = [len(next(iter(b.values()))) for b in batches]
    starts = np.cumsum([0] + sizes)
    n_val = max(1, len(batches) // 10)
    train_idx, val_idx = list(range(len(batches) - n_val)), list(range(len(batches) - n_val, len(batches)))
    classifier = model_is_classifier = (task.type == "classification")
    loss_kind = p.loss if p.loss != "auto" else ("kl" if classifier or lm else "cosine")

    def tensors(i):
        x = {k: torch.from_numpy(v).to(device) for k, v in batches[i].items()}
        if lm:  # the batch itself stands for the labels: the next tokens and the mask
            with torch.no_grad():
                return x, teacher.module(**x).float(), x
        t = torch.from_numpy(teacher_out[starts[i]:starts[i + 1]]).to(device)
        y = torch.from_numpy(np.asarray(labels[starts[i]:starts[i + 1]])).to(device) if labels is not None else None
        return x, t, y

    def loss_fn(out, t, y):
        if lm:
            return _lm_loss(out, t, y, p.temperature, p.alpha)
        if loss_kind == "kl":
            T = p.temperature
            kd = F.kl_div(F.log_softmax(out / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
            if y is not None and model_is_classifier:
                return p.alpha * kd + (1 - p.alpha) * F.cross_entropy(out, y)
            return kd
        if loss_kind == "mse":
            return F.mse_loss(out, t)
        return (1 - F.cosine_similarity(out, t, dim=-1)).mean()

    def hidden_loss(i, x):
        """Mean over layers of the per-element MSE on real (unpadded) tokens."""
        states = tap.take()
        mask = _token_mask(batches[i], device)
        return torch.stack([_masked_mse(s, t, mask) for s, t in zip(states, teacher_hidden[i])]).mean()

    def validate() -> float:
        """Higher is better: accuracy on the held-out tenth, cosine to the teacher, or (causal LMs)
        minus the mean KL to the teacher's next-token distributions, unscaled (temperature 1), as the
        bench measures it."""
        student.eval()
        with torch.no_grad():
            scores = []
            for i in val_idx:
                x, t, y = tensors(i)
                out = student(**x)
                if tap:
                    tap.take()
                scores.append(-_token_kl(out, t, y["attention_mask"]).item() if lm
                              else (out.argmax(-1) == y).float().mean().item() if (classifier and y is not None)
                              else F.cosine_similarity(out, t, dim=-1).mean().item())
        return float(np.mean(scores))

    torch.manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    layerwise, untrained = {}, None
    if p.layerwise_epochs:
        untrained = (validate(), copy.deepcopy(student.state_dict()))
        layerwise_epochs = min(p.layerwise_epochs, 1) if ctx.quick else p.layerwise_epochs
        layerwise = _layerwise(student, s_layers, [batches[i] for i in train_idx],
                               [teacher_hidden[i] for i in train_idx], p.layerwise_lr, layerwise_epochs, rng, ctx,
                               device)
    if p.hidden_weight > 0:
        tap = _LayerTap(s_layers)
    try:
        best, best_state, start_score, steps, history, best_epoch = _loop(
            student, p, epochs, train_idx, rng, ctx, tensors, loss_fn, hidden_loss if tap else None, validate)
    finally:
        if tap:
            tap.close()
    # Training that only hurt the held-out tenth (or diverged to NaN) hands back the student as it came.
    reverted = bool(untrained) and not best >= untrained[0]
    if reverted:
        best, best_state = untrained
    student.load_state_dict(best_state)  # the best epoch on the held-out tenth, not the last one
    before = untrained[0] if untrained else start_score
    kept = reverted or (best_epoch == 0 and not layerwise)  # the weights the student came with
    after = ", ".join(f"{h['val']:.5g}" for h in history) or "no epoch"
    return {**({"warning": f"no epoch beat the student as it came on the held-out tenth ({before:.5g}, then "
                           f"{after}): its starting weights were kept, so this variant is its parent's model. Try "
                           "a lower lr or more epochs"} if kept else {}),
            "teacher": p.teacher, "loss": loss_kind, "hidden_weight": p.hidden_weight, "epochs_run": len(history),
            "steps": steps, "batches": len(batches),
            "val_before": round(untrained[0] if untrained else start_score, 5), "val_best": round(best, 5),
            "history": history,
            **({"layerwise": {**layerwise, "val_after": round(start_score, 5)}} if layerwise else {})}


def _check_lm(teacher, p: DistillParams) -> None:
    """What distilling a causal LM needs: a PyTorch teacher that runs alongside it, and the KL loss."""
    if teacher.format != "torch" or not is_causal_lm(teacher.module):
        raise ValueError(f"a causal LM distils from a causal LM in PyTorch, run batch by batch beside it; "
                         f"'{p.teacher}' is not one")
    if p.loss not in ("auto", "kl"):
        raise ValueError(f"a causal LM distils with loss kl (or auto), not {p.loss}")
    if p.hidden_weight > 0 or p.layerwise_epochs:
        raise ValueError("hidden_weight and layerwise_epochs are for transformer encoders; set them to 0 for a "
                         "causal LM")


def _token_kl(out, t, mask, temperature: float = 1.0):
    """Mean over real tokens (mask (batch, tokens)) of KL(teacher || student) between the
    temperature-scaled next-token distributions at each position."""
    import torch.nn.functional as F

    kl = F.kl_div(F.log_softmax(out.float() / temperature, -1), F.log_softmax(t / temperature, -1),
                  reduction="none", log_target=True).sum(-1)
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def _lm_loss(out, t, batch: dict, temperature: float, alpha: float):
    """alpha x the per-token KL (x T^2, so gradients keep their scale across temperatures) plus
    1 - alpha x the cross-entropy of the real next tokens (position i predicts token i + 1)."""
    import torch.nn.functional as F

    kd = _token_kl(out, t, batch["attention_mask"], temperature) * temperature ** 2
    if alpha >= 1:
        return kd
    ids, mask = batch["input_ids"], batch["attention_mask"].bool()
    labels = ids[:, 1:].masked_fill(~(mask[:, 1:] & mask[:, :-1]), -100)
    ce = F.cross_entropy(out[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return alpha * kd + (1 - alpha) * ce


def _masked_mse(out, target, mask):
    """Per-element MSE over the real (unpadded) tokens; mask is (batch, tokens, 1)."""
    return ((out - target.float()) ** 2 * mask).sum() / (mask.sum() * out.shape[-1])


def _token_mask(batch: dict, device=None):
    """(batch, tokens, 1) float weights of the real tokens, for _masked_mse."""
    from compress.capture import real_tokens

    return real_tokens(batch, device).unsqueeze(-1).float()


def _layerwise(student, layers, batches, teacher_hidden, lr: float, epochs: int, rng, ctx, device) -> dict:
    """Block-wise reconstruction: layer i of the student learns, with the others frozen, to turn the
    input that layers 0..i-1 of the (already trained) student give it into what layer i of the
    teacher outputs. Each layer thus also corrects the error its predecessors left, and a training
    step costs one layer's forward and backward instead of the whole model's. Dropout is off: the
    layer fits the teacher's deterministic outputs."""
    import numpy as np
    import torch
    from core.progress import progress

    from compress.capture import layer_inputs, next_inputs

    import time

    t0 = time.perf_counter()
    was_training, saved = student.training, [(w, w.requires_grad) for w in student.parameters()]
    student.eval()
    for w in student.parameters():
        w.requires_grad_(False)
    report = []
    try:
        inputs = layer_inputs(student, layers[0], batches, device)
        for i, layer in enumerate(layers):
            if i:  # what the layer before, as trained, now gives
                inputs = next_inputs(layers[i - 1], inputs)
            params = list(layer.parameters())
            for w in params:
                w.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
            keep_zeros(layer, opt)
            total = max(epochs * len(batches), 2)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
            losses = []
            bar = progress(total=total, desc=f"distill {ctx.variant} layer {i + 1}/{len(layers)}", unit="batch",
                       leave=False)
            for _ in range(epochs):
                for j in rng.permutation(len(batches)):
                    args, kwargs = inputs[j]
                    out = layer(*args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    loss = _masked_mse(out, teacher_hidden[j][i], _token_mask(batches[j], device))
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    losses.append(loss.item())
                    bar.update()
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
            for w in params:
                w.requires_grad_(False)
            k = max(1, len(batches) // 4)  # a quarter of an epoch of steps at the start and at the end
            report.append({"layer": i, "mse_first": round(float(np.mean(losses[:k])), 5),
                           "mse_last": round(float(np.mean(losses[-k:])), 5)})
    finally:
        for w, flag in saved:
            w.requires_grad_(flag)
        student.train(was_training)
    return {"epochs": epochs, "lr": lr, "layers": report, "seconds": round(time.perf_counter() - t0, 2)}


SPARSE = 0.05  # a weight this share of exact zeros was pruned (trained dense weights are almost never 0.0)


def keep_zeros(module, opt) -> dict:
    """Pruned weights stay pruned: the zeros of every weight matrix that is at least SPARSE zeros (unstructured or
    2:4 pruning before this step) are put back after each optimiser step. Without it training refills them and
    the distilled variant is the dense model retrained, reported as the pruned one recovered."""
    import torch

    masks = [(w, w != 0) for w in module.parameters() if w.dim() >= 2 and w.requires_grad
             and float((w == 0).float().mean()) >= SPARSE]
    if not masks:
        return {}

    def put_back(*_):
        with torch.no_grad():
            for w, m in masks:
                w.mul_(m)

    opt.register_step_post_hook(put_back)
    zeros = sum(int((~m).sum()) for _, m in masks)
    return {"weights": len(masks), "zeros": zeros,
            "of": sum(m.numel() for _, m in masks)}


def _loop(student, p, epochs, train_idx, rng, ctx, tensors, loss_fn, hidden_loss, validate):
    """The optimiser loop with early stopping on the held-out tenth; returns the best state seen."""
    import time

    import torch
    from core.progress import progress

    with _TrainingSettings(student, p):
        opt = torch.optim.AdamW([w for w in student.parameters() if w.requires_grad], lr=p.lr,
                                weight_decay=p.weight_decay)
        kept = keep_zeros(student, opt)
        if kept:
            ctx.notes["sparsity_kept"] = kept
        total = epochs * len(train_idx) if not p.max_steps else min(p.max_steps, epochs * len(train_idx))
        sched = (torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=p.lr, total_steps=max(total, 2), pct_start=0.1)
                 if p.schedule == "onecycle" else None)
        best, best_state, stale, steps, history = validate(), copy.deepcopy(student.state_dict()), 0, 0, []
        best_epoch = 0  # 0: the student as it came
        start_score, t0 = best, time.perf_counter()
        for epoch in range(epochs):
            student.train()
            bar = progress(rng.permutation(train_idx), desc=f"distill {ctx.variant} epoch {epoch + 1}/{epochs}",
                       unit="batch", leave=False)
            for i in bar:
                x, t, y = tensors(int(i))
                loss = loss_fn(student(**x), t, y)
                if hidden_loss:
                    loss = loss + p.hidden_weight * hidden_loss(int(i), x)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched and steps < total:
                    sched.step()
                steps += 1
                bar.set_postfix(loss=f"{loss.item():.4f}")
                if p.max_steps and steps >= p.max_steps:
                    break
            score = validate()
            # Seconds of training so far (validation included): fidelity against training time.
            history.append({"epoch": epoch + 1, "loss": round(float(loss.item()), 5), "val": round(score, 5),
                            "seconds": round(time.perf_counter() - t0, 2)})
            if score >= best:  # ties go to the later, longer-trained epoch
                best, best_state, stale, best_epoch = score, copy.deepcopy(student.state_dict()), 0, epoch + 1
            else:
                stale += 1
            if (p.max_steps and steps >= p.max_steps) or stale > p.patience:
                break
    return best, best_state, start_score, steps, history, best_epoch
