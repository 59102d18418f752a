"""Structured pruning and KL distillation of decoder LMs, on tiny random GPT-2 and Llama models built
here from their configs: the pruned model shrinks with its config, still generates, round-trips
through save_pretrained / from_pretrained, and distillation brings it back towards its teacher."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from compress.distill import Distill, _token_kl
from compress.prune import Prune
from core.decoders import decoder_layers, weight
from core.lm import CausalLM
from core.model import VariantModel
from core.steps import StepContext

VOCAB = 512


def _lm(family: str, kv_heads: int = 4) -> CausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    # initializer_range 0.2: peaked next-token distributions, so a pruned model's KL is far from 0
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, n_inner=256, vocab_size=VOCAB,
                                           n_positions=64, initializer_range=0.2))
    else:  # Qwen2: the Llama layout with biases on q, k and v
        cls, config = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
        model = cls(config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=kv_heads,
                           intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                           initializer_range=0.2))
    return CausalLM(model.eval()).eval()


def _batches(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (4, 32), dtype=np.int64),
             "attention_mask": np.ones((4, 32), dtype=np.int64)} for _ in range(n)]


def _ctx(tmp_path, batches=(), lookup=lambda name: None) -> StepContext:
    task = SimpleNamespace(type="language-modeling", train_batches=list(batches), train_labels=None)
    return StepContext(work_dir=tmp_path, task=task, quick=False, seed=0, variant="v", export=None, lookup=lookup)


def _prune(lm, tmp_path, **params):
    ctx = _ctx(tmp_path, _batches(4))
    return Prune().run(VariantModel(io=None, module=lm), params, ctx).module, ctx.notes


def _logits(lm, batch):
    with torch.no_grad():
        return lm(**{k: torch.from_numpy(v) for k, v in batch.items()})


def _generates_and_round_trips(lm, tmp_path):
    """generate() runs (with its KV cache) and the saved model loads back computing the same logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.from_numpy(_batches(1, seed=5)[0]["input_ids"][:2, :8])
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    assert out.shape == (2, 12)
    lm.model.save_pretrained(tmp_path / "saved")
    loaded = CausalLM(AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval())
    batch = _batches(1, seed=6)[0]
    torch.testing.assert_close(_logits(loaded, batch), _logits(lm, batch))


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_ffn_pruning_shrinks_layers_and_config(tmp_path, family, importance):
    lm = _lm(family)
    width = weight(decoder_layers(lm)[0].down).shape[1]
    pruned, notes = _prune(lm, tmp_path, ratio=0.5, targets=["ffn"], importance=importance)
    for layer in decoder_layers(pruned):
        assert all(weight(p).shape[0] == width // 2 for p in layer.up) and weight(layer.down).shape[1] == width // 2
    attr = "n_inner" if family == "gpt2" else "intermediate_size"
    assert getattr(pruned.model.config, attr) == width // 2
    assert notes["intermediate_size"] == {"per_layer_before": width, "per_layer_after": width // 2}
    assert notes["params_after"] < notes["params_before"]
    assert weight(decoder_layers(lm)[0].down).shape[1] == width  # the input model is left as it was
    assert _logits(pruned, _batches(1)[0]).shape == (4, 32, VOCAB)
    _generates_and_round_trips(pruned, tmp_path)


def test_ffn_widths_stay_multiples_of_32_by_default(tmp_path):
    _, notes = _prune(_lm("gpt2"), tmp_path, ratio=0.6, targets=["ffn"])
    assert notes["intermediate_size"] == {"per_layer_before": 256, "per_layer_after": 96} and notes["round_to"] == 32
    assert "bitsandbytes" in notes["round_to_why"]


@pytest.mark.parametrize("family, kv_heads, importance", [("llama", 4, "magnitude"), ("llama", 2, "activation"),
                                                          ("qwen2", 2, "magnitude"), ("gpt2", 4, "activation")])
def test_head_pruning_removes_whole_key_value_heads_with_their_queries(tmp_path, family, kv_heads, importance):
    pruned, notes = _prune(_lm(family, kv_heads), tmp_path, ratio=0.5, targets=["heads"], importance=importance)
    kept_kv = kv_heads // 2
    assert notes["kv_heads"] == {"per_layer_before": kv_heads, "per_layer_after": kept_kv}
    assert notes["heads"] == {"per_layer_before": 4, "per_layer_after": 4 // kv_heads * kept_kv}
    layers = decoder_layers(pruned)
    assert {(x.heads, x.kv_heads, x.head_dim) for x in layers} == {(notes["heads"]["per_layer_after"], kept_kv, 16)}
    cfg = pruned.model.config
    if family != "gpt2":
        heads = notes["heads"]["per_layer_after"]
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (heads, kept_kv, 16)
    else:
        assert sorted(map(len, cfg.pruned_heads.values())) == [2, 2]
    _generates_and_round_trips(pruned, tmp_path)


@pytest.mark.slow
def test_kl_distillation_brings_a_pruned_llm_back_towards_its_teacher(tmp_path):
    teacher = _lm("llama", kv_heads=2)
    student, _ = _prune(teacher, tmp_path, ratio=0.5, targets=["ffn", "heads"])
    batches = _batches(20)
    held_out = batches[-2:]  # distill holds out the last tenth

    def kl(model):
        return np.mean([float(_token_kl(_logits(model, b), _logits(teacher, b), torch.ones(4, 32))) for b in held_out])

    before = kl(student)
    ctx = _ctx(tmp_path, batches, lookup={"baseline": VariantModel(io=None, module=teacher)}.get)
    # alpha 1: KL alone (cross-entropy on random tokens would pull towards uniform, away from the teacher)
    out = Distill().run(VariantModel(io=None, module=student), {"epochs": 2, "lr": 3e-3, "alpha": 1.0}, ctx).module
    after = kl(out)
    assert ctx.notes["loss"] == "kl" and ctx.notes["val_before"] == pytest.approx(-before, rel=1e-3)
    assert after < 0.8 * before and ctx.notes["val_best"] == pytest.approx(-after, rel=1e-3)


def test_the_lm_loss_mixes_in_next_token_cross_entropy():
    """alpha 0 leaves the cross-entropy of the real next tokens: what Hugging Face computes from labels."""
    from compress.distill import _lm_loss

    lm, batch = _lm("gpt2"), {k: torch.from_numpy(v) for k, v in _batches(1)[0].items()}
    with torch.no_grad():
        logits, hf_loss = lm(**batch), lm.model(**batch, labels=batch["input_ids"]).loss
        torch.testing.assert_close(_lm_loss(logits, logits + 1, batch, 2.0, 0.0), hf_loss)
        assert float(_lm_loss(logits, logits + 1, batch, 2.0, 1.0)) == pytest.approx(0, abs=1e-5)  # same softmax


def test_unsupported_layouts_are_named(tmp_path):
    from transformers import Phi3Config, Phi3ForCausalLM

    lm = CausalLM(Phi3ForCausalLM(Phi3Config(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                                             intermediate_size=128, vocab_size=VOCAB, pad_token_id=0)))
    with pytest.raises(ValueError, match="gate_up_proj.*unstructured"):
        _prune(lm, tmp_path, ratio=0.5)
