"""Tasks: the evaluation split, the training split (for calibration and distillation) and the
metrics that say how good a variant's outputs are. Metrics are computed from outputs alone, so
the same code scores a torch module in this process and an ONNX Runtime cell in another."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from workbench.recipe import (BuiltinData, ClassificationTask, EmbeddingFidelityTask, LanguageModelingTask, Recipe,
                              TextClassificationTask)
from workbench.sources.data import digits_split, read_text_file, stdlib_docstrings
from core.lm_summary import lm_metrics
from workbench.sources.models import SourceModel

EVAL_BATCH = 32


@dataclass
class Task:
    type: str  # how outputs are scored: classification / embedding-fidelity / language-modeling / none
    eval_batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    labels: Optional[np.ndarray] = None
    train_batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    train_labels: Optional[np.ndarray] = None  # aligned with the concatenated train batches
    reference: Optional[np.ndarray] = None  # the source model's outputs on the eval split
    description: str = ""
    # The source model has random weights (`weights: random`): only fidelity to it means anything, so a
    # causal LM is ranked by KL to it, not by perplexity.
    fidelity_only: bool = False
    recipe_type: str = ""  # the recipe's task.type (text-classification is scored as classification)

    @property
    def primary(self) -> Optional[str]:
        """The metric a recommendation trades against latency (higher is better, but for perplexity)."""
        if self.fidelity_only and self.type == "language-modeling":
            return "kl"
        return {"classification": "accuracy", "embedding-fidelity": "cosine_mean",
                "language-modeling": "perplexity"}.get(self.type)

    @property
    def eval_size(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.eval_batches)

    def summary(self) -> dict:
        """The task as results.json records it: how many rows each role got and, for a classifier,
        the majority-class rate of the scored rows (what a model that learnt nothing reaches)."""
        out = {"type": self.recipe_type or self.type, "scoring": self.type, "description": self.description,
               "primary": self.primary,
               "lower_is_better": self.primary in LOWER_IS_BETTER,
               "eval_size": self.eval_size,
               "rows": {"evaluation": self.eval_size,
                        "steps": sum(len(next(iter(b.values()))) for b in self.train_batches)}}
        if self.labels is not None and len(self.labels):
            counts = np.bincount(np.asarray(self.labels))
            out.update(majority_rate=round(float(counts.max() / counts.sum()), 4),
                       n_classes=int((counts > 0).sum()))
        return out

    def metrics(self, outputs: np.ndarray) -> dict[str, float]:
        if self.type == "classification":
            return {"accuracy": float((outputs.argmax(-1) == self.labels).mean())}
        if self.type == "embedding-fidelity":
            return embedding_fidelity(outputs, self.reference)
        if self.type == "language-modeling":  # outputs are core.lm summaries of the next-token logits
            return lm_metrics(outputs, self.reference)
        return {}


LOWER_IS_BETTER = {"perplexity", "kl"}
LM_EVAL_BATCH = 8  # blocks per batch: its logits are batch x block x vocabulary floats


def embedding_fidelity(emb: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Mean cosine to the reference embeddings, and the Spearman correlation of all pairwise
    similarities (does the variant rank sentence pairs as the original does?)."""
    from scipy.stats import spearmanr

    def unit(a):
        a = a.astype(np.float64)
        return a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)

    e, r = unit(emb), unit(ref)
    iu = np.triu_indices(len(e), k=1)
    rho = spearmanr((e @ e.T)[iu], (r @ r.T)[iu]).statistic
    return {"cosine_mean": float((e * r).sum(1).mean()), "spearman": float(rho)}


def _batches(arrays: dict[str, np.ndarray], size: int) -> list[dict[str, np.ndarray]]:
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + size] for k, v in arrays.items()} for i in range(0, n, size)]


def _tokenize(tokenizer, texts: list[str], max_length: int) -> list[dict[str, np.ndarray]]:
    out = []
    for i in range(0, len(texts), EVAL_BATCH):
        enc = tokenizer(texts[i:i + EVAL_BATCH], padding="longest", truncation=True, max_length=max_length,
                        return_tensors="np")
        out.append({"input_ids": enc["input_ids"].astype(np.int64),
                    "attention_mask": enc["attention_mask"].astype(np.int64)})
    return out


def _tokenize_bucketed(tokenizer, texts: list[str], max_length: int, labels=None):
    """Training batches of texts of similar length, in a seeded shuffled order. Padding to the
    longest text of a random batch of docstrings quadruples the tokens a forward pass sees; here each
    batch pads only to its neighbours, while any prefix of the batches (calibration, --quick
    distillation) still spans short and long texts. Returns (batches, labels in batch order)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    chunks = [order[i:i + EVAL_BATCH] for i in range(0, len(order), EVAL_BATCH)]
    chunks = [chunks[i] for i in np.random.default_rng(0).permutation(len(chunks))]
    batches = [_tokenize(tokenizer, [texts[j] for j in c], max_length)[0] for c in chunks]
    ordered = None if labels is None else np.asarray(labels)[np.concatenate(chunks)]
    return batches, ordered


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) row indices: `fraction` of every class held out (at least one row of any
    class with two or more), chosen by a seeded shuffle, so the split is the same on every run. Each side
    comes with its classes interleaved in proportion, so any first rows of it (`task.eval_size`, a quick
    run's two batches, a calibration set) are a stratified sample too, never the first classes of a file
    sorted by label."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(rows) * fraction)) if len(rows) > 1 else 0
        k = max(k, 1) if len(rows) > 1 else 0
        held.append(rows[:k])
        train.append(rows[k:])
    return _interleave(train), _interleave(held)


def _interleave(groups: list[np.ndarray]) -> np.ndarray:
    """The groups' rows in one order where each group is spread evenly: row i of a group of n sits at
    (i + 0.5) / n of the way through."""
    groups = [g for g in groups if len(g)]
    if not groups:
        return np.zeros(0, dtype=np.int64)
    at = np.concatenate([(np.arange(len(g)) + 0.5) / len(g) for g in groups])
    rows = np.concatenate(groups)
    return rows[np.lexsort((rows, at))]


def grouped_split(keys: list[str], labels, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """stratified_split over distinct keys (texts): rows with the same text land on the same side,
    so a duplicated sentence cannot be trained on and scored. Labels None: one stratum."""
    first = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    distinct = list(first)
    strata = np.array([labels[first[k]] if labels is not None else 0 for k in distinct])
    train_idx, held_idx = stratified_split(strata, fraction, seed)
    rows: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        rows.setdefault(k, []).append(i)
    # In the split's interleaved order (a first few rows are a stratified sample), duplicates together.
    return ([i for j in train_idx for i in rows[distinct[j]]], [i for j in held_idx for i in rows[distinct[j]]])


def _npz(recipe: Recipe, field: str, src: SourceModel) -> tuple[np.ndarray, np.ndarray]:
    """x and y of the .npz at task.data.<field>, checked before any work: x numeric with one row per label
    and each row the model's input shape, y integer class indices >= 0 of shape [N]. Anything else is the
    file to fix (a RecipeError naming the field), never a truncated label or a library error mid-run."""
    from core.errors import field_error, one_line

    path = recipe.resolve(getattr(recipe.task.data, field))
    accepted = "a .npz with arrays x (one row per example, numeric) and y (integer class indices >= 0, shape [N])"

    def bad(problem: str):
        return field_error(recipe.where, f"task.data.{field}", problem, value=str(path), accepted=accepted)

    named = [f for f in ("text_field", "label_field") if f in recipe.task.data.model_fields_set]
    if named:  # a setting the file kind has no use for would be ignored without a word
        raise field_error(recipe.where, f"task.data.{named[0]}", "names a column of a .csv or .jsonl file; a .npz "
                          "is read as its arrays x and y, so drop it", value=getattr(recipe.task.data, named[0]))

    try:
        d = np.load(path, allow_pickle=False)
        arrays = {k: d[k] for k in d.files}
    except Exception as e:  # noqa: BLE001 - not a .npz, a pickled array, a broken file
        raise bad(f"cannot be read as a .npz: {one_line(e, 250)}") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise bad(f"has no array {' or '.join(missing)} (it has {sorted(arrays) or 'none'})")
    x, y = arrays["x"], arrays["y"]
    if x.dtype.kind not in "biuf" or y.dtype.kind not in "biuf":
        raise bad(f"x is {x.dtype} and y is {y.dtype}: both must be numbers (labels as names need a text task's "
                  "label2id, or mapping to indices first)")
    if y.ndim != 1:
        raise bad(f"y has shape {list(y.shape)}" + (" (one-hot? y.argmax(1) gives the indices)" if y.ndim == 2 else ""))
    if len(x) != len(y):
        raise bad(f"x has {len(x)} rows and y has {len(y)}: one label per row")
    if len(y) == 0:
        raise bad("it has no rows")
    whole = np.isfinite(y) & (y == np.round(y)) if y.dtype.kind == "f" else np.ones(len(y), bool)
    if not whole.all():
        odd = np.unique(y[~whole])[:5].tolist()
        raise bad(f"y holds values that are not whole numbers, e.g. {odd}: classification needs class indices")
    if y.min() < 0:
        raise bad(f"y holds negative labels, e.g. {int(y.min())}: class indices start at 0")
    if len(src.io.inputs) != 1:
        raise bad(f"an .npz feeds one input (x), and the model takes {len(src.io.inputs)} "
                  f"({', '.join(src.io.inputs)}): use task: {{type: none}} or a model with one input")
    shape = next(iter(src.io.inputs.values()))["shape"][1:]
    if len(shape) != x.ndim - 1 or any(isinstance(d, int) and d != n for d, n in zip(shape, x.shape[1:])):
        raise bad(f"each row of x has shape {list(x.shape[1:])}, and the model's input "
                  f"{next(iter(src.io.inputs))!r} takes {shape} per row (model.inputs)")
    return x.astype(np.float32), y.astype(np.int64)


def build_task(recipe: Recipe, src: SourceModel) -> Task:
    """The task the recipe names, over the source model's tokenizer and inputs; labels the model cannot
    predict are refused here (a RecipeError naming task.data), before any work."""
    task = _build(recipe, src)
    task.recipe_type = recipe.task.type
    _check_labels(recipe, task, src)
    return task


def _check_labels(recipe: Recipe, task: Task, src: SourceModel) -> None:
    """A model scored with weights its checkpoint lacked (a head transformers drew at random), or a classifier
    scored on labels past its output width, would sit at chance with no reason given: said here, by name; the
    width from one forward call on the first evaluation batch."""
    from core.errors import field_error
    from runtime.infer import torch_outputs

    labels = [np.asarray(a) for a in (task.labels, task.train_labels) if a is not None and len(a)]
    scored = (labels and src.io.kind == "classifier") or (task.type == "language-modeling" and not src.random_weights)
    if scored and src.untrained:  # e.g. a base or LM checkpoint loaded with head: sequence-classification
        shown = ", ".join(src.untrained[:4]) + (f" and {len(src.untrained) - 4} more" if len(src.untrained) > 4 else "")
        raise field_error(recipe.where, "model.path", f"the checkpoint has no weights for {shown}: transformers drew "
                          f"them at random, so {'accuracy' if labels else 'perplexity'} would measure chance. Save "
                          "the trained model with save_pretrained, or measure latency alone with task.type: none")
    if not labels or not task.eval_batches or src.io.kind != "classifier":
        return
    width = torch_outputs(src.module, task.eval_batches[:1]).shape[-1]
    top = int(max(a.max() for a in labels))
    if top >= width:
        raise field_error(recipe.where, "task.data", f"the labels go up to {top}, and the model outputs "
                          f"{width} class scores (labels 0 to {width - 1}): a model with {top + 1} or more outputs, "
                          "or labels as indices into its outputs")


def _build(recipe: Recipe, src: SourceModel) -> Task:
    t = recipe.task
    if isinstance(t, ClassificationTask):
        if isinstance(t.data, BuiltinData):
            x_tr, y_tr, x, y = digits_split()
            desc = "scikit-learn digits, held-out 25% split"
        elif t.data.eval_path:
            (x_tr, y_tr), (x, y) = _npz(recipe, "path", src), _npz(recipe, "eval_path", src)
            desc = f"{t.data.eval_path} ({len(y)} rows) for evaluation, {t.data.path} ({len(y_tr)} rows) for the steps"
        else:
            x_all, y_all = _npz(recipe, "path", src)
            # Never score on rows that train, calibrate or rank: a stable, seeded, stratified share
            # of the file is held out, the rest is what the steps may use.
            train_idx, held_idx = stratified_split(y_all, t.data.eval_fraction, recipe.seed)
            x_tr, y_tr, x, y = x_all[train_idx], y_all[train_idx], x_all[held_idx], y_all[held_idx]
            desc = (f"{t.data.path} (x, y): {len(held_idx)} of {len(y_all)} rows held out for evaluation "
                    f"(stratified, seed {recipe.seed}), {len(train_idx)} for the steps")
        if t.eval_size and t.eval_size < len(y):  # the held-out rows are interleaved by class: a stratified cut
            x, y = x[:t.eval_size], y[:t.eval_size]
            desc += f"; task.eval_size: {len(y)} of them scored"
        name = next(iter(src.io.inputs))
        return Task("classification", _batches({name: x}, EVAL_BATCH), y, _batches({name: x_tr}, EVAL_BATCH),
                    y_tr, description=f"{desc}, {len(y)} examples, metric: accuracy")
    if isinstance(t, TextClassificationTask):
        train, held, desc = _text_rows(recipe, t.data, labelled=True, src=src)
        held = held[:t.eval_size] if t.eval_size else held
        train_batches, train_labels = _tokenize_bucketed(src.tokenizer, [p[0] for p in train], t.max_length,
                                                         np.array([p[1] for p in train], dtype=np.int64))
        return Task("classification", _tokenize(src.tokenizer, [p[0] for p in held], t.max_length),
                    np.array([p[1] for p in held], dtype=np.int64), train_batches, train_labels,
                    description=f"{desc}, {len(held)} scored, metric: accuracy")
    if isinstance(t, EmbeddingFidelityTask):
        if isinstance(t.data, BuiltinData):
            train, held = stdlib_docstrings()
            desc = "docstrings of the Python standard library (held-out 20%)"
        else:
            train, held, desc = _text_rows(recipe, t.data, labelled=False)
        held = held[:t.eval_size]
        return Task("embedding-fidelity", _tokenize(src.tokenizer, held, t.max_length), None,
                    _tokenize_bucketed(src.tokenizer, train, t.max_length)[0],
                    description=f"{desc}, {len(held)} texts, metrics: mean cosine and Spearman to the source model")
    if isinstance(t, LanguageModelingTask):
        return _language_modeling(recipe, t, src)
    return Task("none", description="no task: latency and memory only")


def _language_modeling(recipe: Recipe, t: LanguageModelingTask, src: SourceModel) -> Task:
    """Held-out text packed into blocks of `block_size` tokens (texts end to end, the end-of-text token
    between them), so every block is full and every batch has one shape; the steps get the rest."""
    if isinstance(t.data, BuiltinData):
        train, held = stdlib_docstrings()
        desc = "docstrings of the Python standard library (held-out 20%)"
    else:
        train, held, desc = _text_rows(recipe, t.data, labelled=False)
    eval_blocks = pack_blocks(src.tokenizer, held, t.block_size)[:t.eval_blocks]
    if not len(eval_blocks):
        from core.errors import field_error

        tokens = sum(len(src.tokenizer(text)["input_ids"]) + 1 for text in held)  # + the end-of-text between texts
        raise field_error(recipe.where, "task.block_size", f"the held-out text is about {tokens} tokens, less than "
                          f"one block of {t.block_size}: a block_size of at most {max(tokens, 2)}, more text, or a "
                          "larger task.data.eval_fraction")
    train_blocks = pack_blocks(src.tokenizer, train, t.block_size)
    random = getattr(src, "random_weights", False)
    return Task("language-modeling", _block_batches(eval_blocks), None, _block_batches(train_blocks),
                description=f"{desc}, {len(eval_blocks)} blocks of {t.block_size} tokens scored "
                f"({len(eval_blocks) * (t.block_size - 1)} next-token predictions); metrics: perplexity, and top-1 "
                "agreement and KL of next-token distributions against the source model"
                + ("; the source model has random weights, so variants are ranked by KL to it and perplexity "
                   "means nothing" if random else ""), fidelity_only=random)


def pack_blocks(tokenizer, texts: list[str], block: int) -> np.ndarray:
    """(n, block) token ids: the texts tokenized, joined by the end-of-text token, cut into blocks."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        if sep is not None:
            ids.append(sep)
    n = len(ids) // block
    return np.asarray(ids[:n * block], dtype=np.int64).reshape(n, block)


def _block_batches(blocks: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": blocks[i:i + LM_EVAL_BATCH], "attention_mask": np.ones_like(blocks[i:i + LM_EVAL_BATCH])}
            for i in range(0, len(blocks), LM_EVAL_BATCH)]


def _text_rows(recipe: Recipe, data, *, labelled: bool, src: SourceModel = None) -> tuple[list, list, str]:
    """(training rows, held-out rows, what the split was) of a text file: rows are (text, label id)
    when labelled, else texts. A separate eval_path, or a seeded split stratified by label that keeps
    identical texts on one side."""
    def rows(path):
        texts, labels = read_text_file(recipe.resolve(path), data.text_field, data.label_field if labelled else None)
        where = f"{recipe.where}: {path}"
        return texts, (_label_ids(labels, src, where, data.label_field) if labelled else None)

    def pick(texts, labels, idx):
        return [(texts[i], labels[i]) if labelled else texts[i] for i in idx]

    texts, labels = rows(data.path)
    if data.eval_path:
        e_texts, e_labels = rows(data.eval_path)
        return (pick(texts, labels, range(len(texts))), pick(e_texts, e_labels, range(len(e_texts))),
                f"{data.eval_path} ({len(e_texts)} rows) for evaluation, {data.path} ({len(texts)} rows) for the steps")
    train_idx, held_idx = grouped_split(texts, labels, data.eval_fraction, recipe.seed)
    return (pick(texts, labels, train_idx), pick(texts, labels, held_idx),
            f"{data.path}: {len(held_idx)} of {len(texts)} rows held out for evaluation (stratified, seed "
            f"{recipe.seed}; identical texts on one side), {len(train_idx)} for the steps")


def _class_index(v) -> Optional[int]:
    """A label that is a class index: a whole number >= 0 (1, 1.0, "1"); None for anything else (0.95, "", "pos")."""
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str) and v.strip().isdigit():
        v = int(v.strip())
    return v if isinstance(v, int) and v >= 0 else None


def _label_ids(labels: list, src: SourceModel, where: str, field: str) -> list[int]:
    """Class indices for the labels of a text file: whole numbers >= 0 as they are, names through the model's
    label2id. Anything else (a fraction, an empty or unknown name) is the file to fix, named with its rows."""
    from core.errors import field_error

    ids = [_class_index(v) for v in labels]
    if all(i is not None for i in ids):
        return ids
    config = getattr(getattr(src.module, "model", None), "config", None)
    mapping = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    if mapping and all(str(v) in mapping for v in labels):
        return [mapping[str(v)] for v in labels]
    bad = [(i, v) for i, v in enumerate(labels) if _class_index(v) is None and str(v) not in mapping]
    if not bad:  # indices and names mixed: each as what it is
        return [mapping[str(v)] if str(v) in mapping else _class_index(v) for v in labels]
    shown = ", ".join(f"row {i + 1}: {v!r}" for i, v in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    names = f"a name in the model's label2id {sorted(mapping)}" if mapping else "a name (the model has no label2id)"
    raise field_error(where, f"task.data.label_field ({field!r})", f"{len(bad)} label(s) are neither a class index "
                      f"(a whole number >= 0) nor {names}: {shown}")
