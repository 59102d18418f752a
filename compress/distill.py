"""Knowledge distillation: train the current variant (student) against an earlier variant
(teacher). Classifiers: KL divergence on temperature-scaled logits plus cross-entropy on the labels;
embedding models: cosine or MSE to the teacher's embeddings (no labels needed). The last tenth of
the training split is held out for early stopping, so the evaluation split never steers training."""
from __future__ import annotations

import copy
from typing import Literal, Optional

from pydantic import Field

from workbench.errors import field_error
from workbench.steps import Step, StepParams, register


class DistillParams(StepParams):
    teacher: str = Field("baseline", description="the variant whose outputs the student learns")
    epochs: int = Field(3, gt=0)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(64, gt=0, description="for inputs of fixed shape; text keeps the task's batches")
    max_steps: Optional[int] = Field(None, gt=0, description="stop after this many optimiser steps")
    loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto", description="auto: kl (+ task loss) for classifiers, cosine for embedding models")
    temperature: float = Field(4.0, gt=0, description="softens both distributions for the KL term")
    alpha: float = Field(0.7, ge=0, le=1, description="weight of the distillation term; 1 - alpha on the labels")
    patience: int = Field(2, ge=0, description="epochs without improvement on the held-out tenth before stopping")
    weight_decay: float = Field(0.0, ge=0)
    max_batches: Optional[int] = Field(None, gt=1, description="use at most this many batches of the training "
                                       "split (the teacher runs over each once); --quick uses at most 8")


@register
class Distill(Step):
    name = "distill"
    summary = "knowledge distillation from another variant (KL + labels, or cosine/MSE on embeddings)"
    Params = DistillParams
    consumes = "torch"

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
        ctx.notes.update(_train(student, teacher, p, ctx, epochs))
        model.module = student.eval()
        return model


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


def _train(student, teacher, p: DistillParams, ctx, epochs: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from workbench.infer import variant_outputs

    task = ctx.task
    batches, labels = _rebatch(task.train_batches, task.train_labels, p.batch_size)
    limit = min(p.max_batches or len(batches), 8 if ctx.quick else len(batches))
    batches = batches[:limit]  # labels stay aligned: they are indexed from the start
    teacher_out = variant_outputs(teacher, batches)
    sizes = [len(next(iter(b.values()))) for b in batches]
    starts = np.cumsum([0] + sizes)
    n_val = max(1, len(batches) // 10)
    train_idx, val_idx = list(range(len(batches) - n_val)), list(range(len(batches) - n_val, len(batches)))
    classifier = model_is_classifier = (task.type == "classification")
    loss_kind = p.loss if p.loss != "auto" else ("kl" if classifier else "cosine")

    def tensors(i):
        x = {k: torch.from_numpy(v) for k, v in batches[i].items()}
        t = torch.from_numpy(teacher_out[starts[i]:starts[i + 1]])
        y = torch.from_numpy(np.asarray(labels[starts[i]:starts[i + 1]])) if labels is not None else None
        return x, t, y

    def loss_fn(out, t, y):
        if loss_kind == "kl":
            T = p.temperature
            kd = F.kl_div(F.log_softmax(out / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T
            if y is not None and model_is_classifier:
                return p.alpha * kd + (1 - p.alpha) * F.cross_entropy(out, y)
            return kd
        if loss_kind == "mse":
            return F.mse_loss(out, t)
        return (1 - F.cosine_similarity(out, t, dim=-1)).mean()

    def validate() -> float:
        """Higher is better: accuracy on the held-out tenth, or cosine to the teacher."""
        student.eval()
        with torch.no_grad():
            scores = []
            for i in val_idx:
                x, t, y = tensors(i)
                out = student(**x)
                scores.append((out.argmax(-1) == y).float().mean().item() if (classifier and y is not None)
                              else F.cosine_similarity(out, t, dim=-1).mean().item())
        return float(np.mean(scores))

    torch.manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    opt = torch.optim.AdamW(student.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    best, best_state, stale, steps, history = validate(), copy.deepcopy(student.state_dict()), 0, 0, []
    start_score = best
    for epoch in range(epochs):
        student.train()
        bar = tqdm(rng.permutation(train_idx), desc=f"distill {ctx.variant} epoch {epoch + 1}/{epochs}",
                   unit="batch", leave=False)
        for i in bar:
            x, t, y = tensors(int(i))
            loss = loss_fn(student(**x), t, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if p.max_steps and steps >= p.max_steps:
                break
        score = validate()
        history.append({"epoch": epoch + 1, "loss": round(float(loss.item()), 5), "val": round(score, 5)})
        if score >= best:  # ties go to the later, longer-trained epoch
            best, best_state, stale = score, copy.deepcopy(student.state_dict()), 0
        else:
            stale += 1
        if (p.max_steps and steps >= p.max_steps) or stale > p.patience:
            break
    student.load_state_dict(best_state)  # the best epoch on the held-out tenth, not the last one
    return {"teacher": p.teacher, "loss": loss_kind, "epochs_run": len(history), "steps": steps,
            "val_before": round(start_score, 5), "val_best": round(best, 5), "history": history}
