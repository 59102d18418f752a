"""Every shipped recipe is valid (the quickstart and the others run in full in the benchmark)."""
from pathlib import Path

import pytest

from workbench.cli import main

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipe_validates(recipe, capsys):
    assert main(["validate", str(recipe)]) == 0
    assert "valid" in capsys.readouterr().out


def test_the_quickstart_is_shipped():
    assert any(r.name == "quickstart.yaml" for r in RECIPES)
