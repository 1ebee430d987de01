"""The name tables in kdcompress.names agree with the components that build what the names stand for."""

from __future__ import annotations

import subprocess
import sys

from kdcompress import names
from kdcompress.data import DATASETS
from kdcompress.distill import LOSSES
from kdcompress.models import BUILTIN_MODELS


def test_the_built_in_names_are_the_ones_the_components_build_in_the_same_order():
    assert names.MODEL_NAMES == tuple(BUILTIN_MODELS)
    assert names.DATASET_NAMES == tuple(DATASETS)
    assert names.LOSS_NAMES == tuple(LOSSES)


def test_checking_a_recipe_s_names_imports_no_torch():
    code = (
        "import sys; from kdcompress import names, recipe; "
        "names.model_name_problem('mlp'); names.dataset_name_problem('mnist'); names.loss_name_problem('kd'); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_saved_import_dirs_puts_the_folders_back(tmp_path):
    before = names.import_dirs()
    with names.saved_import_dirs(clear=True):
        assert names.import_dirs() == []
        names.add_import_dir(tmp_path)
        assert names.import_dirs() == [str(tmp_path.resolve())]
    assert names.import_dirs() == before


def test_a_torchvision_model_name_without_its_prefix_points_to_torchvision():
    assert "did you mean 'torchvision:resnet50'?" in names.model_name_problem("resnet50")
    assert "did you mean 'mlp'?" in names.model_name_problem("mpl")  # a built-in's misspelling stays as it was
