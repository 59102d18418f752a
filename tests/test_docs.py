"""The documentation a newcomer reads: a short README, and a recipe reference generated from the code
that stays in step with it. Fast: nothing here loads a model."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from workbench import recipe_docs
from workbench.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REGENERATE = "run `python -m workbench.recipe_docs` and commit the result"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _recipes() -> list[Path]:
    return sorted((ROOT / "recipes").glob("*.yaml"))


def test_committed_reference_is_what_the_code_generates():
    assert (DOCS / "recipe-reference.md").read_text(encoding="utf-8") == recipe_docs.render(), \
        f"docs/recipe-reference.md is stale: {REGENERATE}"


def test_committed_schema_is_what_the_code_generates():
    assert (DOCS / "recipe.schema.json").read_text(encoding="utf-8") == recipe_docs.schema_text(), \
        f"docs/recipe.schema.json is stale: {REGENERATE}"


def test_check_mode_names_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe_docs, "DOCS", tmp_path)
    monkeypatch.setattr(recipe_docs, "REFERENCE", tmp_path / "recipe-reference.md")
    monkeypatch.setattr(recipe_docs, "SCHEMA", tmp_path / "recipe.schema.json")
    assert recipe_docs.main([]) == 0
    assert recipe_docs.main(["--check"]) == 0
    (tmp_path / "recipe.schema.json").write_text("{}\n")
    assert recipe_docs.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "recipe.schema.json" in err and "recipe-reference.md" not in err


def test_generation_is_deterministic():
    assert recipe_docs.render() == recipe_docs.render()
    assert recipe_docs.schema_text() == recipe_docs.schema_text()


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 150
    assert "make test" in text and "make demo" in text


def test_readme_lists_every_command_of_the_cli():
    text = README.read_text(encoding="utf-8")
    for command in ("run", "run --resume", "validate", "bench", "report", "compare", "sensitivity", "list"):
        assert f"`workbench {command}" in text, command


def test_reference_has_every_recipe_section_and_registered_name():
    text = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    for name, field in Recipe.model_fields.items():
        assert f"`{field.alias or name}`" in text, name
    from core.backends import BACKENDS
    from core.formats import FORMATS
    from core.steps import STEPS

    steps = recipe_docs.builtin(STEPS)
    assert {"prune", "quantize", "distill", "onnx-quantize", "onnx-optimize"} <= set(steps)
    for registry in (steps, recipe_docs.builtin(BACKENDS), recipe_docs.builtin(FORMATS)):
        for name in registry:
            assert f"`{name}`" in text, name


def test_every_step_parameter_is_in_the_reference():
    from core.steps import STEPS

    text = (DOCS / "recipe-reference.md").read_text(encoding="utf-8")
    for name, step in recipe_docs.builtin(STEPS).items():
        section = text.split(f"### `{name}`", 1)[1].split("\n### ", 1)[0]
        for param in step.Params.model_fields:
            assert f"| `{param}` |" in section, f"{name}.{param}"


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(page):
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_schema_is_json_with_the_yaml_key_from():
    schema = recipe_docs.schema()
    json.dumps(schema)
    assert "from" in schema["$defs"]["VariantSpec"]["properties"]
    assert "from" in schema["$defs"]["SearchSpec"]["properties"]


def test_every_top_level_key_of_the_shipped_recipes_is_in_the_schema():
    properties = recipe_docs.schema()["properties"]
    assert _recipes()
    for path in _recipes():
        for key in yaml.safe_load(path.read_text()):
            assert key in properties, f"{path.name}: {key}"


@pytest.mark.parametrize("path", _recipes(), ids=lambda p: p.name)
def test_schema_validates_the_shipped_recipes(path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = recipe_docs.schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors


def test_schema_rejects_a_misspelled_step_parameter_and_an_unknown_backend():
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(recipe_docs.schema())
    base = {"name": "x", "model": {"source": "builtin", "name": "digits-cnn"}}
    assert not validator.is_valid({**base, "variants": {"a": {"steps": [{"prune": {"ratioo": 0.3}}]}}})
    assert not validator.is_valid({**base, "variants": {"a": {}}, "bench": {"backends": ["no-such-backend"]}})
    assert validator.is_valid({**base, "variants": {"a": {"steps": ["prune", {"prune": {"ratio": 0.3}}]}},
                               "export": ["onnx"], "report": {"constraints": {"max_perplexity_increase": "5%"}}})
