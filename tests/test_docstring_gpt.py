"""The built-in docstring-gpt: a quick (short-trained) build in a private cache folder loads with the
Auto classes, predicts held-out docstrings far better than chance, is cached after the first call,
and its tokenizer round-trips text. The corpus never trains on a held-out docstring."""
from __future__ import annotations

import json
import time

import pytest
import torch

from workbench.sources import docstring_gpt as dg
from workbench.sources.data import stdlib_docstrings

pytestmark = pytest.mark.slow  # `built` trains docstring-gpt (about 90 s on 2 cores)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(folder, seconds of the first call), trained into an empty cache so the test sees a real build
    (the default cache would hand back a folder trained on an earlier day)."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_CACHE", str(cache))
        t0 = time.monotonic()
        path = dg.docstring_gpt_path(quick=True)
        yield path, time.monotonic() - t0


def test_folder_loads_and_beats_chance_by_far(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path, _ = built
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert isinstance(model, LlamaForCausalLM) and (path / "model.safetensors").exists()
    # bitsandbytes' 4-bit CPU kernel needs every Linear's out_features to be a multiple of 32.
    assert all(m.out_features % 32 == 0 for m in model.modules() if isinstance(m, torch.nn.Linear))

    info = json.loads((path / "training.json").read_text())
    assert info["steps"] == dg.QUICK.steps and info["random_perplexity"] > dg.VOCAB / 2
    assert info["heldout_perplexity"] < dg.VOCAB / 10

    # Recomputed here on a few held-out blocks, against an untrained model of the same config.
    blocks = dg.packed_blocks(tok, dg.lm_corpus()[1])[:16]
    assert dg.perplexity(model, blocks) < dg.VOCAB / 10
    torch.manual_seed(0)
    assert dg.perplexity(LlamaForCausalLM(model.config), blocks) > dg.VOCAB / 2
    # The tokenizer's output feeds the model as is (no token_type_ids), and generation runs.
    enc = tok(["Return the number of", "Open a file"], padding=True, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape == (2, enc["input_ids"].shape[1] + 4)


def test_second_call_returns_the_cached_folder(built):
    path, first = built
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    t0 = time.monotonic()
    assert dg.docstring_gpt_path(quick=True) == path
    assert time.monotonic() - t0 < 1.0 < first
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []  # no build folder left


def test_tokenizer_round_trips(built):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built[0])
    assert len(tok) == dg.VOCAB
    assert tok.bos_token == tok.eos_token == tok.pad_token == dg.EOS
    for text in ["Return the number of items in the container.",
                 "def f(x):\n    return {'a': x ** 2}  # ünïcode, 日本語, tabs\tand  spaces "]:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and dg.EOS not in tok.decode(ids)


def test_corpus_holds_out_the_task_split_and_never_trains_on_it(built):
    train, held = dg.lm_corpus()
    assert held == stdlib_docstrings()[1]
    assert (train, held) == dg.lm_corpus()  # cached, same order
    # Docstring paragraphs are whitespace-normalised (one line); code chunks keep their newlines.
    code = " ".join(t for t in train if "\n" in t).split()
    assert len(code) > 50_000  # words
    # A held-out paragraph in the code would start with one of its 6-word windows (fast to look up).
    windows = {tuple(code[i:i + 6]) for i in range(len(code) - 5)}
    starts = [h for h in held if tuple(h.split()[:6]) in windows]
    assert not [h for h in starts if h in " ".join(code)]
