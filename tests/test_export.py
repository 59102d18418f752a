"""Export: ONNX (dynamo), TorchScript and torch.export files reload in a fresh process and match
their source at two sequence lengths; ORT transformer fusion says which fusions happened."""
import numpy as np
import pytest
import torch

from export.onnx import export_onnx
from export.onnx_optimize import OnnxOptimize
from export.parity import parity
from export.reload import outputs_in_fresh_process
from export.torch_export import export_pt2
from export.torchscript import export_torchscript
from runtime.infer import onnx_outputs, torch_outputs
from core.model import VariantModel
from workbench.sources.models import EmbeddingModel, text_io
from core.steps import StepContext


@pytest.fixture(scope="module")
def tiny_encoder():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, max_position_embeddings=64)
    return EmbeddingModel(BertModel(cfg).eval()).eval(), text_io(100, "embedding")


def _padded_batches(io):
    """Two sequence lengths, the second with padding, as real tokenized batches have."""
    short = io.make(batch=1, seq=8, seed=3)
    long = io.make(batch=3, seq=24, seed=4)
    long["attention_mask"][0, 15:] = 0
    return [short, long]


@pytest.mark.slow
@pytest.mark.parametrize("fmt, export, name", [
    ("onnx", lambda m, io, p: export_onnx(m, io, p), "model.onnx"),
    ("torchscript", export_torchscript, "model.torchscript.pt"),
    ("torch-export", export_pt2, "model.pt2"),
])
def test_export_reloads_in_a_fresh_process_and_matches_at_two_sequence_lengths(tiny_encoder, tmp_path, fmt,
                                                                               export, name):
    module, io = tiny_encoder
    record = export(module, io, tmp_path / name)
    assert record["exporter"]
    batches = _padded_batches(io)
    out = outputs_in_fresh_process(fmt, tmp_path / name, batches)
    ref = torch_outputs(module, batches)
    assert out.shape == (4, 32)
    assert parity(ref, out, "embedding")["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_optimum_export_takes_the_models_inputs_and_pools_as_it_does(tiny_encoder, tmp_path, pooling):
    """optimum exports the bare encoder; the completed graph takes input_ids and attention_mask only,
    pools like EmbeddingModel and matches it after a fresh-process reload, at two lengths."""
    import onnx

    module, io = EmbeddingModel(tiny_encoder[0].encoder, pooling).eval(), tiny_encoder[1]
    record = export_onnx(module, io, tmp_path / "opt.onnx", exporter="optimum")
    assert record["exporter"] == "optimum (feature-extraction)" and record["fallback_reason"] is None
    graph = onnx.load(str(tmp_path / "opt.onnx")).graph
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in graph.output] == [io.output]
    batches = _padded_batches(io)
    out = outputs_in_fresh_process("onnx", tmp_path / "opt.onnx", batches)
    assert parity(torch_outputs(module, batches), out, "embedding")["max_abs_diff"] < 1e-4


def test_optimum_export_of_a_model_it_does_not_know_falls_back_and_says_why(tmp_path):
    from workbench.sources.models import DIGITS_IO, DigitsCNN

    record = export_onnx(DigitsCNN().eval(), DIGITS_IO, tmp_path / "cnn.onnx", exporter="optimum")
    assert record["exporter"] == "torch.onnx (dynamo)"
    assert "optimum exports Hugging Face models" in record["fallback_reason"]


def test_onnx_export_uses_the_dynamo_exporter_by_default(tiny_encoder, tmp_path):
    module, io = tiny_encoder
    record = export_onnx(module, io, tmp_path / "m.onnx")
    assert record["exporter"] == "torch.onnx (dynamo)" and record["fallback_reason"] is None


def test_bert_fusion_records_attention_fusions_and_keeps_the_outputs(tiny_encoder, tmp_path):
    module, io = tiny_encoder
    export_onnx(module, io, tmp_path / "plain.onnx", exporter="torchscript")
    model = VariantModel(io=io, onnx_path=tmp_path / "plain.onnx", source_module=module)
    work = tmp_path / "work"
    work.mkdir()
    ctx = StepContext(work_dir=work, task=None, quick=True, seed=0, variant="fused", export=None)
    fused = OnnxOptimize().run(model, {"fusion": "bert", "level": "extended"}, ctx)
    assert ctx.notes["fusions"].get("Attention") == 2  # one per layer
    assert ctx.notes["fusion_config"] == {"num_heads": 2, "hidden_size": 32}
    batches = _padded_batches(io)
    diff = np.abs(onnx_outputs(fused.onnx_path, batches) - torch_outputs(module, batches)).max()
    assert diff < 1e-4



def test_bert_fusion_of_a_head_pruned_encoder_uses_the_heads_it_has(tiny_encoder, tmp_path):
    """prune_heads leaves config.num_attention_heads as it was; fusion must read the layers instead."""
    import copy

    from compress.prune import Prune

    io = tiny_encoder[1]
    ctx = StepContext(work_dir=tmp_path, task=None, quick=True, seed=0, variant="p", export=None)
    module = Prune().run(VariantModel(io=io, module=copy.deepcopy(tiny_encoder[0])),
                         {"method": "structured", "targets": ["heads"], "head_ratio": 0.5}, ctx).module
    assert module.encoder.config.num_attention_heads == 2
    export_onnx(module, io, tmp_path / "plain.onnx", exporter="torchscript")
    work = tmp_path / "work"
    work.mkdir()
    ctx = StepContext(work_dir=work, task=None, quick=True, seed=0, variant="fused", export=None)
    fused = OnnxOptimize().run(VariantModel(io=io, onnx_path=tmp_path / "plain.onnx", source_module=module),
                               {"fusion": "bert"}, ctx)
    assert ctx.notes["fusion_config"] == {"num_heads": 1, "hidden_size": 16}
    batches = _padded_batches(io)
    assert np.abs(onnx_outputs(fused.onnx_path, batches) - torch_outputs(module, batches)).max() < 1e-4

def _quantize(module, io, tmp_path, params, task=None):
    from export.onnx_quantize import OnnxQuantize

    export_onnx(module, io, tmp_path / "plain.onnx")
    work = tmp_path / "q"
    work.mkdir()
    ctx = StepContext(work_dir=work, task=task, quick=True, seed=0, variant="q", export=None)
    out = OnnxQuantize().run(VariantModel(io=io, onnx_path=tmp_path / "plain.onnx", source_module=module), params, ctx)
    batches = _padded_batches(io)
    return parity(torch_outputs(module, batches), onnx_outputs(out.onnx_path, batches), "embedding"), ctx.notes


def test_int4_weight_only_quantization_makes_matmulnbits_nodes(tiny_encoder, tmp_path):
    module, io = tiny_encoder
    par, notes = _quantize(module, io, tmp_path, {"mode": "int4", "block_size": 16, "accuracy_level": 4})
    assert notes["matmul_nbits_nodes"] >= 12  # Q, K, V, O and two FFN matmuls in each of two layers
    assert par["cosine_min"] > 0.9


def test_static_qdq_quantization_calibrates_on_task_batches(tiny_encoder, tmp_path):
    from workbench.tasks import Task

    module, io = tiny_encoder
    task = Task("embedding-fidelity", train_batches=[io.make(4, 16, seed=s) for s in range(4)])
    par, notes = _quantize(module, io, tmp_path, {"mode": "static", "calibration_batches": 3}, task)
    assert notes["calibration"] == {"batches": 3, "method": "MinMax"}
    assert par["cosine_min"] > 0.8


@pytest.mark.slow
def test_transformer_pruning_shrinks_ffn_and_heads_and_round_trips_through_save_pretrained(tiny_encoder, tmp_path):
    import copy

    from transformers import BertModel

    from compress.prune import Prune

    module = copy.deepcopy(tiny_encoder[0])
    io = tiny_encoder[1]
    ctx = StepContext(work_dir=tmp_path, task=None, quick=True, seed=0, variant="p", export=None)
    pruned = Prune().run(VariantModel(io=io, module=module), {"method": "structured", "ratio": 0.5}, ctx).module
    assert ctx.notes["intermediate_size"] == {"per_layer_before": 37, "per_layer_after": 18}
    assert ctx.notes["heads"] == {"per_layer_before": 2, "per_layer_after": 1}
    assert ctx.notes["params_after"] < ctx.notes["params_before"]
    batches = _padded_batches(io)
    out = torch_outputs(pruned, batches)
    pruned.encoder.save_pretrained(tmp_path / "hf")
    reloaded = EmbeddingModel(BertModel.from_pretrained(tmp_path / "hf").eval()).eval()
    assert np.abs(torch_outputs(reloaded, batches) - out).max() < 1e-5
    export_onnx(pruned, io, tmp_path / "pruned.onnx")
    assert np.abs(onnx_outputs(tmp_path / "pruned.onnx", batches) - out).max() < 1e-4


def _text_task(io, n_batches=6, seed=10):
    from workbench.tasks import Task

    return Task("embedding-fidelity", train_batches=[io.make(batch=8, seq=12, seed=seed + i) for i in range(n_batches)])


@pytest.mark.parametrize("targets, params", [
    (["heads"], {"head_ratio": 0.5}),
    (["ffn"], {"ratio": 9 / 37}),
])
def test_activation_importance_removes_what_adds_nothing(tiny_encoder, tmp_path, targets, params):
    """A head whose value projection is zero, and FFN channels that never fire, add nothing to the
    output, yet their weights are the largest: magnitude keeps them, activation removes them and
    leaves the outputs unchanged."""
    import copy

    from compress.prune import Prune

    module = copy.deepcopy(tiny_encoder[0])
    io = tiny_encoder[1]
    with torch.no_grad():
        for layer in module.encoder.encoder.layer:
            if targets == ["heads"]:
                att = layer.attention.self
                att.value.weight[:16] = 0  # head 0 (of two heads of 16) reads nothing
                att.value.bias[:16] = 0
                att.query.weight[:16] *= 10  # and looks important by weight norm
                att.key.weight[:16] *= 10
            else:
                dense = layer.intermediate.dense
                dense.weight[:9] *= 10  # large weights, but a bias far below zero: GELU gives 0, never fires
                dense.bias[:9] = -1000
                layer.output.dense.weight[:, :9] *= 10
    batches = _padded_batches(io)
    before = torch_outputs(module, batches)
    outs = {}
    for importance in ("magnitude", "activation"):
        ctx = StepContext(work_dir=tmp_path, task=_text_task(io), quick=True, seed=0, variant="p", export=None)
        step = {"method": "structured", "targets": targets, "importance": importance, **params}
        outs[importance] = torch_outputs(Prune().run(VariantModel(io=io, module=module), step, ctx).module, batches)
    assert np.abs(outs["activation"] - before).max() < 1e-4
    assert np.abs(outs["magnitude"] - before).max() > 1e-3


def _knocked_about(student, seed=1, scale=0.5):
    """A random tiny encoder barely notices pruning (its embeddings dominate): knock its layers
    about so that there is something to win back."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for w in student.encoder.encoder.parameters():
            w.add_(torch.randn_like(w) * scale)
    return student


def _pruned_student(tiny_encoder, tmp_path):
    """The tiny encoder pruned by half (activation importance) and knocked about, and the context of a
    distill step whose teacher ('baseline') is the unpruned encoder."""
    import copy

    from compress.prune import Prune

    teacher_module, io = tiny_encoder
    teacher = VariantModel(io=io, module=teacher_module)
    task = _text_task(io, n_batches=20)
    ctx = StepContext(work_dir=tmp_path, task=task, quick=False, seed=0, variant="s", export=None)
    pruned = Prune().run(VariantModel(io=io, module=copy.deepcopy(teacher_module)),
                         {"method": "structured", "ratio": 0.5, "importance": "activation"}, ctx)
    _knocked_about(pruned.module)
    return pruned, StepContext(work_dir=tmp_path, task=task, quick=False, seed=0, variant="s", export=None,
                               lookup=lambda name: teacher if name == "baseline" else None)


@pytest.mark.slow
def test_hidden_state_distillation_brings_a_pruned_encoder_back_toward_its_teacher(tiny_encoder, tmp_path):
    from compress.distill import Distill

    pruned, ctx = _pruned_student(tiny_encoder, tmp_path)
    params = {"teacher": "baseline", "epochs": 4, "lr": 3e-3, "hidden_weight": 1.0, "schedule": "onecycle",
              "dropout": 0.0, "freeze_embeddings": True, "patience": 4}
    student = Distill().run(pruned, params, ctx).module
    notes = ctx.notes
    assert notes["hidden_weight"] == 1.0 and notes["epochs_run"] == 4
    assert notes["val_best"] > notes["val_before"] + 0.01, notes
    # The overrides last only for training: dropout and trainable embeddings are as they were.
    assert all(m.p == 0.1 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    assert all(w.requires_grad for w in student.parameters())


def test_hidden_state_distillation_needs_an_encoder_of_the_same_depth(tiny_encoder, tmp_path):
    import copy

    from compress.distill import Distill

    teacher_module, io = tiny_encoder
    student = copy.deepcopy(teacher_module)
    del student.encoder.encoder.layer[1]
    ctx = StepContext(work_dir=tmp_path, task=_text_task(io), quick=True, seed=0, variant="s", export=None,
                      lookup=lambda name: VariantModel(io=io, module=teacher_module))
    with pytest.raises(ValueError, match="same depth"):
        Distill().run(VariantModel(io=io, module=student), {"teacher": "baseline", "hidden_weight": 1.0}, ctx)


def test_layer_inputs_carried_forward_layer_by_layer_are_what_the_whole_model_feeds_each_layer(tiny_encoder):
    """Pruning statistics and the layer phase run one layer at a time on cached inputs instead of the
    whole model up to that layer: on padded batches, both give each layer the same input."""
    from compress.capture import layer_inputs, next_inputs

    module, io = tiny_encoder
    layers = list(module.encoder.encoder.layer)
    batches = _padded_batches(io)
    carried = layer_inputs(module, layers[0], batches)
    for i in range(1, len(layers)):
        carried = next_inputs(layers[i - 1], carried)
        direct = layer_inputs(module, layers[i], batches)
        for c, d in zip(map(_hidden_states, carried), map(_hidden_states, direct)):
            assert c.shape == d.shape and torch.allclose(c, d, atol=1e-6)


def _hidden_states(inputs):
    args, kwargs = inputs
    return args[0] if args else kwargs["hidden_states"]


def test_activation_pruning_refits_layer_by_layer_and_stays_closer_than_magnitude(tiny_encoder, tmp_path):
    """Ranked by activation, each layer is refit to the unpruned model's LayerNorm inputs given what
    the already-pruned layers feed it; the pruned encoder stays closer to the original than one
    pruned by weight magnitude alone."""
    import copy

    from compress.prune import Prune
    from workbench.tasks import embedding_fidelity

    module, io = tiny_encoder
    module = _knocked_about(copy.deepcopy(module), scale=0.3)  # layers that matter to the output
    batches = _padded_batches(io)
    before = torch_outputs(module, batches)
    cosine = {}
    for importance in ("magnitude", "activation"):
        ctx = StepContext(work_dir=tmp_path, task=_text_task(io, n_batches=16), quick=False, seed=0, variant="p",
                          export=None)
        step = {"method": "structured", "ratio": 0.5, "importance": importance}
        pruned = Prune().run(VariantModel(io=io, module=module), step, ctx).module
        cosine[importance] = embedding_fidelity(torch_outputs(pruned, batches), before)["cosine_mean"]
        if importance == "activation":
            assert ctx.notes["refit"].startswith("least squares, layer by layer")
    assert cosine["activation"] > cosine["magnitude"] + 0.01, cosine


@pytest.mark.slow
def test_layerwise_distillation_trains_each_layer_toward_the_teacher_then_end_to_end(tiny_encoder, tmp_path):
    from compress.distill import Distill

    pruned, ctx = _pruned_student(tiny_encoder, tmp_path)
    pruned.module.train()
    params = {"teacher": "baseline", "epochs": 1, "lr": 1e-4, "layerwise_epochs": 3, "layerwise_lr": 3e-3,
              "freeze_embeddings": True}
    student = Distill().run(pruned, params, ctx).module
    lw = ctx.notes["layerwise"]
    assert len(lw["layers"]) == 2 and lw["epochs"] == 3
    assert all(layer["mse_last"] < layer["mse_first"] for layer in lw["layers"]), lw
    assert lw["val_after"] > ctx.notes["val_before"] + 0.01, ctx.notes
    assert ctx.notes["val_best"] >= lw["val_after"]
    # The layer phase freezes all but one layer at a time: every weight trains again afterwards.
    assert all(w.requires_grad for w in student.parameters())


def test_distillation_that_only_hurts_returns_the_student_as_it_came(tiny_encoder, tmp_path):
    """A student that already matches its teacher can only lose; absurd learning rates make both
    the layer-by-layer and the end-to-end phase lose. The held-out tenth sees it, and the step hands
    back the untrained student rather than a worse one."""
    import copy

    from compress.distill import Distill

    teacher_module, io = tiny_encoder
    teacher = VariantModel(io=io, module=teacher_module)
    student = copy.deepcopy(teacher_module)
    batches = _padded_batches(io)
    before = torch_outputs(student, batches)
    ctx = StepContext(work_dir=tmp_path, task=_text_task(io, n_batches=10), quick=False, seed=0, variant="s",
                      export=None, lookup=lambda name: teacher)
    params = {"teacher": "baseline", "epochs": 1, "lr": 50.0, "layerwise_epochs": 1, "layerwise_lr": 50.0}
    out = Distill().run(VariantModel(io=io, module=student), params, ctx).module
    assert ctx.notes["val_best"] == ctx.notes["val_before"], ctx.notes
    assert np.abs(torch_outputs(out, batches) - before).max() < 1e-6
