"""Sequence packing (the pack-sequences step, `batching: packed`): requests packed in one row of tokens get
the answers each gets alone, in torch and in the exported graph; ordinary inputs get exactly the answers
of the unpacked model; a server packs the oldest waiting requests within its token cap; and a recipe that
asks to pack a model that cannot be packed is refused before any work, naming why."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bench.requests import pack, seq_axes
from bench.serving import pick_batch
from conftest import make_tiny_text_model, the_run_dir, write_yaml
from export.packing import PackSequences, packing_error
from workbench.cli import main
from workbench.sources.models import hf_model

IO_AXES = {"input_ids": 1, "attention_mask": 1}


def _embedder(tmp_path, family: str, pooling: str = "mean"):
    folder = make_tiny_text_model(tmp_path / family, family, head="embedding")
    return hf_model(str(folder), head="embedding", pooling=pooling)


@pytest.mark.parametrize("family, pooling", [("bert", "mean"), ("bert", "cls"), ("roberta", "mean")])
def test_requests_packed_in_one_row_get_the_answers_each_gets_alone(tmp_path, family, pooling):
    """RoBERTa's positions count from its padding index + 1, BERT's from 0: both restart per request."""
    src = _embedder(tmp_path, family, pooling)
    packed = copy.deepcopy(src.module)
    packed.packed = True
    assert packing_error(packed, src.io) < 1e-5
    # Ordinary inputs, right-padded: exactly the unpacked model's answers (one request per row).
    ids = torch.randint(5, 20, (3, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5, [1] * 1 + [0] * 8])
    with torch.no_grad():
        np.testing.assert_allclose(packed(ids, mask).numpy(), src.module(ids, mask).numpy(), atol=1e-6)


def test_the_packed_graph_answers_one_row_per_request(tmp_path):
    """Exported the workbench's way (dynamo, dynamic axes), the request count is read from the mask at run
    time, not fixed at the example's: a row of three requests answers three rows, a batch of ordinary rows
    one each."""
    import onnxruntime as ort

    from export.onnx import export_onnx

    src = _embedder(tmp_path, "bert")
    module = copy.deepcopy(src.module)
    module.packed = True
    export_onnx(module, src.io, tmp_path / "packed.onnx")
    session = ort.InferenceSession(str(tmp_path / "packed.onnx"), providers=["CPUExecutionProvider"])
    rows = [{"input_ids": np.array([[2] + [7] * n + [3]]), "attention_mask": np.ones((1, n + 2), np.int64)}
            for n in (3, 9, 1)]
    row = pack(rows, IO_AXES, {"input_ids": 0, "attention_mask": 0}, multiple=8)
    assert row["attention_mask"].tolist() == [[1] * 5 + [2] * 11 + [3] * 3 + [0] * 5]  # 19 tokens, padded to 24
    together = session.run(None, row)[0]
    with torch.no_grad():
        alone = torch.cat([src.module(*(torch.from_numpy(r[k]) for k in ("input_ids", "attention_mask")))
                           for r in rows]).numpy()
    assert together.shape == (3, alone.shape[1])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    ordinary = session.run(None, {"input_ids": np.full((2, 6), 7), "attention_mask": np.ones((2, 6), np.int64)})[0]
    assert ordinary.shape == (2, alone.shape[1])


def test_packing_cuts_to_an_exact_width_for_warm_up():
    rows = [{"input_ids": np.full((1, n), 9), "attention_mask": np.ones((1, n), np.int64)} for n in (4, 6)]
    pad = {"input_ids": 0, "attention_mask": 0}
    assert pack(rows, seq_axes(_io()), pad, multiple=4)["input_ids"].shape == (1, 12)
    cut = pack(rows, IO_AXES, pad, multiple=4, width=8)
    assert cut["attention_mask"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 2]]


def _io():
    from core.model import ModelIO

    return ModelIO(inputs={k: {"shape": ["batch", "seq"], "dtype": "int64"} for k in ("input_ids", "attention_mask")},
                   kind="embedding")


def test_a_packed_batch_takes_the_oldest_requests_while_their_tokens_fit_the_cap():
    # Packed, widths are the requests' own tokens and a batch costs their sum: first in, first out (a long
    # request costs the others nothing), stopping before the one that would pass the cap.
    assert pick_batch([20, 100, 10, 30], 8, True, 128, packed=True) == ([0, 1], True)
    assert pick_batch([20, 100, 10, 30], 8, True, 0, packed=True) == ([0, 1, 2, 3], False)
    assert pick_batch([200, 10], 8, True, 128, packed=True) == ([0], True)  # the oldest always goes
    assert pick_batch([5] * 10, 4, False, 128, packed=True) == ([0, 1, 2, 3], True)


def test_a_model_that_cannot_be_packed_is_refused_with_the_reason(tmp_path):
    distil = _embedder(tmp_path, "distilbert")
    assert "takes no position_ids" in PackSequences.unfit({}, distil.module)
    classifier = hf_model(str(make_tiny_text_model(tmp_path / "cls", "bert")), head="sequence-classification")
    assert "sentence-embedding models" in PackSequences.unfit({}, classifier.module)


def _load_recipe(packed_steps, scenario: dict) -> dict:
    return {
        "name": "pack-load",
        "model": {"source": "hf", "path": "./bert", "head": "embedding"},
        "task": {"type": "embedding-fidelity", "data": {"source": "builtin", "name": "stdlib-docstrings"},
                 "eval_size": 24, "max_length": 24},
        "variants": {"baseline": {"backends": ["ort-cpu"]},
                     "packed": {"from": "baseline", "steps": packed_steps, "backends": ["openvino-cpu"]}},
        "export": {"formats": ["onnx", "openvino"]},
        "bench": {"backends": ["ort-cpu", "openvino-cpu"], "batch_sizes": [1], "seq_len": 24, "repeats": 1,
                  "profile": False,
                  "timing": {"warmup": 2, "min_iters": 5, "min_seconds": 0.05, "stability_threshold": 100.0},
                  "scenarios": [scenario]},
    }


PACKED_SERVER = {"type": "server", "latency_bound_ms": 30, "max_batch": 4, "max_wait_ms": 1, "max_steps": 3,
                 "batching": "packed", "max_batch_tokens": 48, "pad_multiple": 8, "variants": ["packed"]}


@pytest.mark.parametrize("change, field, words", [
    ({"variants": ["baseline"]}, "bench.scenarios[0].batching", "'baseline' is not made with the pack-sequences"),
    ({"inputs": "synthetic"}, "bench.scenarios[0].inputs", "packs the task's own requests"),
])
def test_a_packed_scenario_needs_a_packed_variant_and_the_tasks_requests(tmp_path, capsys, change, field, words):
    make_tiny_text_model(tmp_path / "bert", "bert", head="embedding")
    recipe = write_yaml(tmp_path / "r.yaml", _load_recipe(["pack-sequences"], {**PACKED_SERVER, **change}))
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert field in err and words in err and "Traceback" not in err


def test_packing_a_model_whose_encoder_takes_no_positions_is_refused_before_any_work(tmp_path, capsys):
    make_tiny_text_model(tmp_path / "bert", "distilbert", head="embedding")
    recipe = write_yaml(tmp_path / "r.yaml", _load_recipe(["pack-sequences"], PACKED_SERVER))
    assert main(["validate", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "pack-sequences" in err and "takes no position_ids" in err and "Traceback" not in err


@pytest.mark.serial
@pytest.mark.slow
def test_an_int8_packed_variant_is_served_packed_under_loadgen(tmp_path):
    """pack-sequences, then NNCF int8, then OpenVINO with a static shape per padded row width: the server
    packs its requests, every width is compiled at warm-up, and the engine's packed answers match each
    request's alone before any test."""
    pytest.importorskip("mlperf_loadgen")
    make_tiny_text_model(tmp_path / "bert", "bert", head="embedding")
    spec = _load_recipe(["pack-sequences", {"nncf-quantize": {"subset_size": 16}}], PACKED_SERVER)
    recipe = write_yaml(tmp_path / "r.yaml", spec)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    r = __import__("json").loads((the_run_dir(tmp_path / "out", "pack-load") / "results.json").read_text())
    variant = {v["name"]: v for v in r["variants"]}["packed"]
    step = next(n for n in variant["notes"] if n["step"] == "pack-sequences")
    assert variant["status"] == "ok" and step["packing"]["max_abs_diff_vs_alone"] < 1e-4
    cell, = r["load"]
    assert cell["status"] in ("ok", "unstable"), cell["reason"]
    req = cell["load"]["requests"]
    assert req["packed"] and req["packed_max_abs_diff"] < 0.05
    # One row at each width 8, 16, ..., 48 (the cap), compiled at warm-up; no test met another.
    assert req["shapes_warmed"] == 6 and req["static_shapes"] == {"after_warmup": 6, "after_tests": 6}, req
    assert cell["load"]["server"]["valid"], cell["load"]["server"]
    assert "packed in one row, ≤ 48 tokens" in (the_run_dir(tmp_path / "out", "pack-load") / "report.md").read_text()
