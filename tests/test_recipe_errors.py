"""A broken recipe is refused before any work is done: `validate` and `run` both exit 2, print one
message on stderr that names the field (and, where there is a list, what is accepted), never a
traceback, and `run` leaves no run directory behind."""
from __future__ import annotations

import copy
import re

import pytest
import yaml

from workbench.cli import main

# Cheap on purpose: if a broken recipe ever got through, its run would still be short.
BASE = {
    "name": "broken",
    "model": {"source": "builtin", "name": "digits-cnn"},
    "task": {"type": "classification", "data": {"source": "builtin", "name": "digits"}},
    "variants": {"baseline": {}},
    "export": {"formats": []},
    "bench": {"backends": ["torch-cpu"], "batch_sizes": [1],
              "timing": {"warmup": 0, "min_iters": 5, "min_seconds": 0}},
}


def recipe(**changes) -> dict:
    """BASE with top-level keys replaced (a value of None removes the key)."""
    r = copy.deepcopy(BASE)
    for k, v in changes.items():
        if v is None:
            r.pop(k, None)
        else:
            r[k] = v
    return r


def with_variants(**variants) -> dict:
    return recipe(variants={"baseline": {}, **variants})


def with_bench(**bench) -> dict:
    return recipe(bench={**BASE["bench"], **bench})


# id -> (recipe as a dict or literal YAML text, substrings the message must contain)
CASES = {
    "unknown-top-level-key": (
        recipe(colour="red"),
        ["'colour'", "unknown key", "Accepted", "'variants'", "'bench'"]),
    "unknown-step-name": (
        with_variants(x={"from": "baseline", "steps": ["shrink"]}),
        ["variants.x.steps[0]", "unknown step", "'shrink'", "Accepted", "'prune'", "'quantize'"]),
    "bad-step-param-value": (
        with_variants(x={"from": "baseline", "steps": [{"prune": {"ratio": 1.5}}]}),
        ["variants.x.steps[0].prune.ratio", "1.5"]),
    "unknown-step-param-key": (
        with_variants(x={"from": "baseline", "steps": [{"quantize": {"bits": 4}}]}),
        ["variants.x.steps[0].quantize.bits", "unknown key", "Accepted", "'method'"]),
    "variant-backend-unknown": (
        with_variants(x={"from": "baseline", "backends": ["torch-gpu"]}),
        ["variants.x.backends[0]", "'torch-gpu'", "accepted", "torch-compile-cpu"]),
    "variant-option-bad-value": (
        {**with_variants(x={"from": "baseline", "backends": ["openvino-cpu"],
                            "options": {"openvino-cpu": {"inference_precision": "q2"}}}),
         "export": {"formats": ["openvino"]}},
        ["variants.x.options.openvino-cpu.inference_precision", "'q2'", "bf16"]),
    "variant-format-the-run-does-not-export": (
        with_variants(x={"from": "baseline", "formats": ["torchscript"]}),
        ["variants.x.formats[0]", "'torchscript'", "narrow export.formats"]),
    "variant-options-on-a-reference": (
        with_variants(x={"reference": True, "backends": ["torch-cpu"], "options": {"llama-cpp": {"n_ctx": 64}}}),
        ["variants.x.options", "reference", "engine's defaults"]),
    "from-names-no-variant": (
        with_variants(pruned={"from": "nothing", "steps": [{"prune": {"ratio": 0.3}}]}),
        ["variants.pruned.from", "'nothing'", "Accepted", "'baseline'"]),
    "variant-cycle": (
        with_variants(a={"from": "b"}, b={"from": "a"}),
        [re.compile(r"variants\.[ab]\.from"), "cycle"]),
    "hf-model-path-missing": (
        recipe(model={"source": "hf", "path": "./nope"}, task={"type": "none"}),
        ["model.path", "./nope", "no such directory"]),
    "hf-hub-id-not-in-the-offline-cache": (
        recipe(model={"source": "hf", "path": "no-such-org/no-such-model"}, task={"type": "none"}),
        ["model.path", "no-such-org/no-such-model", "local Hugging Face cache", "offline"]),
    "unknown-backend": (
        with_bench(backends=["torch-cpu", "torch-tpu"]),
        ["bench.backends", "'torch-tpu'", "ort-cpu"]),
    "batch-size-zero": (
        with_bench(batch_sizes=[1, 0]),
        ["bench.batch_sizes", "greater than 0"]),
    "bad-yaml-syntax": (
        "name: broken\nmodel: {source: builtin, name: digits-cnn}\nvariants:\n  baseline: {}\n"
        "bench: {backends: [torch-cpu\n",
        ["not valid YAML", "line"]),
    "task-does-not-fit-model": (
        recipe(task={"type": "embedding-fidelity", "data": {"source": "builtin", "name": "stdlib-docstrings"}}),
        ["task.type", "embedding-fidelity", "Accepted", "'classification'"]),
    "torch-step-after-onnx-step": (
        with_variants(x={"from": "baseline", "steps": [{"onnx-quantize": {"mode": "dynamic"}},
                                                       {"quantize": {"method": "dynamic-int8"}}]}),
        ["variants.x.steps[1]", "quantize"]),
    "report-baseline-names-no-variant": (
        recipe(report={"baseline": "reference"}),
        ["report.baseline", "'reference'", "Accepted", "'baseline'"]),
    "model-missing": (
        recipe(model=None),
        ["'model'", "required"]),
    "unknown-export-format": (
        recipe(export={"formats": ["onnx", "tflite"]}),
        ["export.formats", "'tflite'", "torchscript"]),
    "timing-below-minimum": (
        with_bench(timing={"min_iters": 2}),
        ["bench.timing.min_iters", "2"]),
    "bad-variant-name": (
        with_variants(**{"has space": {}}),
        ["variants.has space"]),
}

XFAIL: dict = {}


def _params():
    return [pytest.param(case, id=case, marks=XFAIL.get(case, ())) for case in CASES]


def _assert_message(err: str, expected) -> None:
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in expected:
        if isinstance(needle, re.Pattern):
            assert needle.search(err), f"{needle.pattern!r} not in {err!r}"
        else:
            assert needle in err, f"{needle!r} not in {err!r}"


def _write(tmp_path, spec) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec, sort_keys=False))
    return str(path)


@pytest.mark.parametrize("case", _params())
def test_broken_recipe_is_refused_by_validate_and_run(case, tmp_path, tmp_out, capsys):
    spec, expected = CASES[case]
    path = _write(tmp_path, spec)

    assert main(["validate", path]) == 2
    out, err = capsys.readouterr()
    _assert_message(err, expected)
    assert path in err  # the message names the file
    assert "valid (" not in out

    assert main(["run", path, "--out", str(tmp_out)]) == 2
    out, err = capsys.readouterr()
    _assert_message(err, expected)
    assert "Traceback" not in out
    # Refused before any work: nothing under --out, so nothing that could pass for a run.
    assert not tmp_out.exists() or not any(tmp_out.rglob("*"))


def test_recipe_file_that_does_not_exist(tmp_path, tmp_out, capsys):
    path = str(tmp_path / "no-such-recipe.yaml")
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert path in err and "cannot read" in err and "Traceback" not in err

    assert main(["run", path, "--out", str(tmp_out)]) == 2
    err = capsys.readouterr().err
    assert path in err and "Traceback" not in err
    assert not tmp_out.exists()


def test_recipe_that_is_not_a_mapping(tmp_path, capsys):
    path = _write(tmp_path, "- just\n- a list\n")
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "mapping" in err and "Traceback" not in err


def test_missing_command_line_argument_exits_2(capsys):
    assert main(["validate"]) == 2
    err = capsys.readouterr().err
    assert "recipe" in err and "Traceback" not in err


def test_valid_base_recipe_is_accepted(tmp_path, capsys):
    """The cases above are broken only by what each one changes."""
    path = _write(tmp_path, BASE)
    assert main(["validate", path]) == 0
    assert "valid (1 variants" in capsys.readouterr().out


def test_list_index_in_field_path_is_written_like_the_steps_path(tmp_path, capsys):
    path = _write(tmp_path, with_bench(batch_sizes=[1, 0]))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    assert "'bench.batch_sizes[1]'" in err


def test_unknown_top_level_key_does_not_offer_internal_fields(tmp_path, capsys):
    path = _write(tmp_path, recipe(colour="red"))
    assert main(["validate", path]) == 2
    err = capsys.readouterr().err
    accepted = err.split("Accepted:", 1)[1]
    assert "'sha256'" not in accepted and "'path'" not in accepted
