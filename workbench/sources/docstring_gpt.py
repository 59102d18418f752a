"""The built-in `docstring-gpt`: a small Llama-layout decoder LM (the layout of Llama, Qwen2 and
Mistral) trained on this machine the first time it is asked for, then loaded from the cache, like
the digits CNN. Nothing is downloaded: the corpus is the standard library's docstrings and its code,
the tokenizer is a byte-level BPE trained on them. The held-out split is exactly the one the
language-modeling task scores, and no held-out docstring is in the training text."""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

from core import atomic
from core.cache import cache_dir
from core.progress import progress, write

EOS = "<|endoftext|>"
VOCAB = 8192
BLOCK = 128  # tokens per training / evaluation block
CODE_CHARS = 1_000_000  # code in the corpus, about as much as docstring text: bounds tokenizer + training time
CHUNK_CHARS = 2000


class Schedule(NamedTuple):
    steps: int
    batch: int  # blocks of BLOCK tokens
    lr: float


# Fixed step counts (never time-based), so a seed gives the same model on every machine. On 2 cores
# (Sapphire Rapids, AVX-512/AMX, fp32) a step of 16 blocks takes 0.4-0.45 s: FULL trains in ~3.5 min.
# QUICK (the tests) is ~25 s of training: more, smaller steps learn more than fewer big ones there.
FULL = Schedule(steps=450, batch=16, lr=2e-3)
QUICK = Schedule(steps=200, batch=4, lr=3e-3)


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- corpus
def lm_corpus() -> tuple[list[str], list[str]]:
    """(train, heldout) texts. Held-out: the docstring held-out split, exactly as the language-modeling
    task scores it. Train: the training docstrings plus standard-library code with every docstring
    (every bare string statement) removed, so no held-out docstring leaks in, cut into chunks and
    capped at CODE_CHARS. Cached as JSON; the order is fixed (by hash)."""
    from workbench.sources.data import _SKIP, stdlib_docstrings

    path = cache_dir() / f"lm-corpus-v1-py{sys.version_info[0]}{sys.version_info[1]}.json"
    if path.exists():
        d = json.loads(path.read_text())
        return d["train"], d["heldout"]
    docs, heldout = stdlib_docstrings()
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")) + sorted(root.glob("*/*/*.py"))
    chunks: list[str] = []
    for f in files:
        if _SKIP.intersection(f.relative_to(root).parts):
            continue
        try:
            code = _strip_docstrings(f.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError, RecursionError):
            continue
        chunks += _chunks(code)
    # A hash order spreads the capped sample over the whole library rather than its first modules.
    code, total = [], 0
    for c in sorted(set(chunks), key=_hash):
        if total >= CODE_CHARS:
            break
        code.append(c)
        total += len(c)
    train = sorted(docs + code, key=_hash)
    atomic.write_json(path, {"train": train, "heldout": heldout})
    return train, heldout


def _strip_docstrings(source: str) -> str:
    """The module's code without docstrings and comments (ast.unparse drops those)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list):
            kept = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                            and isinstance(s.value.value, str))]
            # A body that was only a docstring still needs a statement.
            node.body = kept or [ast.Pass()]
    return ast.unparse(tree)


def _chunks(code: str) -> list[str]:
    """Consecutive lines grouped up to about CHUNK_CHARS. A line longer than that is a data table
    (unicode or keyword tables, 30k characters on one line), not code to learn from: dropped."""
    out, cur, size = [], [], 0
    for line in code.splitlines():
        if len(line) > CHUNK_CHARS:
            continue
        if cur and size + len(line) > CHUNK_CHARS:
            out.append("\n".join(cur))
            cur, size = [], 0
        cur.append(line)
        size += len(line) + 1
    if cur:
        out.append("\n".join(cur))
    return [c for c in out if c.strip()]


# ----------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: list[str]):
    """A byte-level BPE (GPT-2 style: any text round-trips, no unknown token) wrapped as a
    PreTrainedTokenizerFast, so AutoTokenizer loads the saved folder. `<|endoftext|>` is bos, eos and
    pad; like GPT-2, nothing is added to an encoded text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    # No token_type_ids: a decoder takes none, and `model(**tokenizer(text))` / generate() reject them.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   model_max_length=512, clean_up_tokenization_spaces=False,
                                   model_input_names=["input_ids", "attention_mask"])


def packed_blocks(tokenizer, texts: list[str]) -> torch.Tensor:
    """(n, BLOCK) token ids: the texts, each followed by eos, concatenated and cut into blocks (the
    ragged tail dropped)."""
    ids: list[int] = []
    # The backend tokenizer: no "longer than model_max_length" warning for long code chunks.
    for enc in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids += enc.ids + [tokenizer.eos_token_id]
    n = len(ids) // BLOCK
    return torch.tensor(ids[:n * BLOCK], dtype=torch.int64).view(n, BLOCK)


# ----------------------------------------------------------------------------- model
def model_config(tokenizer):
    """Llama layout, a few million parameters. Every Linear's out_features is a multiple of 32
    (bitsandbytes' 4-bit CPU kernel needs that): 256, 704 and the tied 8192-way head."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-token NLL) over every predicted position of the blocks."""
    model.eval()
    nll, n = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i:i + batch]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum").item()
        n += x[:, 1:].numel()
    return math.exp(nll / n)


def _lr(step: int, steps: int, peak: float) -> float:
    """Linear warmup over 5% of the steps, then cosine down to 10% of the peak."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train(model, blocks: torch.Tensor, steps: int, seed: int, lr: float, batch: int) -> float:
    """fp32 AdamW on batches of `batch` blocks, in a seeded order (a fresh permutation each pass).
    Returns the mean training loss of the last 10% of the steps."""
    g = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on the norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    order, pos, tail = torch.randperm(len(blocks), generator=g), 0, []
    model.train()
    bar = progress(range(steps), desc="docstring-gpt training", unit="step")
    for step in bar:
        if pos + batch > len(order):
            order, pos = torch.randperm(len(blocks), generator=g), 0
        x = blocks[order[pos:pos + batch]]
        pos += batch
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr)
        loss = model(input_ids=x, labels=x, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step >= steps - max(1, steps // 10):
            tail.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return sum(tail) / len(tail)


# ----------------------------------------------------------------------------- the cached folder
def docstring_gpt_path(seed: int = 0, quick: bool = False) -> Path:
    """A save_pretrained folder (safetensors, tokenizer, training.json) that AutoModelForCausalLM and
    AutoTokenizer load. Trained the first time (~3.5 min on 2 cores; quick: ~40 s, for the tests),
    then returned from the cache. It is built in a hidden sibling and renamed into place, so a crash
    never leaves a folder that looks finished."""
    path = cache_dir() / f"docstring-gpt-v1-seed{seed}{'-quick' if quick else ''}"
    if path.exists():
        return path
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with torch.random.fork_rng():  # the caller's random state is left as it was
            _build(tmp, seed, QUICK if quick else FULL)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache's other entries are not
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():  # anything but "another process finished first"
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _build(out: Path, seed: int, run: Schedule) -> None:
    from transformers import LlamaForCausalLM

    t0 = time.monotonic()
    train_texts, held_texts = lm_corpus()
    tokenizer = train_tokenizer(train_texts)
    # All of it even for a short run (under a second): a prefix would be lumpy, code chunks are
    # ~500 tokens against ~30 for a docstring paragraph, and a quick model trained on 80% code
    # scores docstrings twice as badly.
    train_blocks = packed_blocks(tokenizer, train_texts)
    held_blocks = packed_blocks(tokenizer, held_texts)
    t_data = time.monotonic() - t0
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config(tokenizer))
    random_ppl = perplexity(model, held_blocks)  # the untrained initialisation: ~ the vocabulary size
    t1 = time.monotonic()
    loss = train(model, train_blocks, run.steps, seed, run.lr, run.batch)
    t_train = time.monotonic() - t1
    ppl = perplexity(model, held_blocks)
    write(f"docstring-gpt: held-out perplexity {ppl:.1f} (untrained {random_ppl:.0f}), "
          f"{run.steps} steps in {t_train:.0f} s")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    atomic.write_json(out / "training.json", {
        "seed": seed, "steps": run.steps, "batch": run.batch, "block": BLOCK, "lr": run.lr,
        "seconds": round(time.monotonic() - t0, 1), "train_seconds": round(t_train, 1),
        "data_seconds": round(t_data, 1), "train_loss": round(loss, 4),
        "heldout_perplexity": round(ppl, 2), "random_perplexity": round(random_ppl, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus": {"train_texts": len(train_texts), "heldout_texts": len(held_texts),
                   "train_chars": sum(map(len, train_texts)), "train_blocks": len(train_blocks),
                   "heldout_blocks": len(held_blocks)},
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__})
