"""Model and data sources, tasks and their metrics: the built-in digits task, the stdlib docstring
corpus, the embedding-fidelity metric, and a Hugging Face text classifier from a local folder and a
CSV file, run end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import make_reviews_csv, make_tiny_text_model
from workbench.cli import main
from runtime.infer import torch_outputs
from workbench.recipe import load_recipe
from workbench.sources.data import digits_split, read_text_file, stdlib_docstrings
from workbench.sources.models import load_model
from workbench.tasks import build_task, embedding_fidelity, grouped_split


# ----------------------------------------------------------------------------- digits
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    path = tmp_path_factory.mktemp("digits") / "digits.yaml"
    path.write_text("name: digits\nmodel: {source: builtin, name: digits-cnn}\n"
                    "task: {type: classification, data: {source: builtin, name: digits}}\n"
                    "variants: {baseline: {}}\n")
    recipe = load_recipe(path)
    src = load_model(recipe)
    return recipe, src, build_task(recipe, src)


def test_digits_task_holds_out_450_examples(digits):
    _, _, task = digits
    assert task.type == "classification"
    assert task.primary == "accuracy"
    assert task.eval_size == 450
    assert len(task.labels) == 450
    assert set(np.unique(task.labels)) == set(range(10))
    assert next(iter(task.eval_batches[0].values())).shape[1:] == (1, 8, 8)


def test_digits_split_is_fixed_and_stratified():
    x_tr, y_tr, x_te, y_te = digits_split()
    assert len(x_tr) == len(y_tr) == 1347 and len(x_te) == len(y_te) == 450
    again = digits_split()
    assert np.array_equal(again[2], x_te) and np.array_equal(again[3], y_te)  # the CNN never sees these
    assert np.bincount(y_te).min() >= 40  # every digit is in the held-out split
    assert x_te.dtype == np.float32 and 0.0 <= x_te.min() and x_te.max() <= 1.0


def test_builtin_digits_cnn_is_accurate_on_the_heldout_split(digits):
    _, src, task = digits
    out = torch_outputs(src.module, task.eval_batches)
    assert out.shape == (450, 10)
    assert task.metrics(out)["accuracy"] > 0.9


def test_classification_metric_counts_argmax_matches(digits):
    _, _, task = digits
    perfect = np.eye(10, dtype=np.float32)[task.labels]
    assert task.metrics(perfect) == {"accuracy": 1.0}
    wrong = np.eye(10, dtype=np.float32)[(task.labels + 1) % 10]
    assert task.metrics(wrong) == {"accuracy": 0.0}


# ----------------------------------------------------------------------------- stdlib docstrings
def test_stdlib_docstrings_are_nonempty_and_disjoint():
    train, heldout = stdlib_docstrings()
    assert len(train) > 100 and len(heldout) > 20
    assert not set(train) & set(heldout)
    assert all(isinstance(t, str) and len(t) >= 40 for t in heldout)


@pytest.mark.slow
def test_stdlib_docstrings_split_is_stable_across_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path))
    built = stdlib_docstrings()  # extracted from the standard library
    assert list(tmp_path.glob("stdlib-docstrings-*.json"))
    cached = stdlib_docstrings()  # read back from the cache
    assert built == cached


# ----------------------------------------------------------------------------- metrics
def test_embedding_fidelity_of_identical_embeddings_is_perfect():
    emb = np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32)
    m = embedding_fidelity(emb, emb.copy())
    assert m["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["spearman"] == pytest.approx(1.0, abs=1e-9)


def test_embedding_fidelity_ignores_scale_but_not_direction():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(30, 8))
    assert embedding_fidelity(3.0 * ref, ref)["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert embedding_fidelity(-ref, ref)["cosine_mean"] == pytest.approx(-1.0, abs=1e-9)
    noisy = embedding_fidelity(ref + rng.normal(scale=2.0, size=ref.shape), ref)
    assert noisy["cosine_mean"] < 0.9 and noisy["spearman"] < 0.9


# ----------------------------------------------------------------------------- text files
def test_read_text_file_csv_and_jsonl(tmp_path):
    from core.errors import RecipeError

    (tmp_path / "d.csv").write_text("text,label\nhello there,1\nbye now,0\n")
    assert read_text_file(tmp_path / "d.csv", "text", "label") == (["hello there", "bye now"], ["1", "0"])
    (tmp_path / "d.jsonl").write_text('{"t": "a b", "y": 1}\n\n{"t": "c d", "y": 0}\n')
    assert read_text_file(tmp_path / "d.jsonl", "t", "y") == (["a b", "c d"], [1, 0])
    with pytest.raises(RecipeError, match="field 'task.data.label_field': no column 'label'"):
        read_text_file(tmp_path / "d.jsonl", "t", "label")


def test_read_text_file_takes_what_spreadsheets_write_and_names_the_rows_it_cannot(tmp_path):
    from core.errors import RecipeError

    # A byte-order mark and semicolons (a spreadsheet's "CSV UTF-8" in a comma-decimal locale), a quoted newline.
    (tmp_path / "excel.csv").write_bytes('\ufefftext;label\n"hello; there\nfriend";1\nbye now;0\n'.encode("utf-8"))
    assert read_text_file(tmp_path / "excel.csv", "text", "label") == (["hello; there\nfriend", "bye now"], ["1", "0"])
    (tmp_path / "null.jsonl").write_text('{"text": "a", "label": 1}\n{"text": null, "label": 0}\n{"label": 1}\n')
    with pytest.raises(RecipeError, match=r"task.data.text_field'.*2 row\(s\) have no 'text' \(rows 2, 3\)"):
        read_text_file(tmp_path / "null.jsonl", "text", "label")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(RecipeError, match="line 2 is not JSON"):
        read_text_file(tmp_path / "broken.jsonl", "text", "label")


# ----------------------------------------------------------------------------- HF text classifier
TEXT_RECIPE = """\
name: tiny-text
model: {source: hf, path: ./tiny-bert, head: sequence-classification}
task: {type: text-classification, data: {source: file, path: data.csv}, max_length: 16}
variants: {baseline: {}}
export: [onnx]
bench:
  backends: [torch-cpu, ort-cpu]
  batch_sizes: [1]
  seq_len: 16
  timing: {warmup: 2, min_iters: 5, min_seconds: 0.05, stability_threshold: 100.0}
"""


@pytest.fixture(scope="module")
def text_project(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    make_tiny_text_model(folder / "tiny-bert", "bert")
    make_reviews_csv(folder / "data.csv")
    (folder / "tiny-text.yaml").write_text(TEXT_RECIPE)
    return folder


def test_text_classification_recipe_validates(text_project, capsys):
    assert main(["validate", str(text_project / "tiny-text.yaml")]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "tiny-bert" in out and "metric: accuracy" in out, out


def test_text_classification_task_from_csv(text_project):
    recipe = load_recipe(text_project / "tiny-text.yaml")
    src = load_model(recipe)
    task = build_task(recipe, src)
    texts, labels = read_text_file(text_project / "data.csv", "text", "label")
    _, held = grouped_split(texts, labels, 0.25, recipe.seed)
    assert task.type == "classification" and task.primary == "accuracy"
    assert task.summary()["type"] == "text-classification"  # results.json says what the recipe asked for
    assert task.summary()["scoring"] == "classification"
    assert task.eval_size == len(held) > 0
    batch = task.eval_batches[0]
    assert set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].dtype == np.int64 and batch["input_ids"].shape[1] <= 16
    logits = torch_outputs(src.module, task.eval_batches)
    assert logits.shape == (task.eval_size, 2)


@pytest.mark.slow
def test_text_classification_quick_run(text_project, capsys):
    out = text_project / "out"
    assert main(["run", str(text_project / "tiny-text.yaml"), "--out", str(out), "--quick"]) == 0
    (run_dir,) = [d for d in (out / "tiny-text").iterdir() if d.is_dir() and d.name != "cache"]
    r = json.loads((run_dir / "results.json").read_text())

    (v,) = r["variants"]
    assert v["status"] == "ok", v["error"]
    assert 0.0 <= v["accuracy"]["accuracy"] <= 1.0

    (onnx_art,) = [a for a in r["artifacts"] if a["format"] == "onnx"]
    assert onnx_art["status"] == "ok", onnx_art["reason"]
    assert onnx_art["parity"]["max_abs_diff"] < 1e-4

    cells = {c["backend"]: c for c in r["cells"]}
    assert set(cells) == {"torch-cpu", "ort-cpu"}
    for c in cells.values():
        assert c["status"] in ("ok", "unstable"), c["reason"]  # measured (quick timing may be judged unstable)
        assert c["shape"] == {"seq_len": 16}
        # Both backends score the same model on the same rows: the same accuracy.
        assert c["accuracy"]["accuracy"] == pytest.approx(v["accuracy"]["accuracy"])


@pytest.mark.slow
def test_onnx_quantize_leaves_no_files_in_the_working_directory(text_project, tmp_path, monkeypatch):
    recipe = text_project / "quantized-text.yaml"
    recipe.write_text(TEXT_RECIPE.replace("name: tiny-text", "name: quantized-text")
                      .replace("variants: {baseline: {}}",
                               "variants: {baseline: {}, int8: {from: baseline, steps: [onnx-quantize]}}")
                      .replace("export: [onnx]", "export: []")
                      .replace("backends: [torch-cpu, ort-cpu]", "backends: [ort-cpu]"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["run", str(recipe), "--out", str(tmp_path / "out"), "--quick"]) == 0
    (run_dir,) = [d for d in (tmp_path / "out" / "quantized-text").iterdir() if d.is_dir() and d.name != "cache"]
    r = json.loads((run_dir / "results.json").read_text())
    assert [v["status"] for v in r["variants"]] == ["ok", "ok"]
    assert sorted(p.name for p in cwd.iterdir()) == []


def test_a_classification_data_file_is_scored_only_on_rows_the_steps_never_see(tmp_path):
    """A data file gets a stable, stratified held-out quarter: training, calibration and statistics
    draw on the rest, so a distilled model cannot be scored on rows it learnt."""
    import numpy as np

    from workbench.recipe import parse_recipe
    from workbench.sources.models import load_model
    from workbench.tasks import build_task

    rng = np.random.default_rng(0)
    x = rng.standard_normal((203, 1, 8, 8)).astype(np.float32)
    x[:, 0, 0, 0] = np.arange(203)  # a row id, to tell the rows apart
    y = np.repeat(np.arange(10), 21)[:203]
    np.savez(tmp_path / "rows.npz", x=x, y=y)
    spec = {"name": "file", "model": {"source": "builtin", "name": "digits-cnn"},
            "task": {"type": "classification", "data": {"source": "file", "path": "rows.npz"}},
            "variants": {"baseline": {}}}
    recipe = parse_recipe(spec, "file.yaml")
    recipe._path = str(tmp_path / "file.yaml")
    task = build_task(recipe, load_model(recipe))
    held = {int(r) for b in task.eval_batches for r in b["pixels"][:, 0, 0, 0]}
    train = {int(r) for b in task.train_batches for r in b["pixels"][:, 0, 0, 0]}
    assert held and train and not held & train and len(held) + len(train) == 203
    assert abs(len(held) - 0.25 * 203) <= 10  # a quarter, class by class
    assert set(task.labels.tolist()) == set(range(10))  # every class is represented in the held-out rows
    assert "held out" in task.description
    # The same split on every run.
    again = build_task(recipe, load_model(recipe))
    assert {int(r) for b in again.eval_batches for r in b["pixels"][:, 0, 0, 0]} == held


def test_a_text_file_split_keeps_identical_texts_on_one_side_and_every_class_scored():
    """Duplicated sentences are common in real data: a copy in training and one in evaluation would be
    a leak. The split is over distinct texts, stratified by label, the same on every run."""
    texts = [f"review {i % 40}" for i in range(120)]  # every text three times
    labels = [int(t.split()[1]) % 3 for t in texts]
    train, held = grouped_split(texts, labels, 0.25, seed=0)
    assert set(train) | set(held) == set(range(120)) and not set(train) & set(held)
    assert not {texts[i] for i in train} & {texts[i] for i in held}
    assert {labels[i] for i in held} == {0, 1, 2}
    assert abs(len({texts[i] for i in held}) - 10) <= 2  # a quarter of the 40 distinct texts
    assert grouped_split(texts, labels, 0.25, seed=0) == (train, held)
