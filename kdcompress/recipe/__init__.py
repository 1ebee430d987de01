"""Recipes: a typed, validated description of one kdc run, loaded from YAML.

A recipe is plain YAML with the sections ``run``, ``data``, ``teacher``,
``student``, ``distill``, ``prune`` and ``report``. Every key is optional and
has a default; unknown keys, wrong types and out-of-range values are reported
all at once, each with its key path and YAML line::

    >>> from kdcompress.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml", overrides=["distill.temperature=2"])
    >>> recipe.distill.temperature
    2.0

A recipe is code the user chose to run: ``model: package.module:factory``
imports and calls that factory. kdc never takes import paths from anywhere
else (not from checkpoints, not from the network).
"""

from .parse import (
    MAX_YAML_SIZE,
    builtin_recipe_path,
    key_sections,
    load_recipe,
    parse_recipe,
    read_yaml,
    recipe_from_dict,
    recipe_to_dict,
    section_fingerprint,
)
from .schema import (
    BUDGET_KINDS,
    CODE_KEYS,
    IMAGEFOLDER_KEYS,
    BudgetSection,
    DataSection,
    DistillSection,
    ExportSection,
    FeatureTerm,
    PruneSection,
    Recipe,
    ReportSection,
    RunSection,
    StudentSection,
    TeacherCacheSection,
    TeacherSection,
    TrainSettings,
    pruning_steps_needed,
)

__all__ = [
    "Recipe",
    "RunSection",
    "DataSection",
    "TrainSettings",
    "TeacherSection",
    "StudentSection",
    "DistillSection",
    "FeatureTerm",
    "PruneSection",
    "BudgetSection",
    "TeacherCacheSection",
    "BUDGET_KINDS",
    "ReportSection",
    "ExportSection",
    "load_recipe",
    "key_sections",
    "CODE_KEYS",
    "IMAGEFOLDER_KEYS",
    "parse_recipe",
    "read_yaml",
    "MAX_YAML_SIZE",
    "recipe_from_dict",
    "recipe_to_dict",
    "section_fingerprint",
    "builtin_recipe_path",
    "pruning_steps_needed",
]
