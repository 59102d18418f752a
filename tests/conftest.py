"""Shared fixtures.

WORKBENCH_CACHE is left at its default on purpose: the built-in digits CNN is trained once per
machine and cached in ~/.cache/model-workbench, so every test that needs it loads it in a moment.

The expensive fixture is `quick_run`: one small end-to-end `workbench run --quick` of the digits CNN
(baseline, a PyTorch dynamic-int8 variant and an ONNX Runtime int8 variant; ONNX and TorchScript
exports; torch-cpu and ort-cpu at batch 1 and 4), made once per session and read by many tests.
"""
from __future__ import annotations

import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import pytest
import yaml

# `make test` runs the tests not marked `serial` two at a time (pytest-xdist workers); none of them judges
# timing. Each worker (and every process it starts, cells included) gets its own share of the cores: two
# workers each running all cores' threads would oversubscribe them and spin, which made a training fixture
# 3x slower than alone. The workers are still each other's noise, so the busy guard (bench.rounds), which
# would measure every cell process again up to twice, is raised out of the way there. The `serial` tests
# run alone after them, on every core, with the guard as a user gets it. Set before any workbench import:
# bench.rounds reads the limit once.
if os.environ.get("PYTEST_XDIST_WORKER") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _worker, _workers = int(os.environ["PYTEST_XDIST_WORKER"].lstrip("gw")), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))
    os.sched_setaffinity(0, _cores[_worker % _workers::_workers] or _cores)
    os.environ.setdefault("WORKBENCH_BUSY_LIMIT_CORES", "64")

from workbench import plugins
from workbench.cli import main

plugins.load()  # the registries the tests read (steps, backends, formats) are complete from here on

QUICK_RECIPE = {
    "name": "tiny-digits",
    "description": "the test suite's shared quick run",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {
        "baseline": {},
        "torch-int8": {"from": "baseline", "steps": [{"quantize": {"method": "dynamic-int8"}}]},
        "ort-int8": {"from": "baseline", "steps": [{"onnx-quantize": {"mode": "dynamic"}}]},
    },
    "export": {"formats": ["onnx", "torchscript"], "parity": {"max_abs_diff": 1.0e-4}},
    "bench": {
        "backends": ["torch-cpu", "ort-cpu"],
        "batch_sizes": [1, 4],
        # Not a test of stability: a smoke timing on a loaded 2-core machine must not flip the
        # recommendation (an unstable cell is never recommended) that report tests build on.
        "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0},
    },
}


def write_yaml(path: Path, recipe: Union[str, dict]) -> Path:
    """Write a recipe (a dict, dumped as YAML, or literal YAML text) to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(textwrap.dedent(text) if isinstance(recipe, str) else text)
    return path


def run_dirs(root: Path, name: str) -> list[Path]:
    """The run directories of recipe `name` under an --out root (every folder but the cache)."""
    base = Path(root) / name
    return sorted(d for d in base.iterdir() if d.is_dir() and d.name != "cache")


def the_run_dir(root: Path, name: str) -> Path:
    dirs = run_dirs(root, name)
    assert len(dirs) == 1, f"expected exactly one run directory under {root / name}, found {dirs}"
    return dirs[0]


@pytest.fixture
def tmp_out(tmp_path) -> Path:
    """A fresh --out root (not created: the run must create it)."""
    return tmp_path / "out"


@pytest.fixture
def write_recipe(tmp_path) -> Callable[..., Path]:
    """write_recipe(recipe, name="recipe.yaml") -> path of the YAML file inside tmp_path."""

    def _write(recipe: Union[str, dict], name: str = "recipe.yaml") -> Path:
        return write_yaml(tmp_path / name, recipe)

    return _write


@dataclass
class QuickRun:
    recipe_path: Path
    out_root: Path
    run_dir: Path
    exit_code: int
    results: dict
    recipe: dict  # the recipe as written (QUICK_RECIPE)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory) -> QuickRun:
    folder = tmp_path_factory.mktemp("quick-run")
    recipe_path = write_yaml(folder / "tiny-digits.yaml", QUICK_RECIPE)
    out_root = folder / "out"
    rc = main(["run", str(recipe_path), "--out", str(out_root), "--quick"])
    assert rc == 0, "the shared quick run did not finish"
    run_dir = the_run_dir(out_root, QUICK_RECIPE["name"])
    results = json.loads((run_dir / "results.json").read_text())
    return QuickRun(recipe_path, out_root, run_dir, rc, results, QUICK_RECIPE)


# ----------------------------------------------------------------------------- tiny Hugging Face text models
WORDS = "the a movie film plot acting was very not good great fine bad awful terrible".split()


def make_tiny_text_model(folder: Path, family: str = "bert", head: str = "sequence-classification") -> Path:
    """A randomly initialised 2-layer encoder of `family` (bert, roberta, distilbert, albert) with a
    20-token vocabulary, saved with its tokenizer the way save_pretrained lays out any Hugging Face
    model: what a user's local model folder looks like."""
    import torch
    from transformers import (AlbertConfig, AutoModel, AutoModelForSequenceClassification, BertConfig,
                              BertTokenizerFast, DistilBertConfig, RobertaConfig)

    folder = Path(folder)
    folder.mkdir(parents=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    common = dict(vocab_size=len(WORDS) + 5, max_position_embeddings=64, num_labels=2, pad_token_id=0)
    config = {
        "bert": lambda: BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                   **common),
        "roberta": lambda: RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, **common),
        "distilbert": lambda: DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, **common),
        "albert": lambda: AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, **common),
    }[family]()
    torch.manual_seed(0)
    cls = AutoModel if head == "embedding" else AutoModelForSequenceClassification
    cls.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_reviews_csv(path: Path, n: int = 60) -> Path:
    """Short positive / negative reviews (text,label), alternating classes."""
    import csv
    import random

    rng = random.Random(0)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label"])
        for i in range(n):
            positive = i % 2 == 0
            adj = rng.choice(["good", "great", "fine"] if positive else ["bad", "awful", "terrible"])
            noun = rng.choice(["movie", "film", "plot", "acting"])
            w.writerow([f"the {noun} was {'very ' * (i % 3)}{adj}", int(positive)])
    return Path(path)


# ----------------------------------------------------------------------------- tiny causal LMs
def make_tiny_causal_lm(folder: Path, family: str = "llama") -> Path:
    """A randomly initialised 2-layer decoder LM of `family` (gpt2, llama: GQA with 2 key/value heads
    for 4 query heads) and a byte-level BPE tokenizer of 384 tokens trained on a few standard-library
    docstrings, saved as save_pretrained lays out any causal LM: a user's local model folder."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    from workbench.sources.data import stdlib_docstrings

    folder = Path(folder)
    folder.mkdir(parents=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(stdlib_docstrings()[0][:400], vocab_size=384, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    vocab = len(tokenizer)
    config = {
        "gpt2": lambda: GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=256,
                                   bos_token_id=0, eos_token_id=0),
        "llama": lambda: LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                     tie_word_embeddings=True, bos_token_id=0, eos_token_id=0),
    }[family]()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
