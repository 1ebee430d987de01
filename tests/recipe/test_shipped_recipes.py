"""Every recipe shipped in kdcompress/recipes/ is valid, builds its models and says how to run it."""

from __future__ import annotations

from pathlib import Path

import pytest

import kdcompress
from kdcompress.models import build_model, model_spec
from kdcompress.recipe import builtin_recipe_path, load_recipe
from kdcompress.run import check_recipe

RECIPE_DIR = Path(kdcompress.__file__).parent / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.yaml"))


def test_recipes_are_shipped():
    assert "quickstart.yaml" in {p.name for p in RECIPES}
    assert builtin_recipe_path("quickstart").resolve() == (RECIPE_DIR / "quickstart.yaml").resolve()


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_loads_and_passes_checks(path):
    recipe = load_recipe(path)
    plan = check_recipe(recipe)  # builds teacher and student, one dry forward pass each
    assert isinstance(plan, list) and plan
    assert any(line.startswith("teacher:") for line in plan)
    assert any(line.startswith("student:") for line in plan)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_first_line_says_how_to_run_it(path):
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#")
    assert "kdc run" in first
    assert path.name in first


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_on_the_cli(kdc, tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    result = kdc("validate", path)
    kdc.assert_clean_exit(result, 0)
    assert "is a valid recipe" in kdc.flat(result)
    assert not (tmp_path / "runs").exists()


def test_the_consistent_recipe_distils_a_sub_100k_cnn_from_stored_views_of_a_teacher_trained_on_them():
    """What recipes/fashion-mnist-consistent.yaml promises in its header (issue 22): the student is a CNN under
    100,000 parameters, the teacher is trained in the run with the augmentation the student is distilled
    with, and the teacher's targets come from stored views, so it never runs while the student trains."""
    recipe = load_recipe(RECIPE_DIR / "fashion-mnist-consistent.yaml")
    student = build_model(model_spec(recipe.student.model, recipe.student.args, 10, (1, 28, 28)))
    assert recipe.student.model == "cnn"
    assert sum(p.numel() for p in student.parameters()) < 100_000
    assert recipe.student.baseline  # the student alone, same augmentation and schedule: what the gain is against
    assert not recipe.teacher.checkpoint  # trained in the run ...
    assert recipe.data.hflip and recipe.data.crop_padding > 0  # ... on the augmented views it later scores
    assert recipe.distill.teacher_cache.views >= 2
