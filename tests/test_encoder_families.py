"""Structured pruning of transformer encoders by structure, not by BERT's module names: BERT,
RoBERTa, DistilBERT and ViT lose FFN channels and heads, keep working, and round-trip through
save_pretrained / from_pretrained; ALBERT's shared layers are refused at validate with advice that
works when followed. Models are tiny, randomly initialised, and saved to local folders as a user's
would be."""
from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_reviews_csv, make_tiny_text_model, the_run_dir, write_yaml
from compress.prune import Prune
from core.encoders import EmbeddingModel, encoder_layers
from core.model import VariantModel
from core.steps import StepContext
from workbench.cli import main


class _Pixels(torch.nn.Module):
    """A ViT's [CLS] state from named pixel inputs."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, pixel_values):
        return self.vit(pixel_values=pixel_values).last_hidden_state[:, 0]


def _text_batches(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(5, 20, (16, 12)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:8, 8:] = 0  # half the rows padded: statistics must skip padding
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _encoder(family: str):
    """(module taking named inputs, its Hugging Face model, training batches, held-out batches)."""
    from transformers import (DistilBertConfig, DistilBertModel, RobertaConfig, RobertaModel, ViTConfig,
                              ViTModel)

    torch.manual_seed(0)
    if family == "vit":
        vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8), add_pooling_layer=False).eval()
        rng = np.random.default_rng(0)
        pix = [{"pixel_values": rng.standard_normal((8, 3, 32, 32)).astype(np.float32)} for _ in range(10)]
        return _Pixels(vit), vit, pix[:8], pix[8:]
    kw = dict(vocab_size=25, max_position_embeddings=64, pad_token_id=0)
    hf = (RobertaModel(RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=64, **kw)) if family == "roberta" else
          DistilBertModel(DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **kw))).eval()
    return EmbeddingModel(hf), hf, _text_batches(8, 0), _text_batches(2, 1)


def _outputs(module, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(**{k: torch.from_numpy(v) for k, v in b.items()}) for b in batches])


@pytest.mark.parametrize("family", ["roberta", "distilbert", "vit"])
def test_structured_pruning_finds_heads_and_ffn_by_structure_and_round_trips(family, tmp_path):
    from transformers import AutoModel

    module, hf, train, held = _encoder(family)
    assert [x.family for x in encoder_layers(module)] == [{"roberta": "bert"}.get(family, family)] * 3
    reference = _outputs(module, held)
    errors = {}
    for importance in ("magnitude", "activation"):
        ctx = StepContext(work_dir=tmp_path, task=types.SimpleNamespace(train_batches=train), quick=False, seed=0,
                          variant="p", export=None)
        params = {"method": "structured", "ratio": 0.5, "importance": importance, "targets": ["ffn", "heads"]}
        pruned = Prune().run(VariantModel(io=None, module=module, source_module=module), params, ctx).module
        layers = encoder_layers(pruned)
        assert [x.heads for x in layers] == [2] * 3 and {x.up.out_features for x in layers} == {32}
        assert {x.q.out_features for x in layers} == {16}  # 2 heads of 8
        assert ctx.notes["params_after"] < ctx.notes["params_before"]
        out = _outputs(pruned, held)
        errors[importance] = float((out - reference).pow(2).mean() / reference.var(0).mean())
        # The config follows the pruned weights: save_pretrained / from_pretrained give the same model.
        inner = pruned.vit if family == "vit" else pruned.encoder
        inner.save_pretrained(tmp_path / importance)
        back = AutoModel.from_pretrained(tmp_path / importance, **({"add_pooling_layer": False}
                                                                   if family == "vit" else {})).eval()
        again = _Pixels(back) if family == "vit" else EmbeddingModel(back)
        assert torch.allclose(_outputs(again, held), out, atol=1e-5)
    # Ranking by activation and refitting what is kept reproduces the original better on held-out
    # inputs than dropping the smallest weights.
    assert errors["activation"] < errors["magnitude"], errors


def _recipe(family: str, method: str = "structured") -> dict:
    prune = {"method": method, "ratio": 0.5}
    if method == "structured":
        prune.update(importance="activation", targets=["ffn", "heads"])
    return {
        "name": f"tiny-{family}",
        "model": {"source": "hf", "path": f"./{family}", "head": "sequence-classification"},
        "task": {"type": "text-classification", "data": {"source": "file", "path": "reviews.csv"}, "max_length": 16},
        "variants": {"baseline": {}, "pruned": {"from": "baseline", "steps": [{"prune": prune}]}},
        "export": {"formats": ["onnx"], "parity": {"max_abs_diff": 1.0e-4}},
        "bench": {"backends": ["torch-cpu", "ort-cpu"], "batch_sizes": [1], "seq_len": 16, "repeats": 1,
                  "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0}},
    }


@pytest.mark.slow
@pytest.mark.parametrize("family", ["distilbert", "roberta"])
def test_a_local_encoder_prunes_exports_with_parity_and_runs_in_a_recipe(family, tmp_path):
    make_tiny_text_model(tmp_path / family, family)
    make_reviews_csv(tmp_path / "reviews.csv")
    recipe = write_yaml(tmp_path / f"{family}.yaml", _recipe(family))
    assert main(["validate", str(recipe)]) == 0
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    r = json.loads((the_run_dir(tmp_path / "out", f"tiny-{family}") / "results.json").read_text())
    pruned = next(v for v in r["variants"] if v["name"] == "pruned")
    assert pruned["status"] == "ok", pruned["error"]
    (notes,) = pruned["notes"]  # one step
    assert notes["heads"] == {"per_layer_before": 4, "per_layer_after": 2}
    assert notes["intermediate_size"] == {"per_layer_before": 64, "per_layer_after": 32}
    assert notes["layout"] == {"roberta": "bert"}.get(family, family)
    for art in r["artifacts"]:
        assert art["status"] == "ok", art
        if art["format"] == "onnx":
            assert art["parity"]["max_abs_diff"] < 1e-4
    # Every cell measured (a quick run's timing may be flagged unstable, which is still a measurement).
    assert {(c["variant"], c["backend"]) for c in r["cells"] if c["status"] in ("ok", "unstable")} == {
        (v, b) for v in ("baseline", "pruned") for b in ("torch-cpu", "ort-cpu")}


@pytest.mark.slow
def test_albert_is_refused_at_validate_and_the_advice_works(tmp_path, capsys):
    make_tiny_text_model(tmp_path / "albert", "albert")
    make_reviews_csv(tmp_path / "reviews.csv")
    recipe = write_yaml(tmp_path / "albert.yaml", _recipe("albert"))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "variants.pruned.steps[0].prune.method" in err and "'albert'" in err and "share weights" in err
    assert "DistilBERT" in err and "unstructured" in err and "Traceback" not in err
    # Followed, the advice works: unstructured pruning of the same model validates and builds.
    fixed = _recipe("albert", "unstructured")
    fixed = write_yaml(tmp_path / "albert-fixed.yaml", {**fixed, "export": {"formats": []},
                                                       "bench": {**fixed["bench"], "backends": ["torch-cpu"]}})
    assert main(["validate", str(fixed)]) == 0
    assert main(["run", str(fixed), "--out", str(tmp_path / "out"), "--quick"]) == 0
    r = json.loads((the_run_dir(tmp_path / "out", "tiny-albert") / "results.json").read_text())
    pruned = next(v for v in r["variants"] if v["name"] == "pruned")
    assert pruned["status"] == "ok" and pruned["notes"][0]["achieved_sparsity"] > 0.4


def test_an_unsupported_encoder_fails_the_step_with_the_same_advice_when_validate_cannot_see_it():
    """A python-source model is not built at validate; the step itself refuses it clearly."""
    from transformers import AlbertConfig, AlbertModel

    module = EmbeddingModel(AlbertModel(AlbertConfig(hidden_size=32, embedding_size=16, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64)).eval())
    ctx = StepContext(work_dir=Path("."), task=None, quick=True, seed=0, variant="p", export=None)
    with pytest.raises(ValueError, match="unstructured or 2:4"):
        Prune().run(VariantModel(io=None, module=module, source_module=module), {"method": "structured"}, ctx)
