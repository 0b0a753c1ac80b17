"""A run folder refuses a recipe other than the one that created it (src/pipeline/run_recipe.py)."""

from __future__ import annotations

import pytest

from src.pipeline.run_recipe import (
    RECIPE_FILE,
    RecipeMismatchError,
    check_run_recipe,
    record_run_recipe,
    run_recipe,
)
from src.train import train
from src.utils.errors import UserError
from tests.conftest import TINY, compose_cfg


def test_a_folder_made_by_another_backbone_names_both_and_the_fix(tmp_path):
    # What `experiment=voc_conta method=seam` ran before the backbone moved into the recipe.
    os16 = compose_cfg(["experiment=voc_conta", "method=seam", "backbone=resnet50"])
    record_run_recipe(os16, tmp_path)
    recipe = compose_cfg(["experiment=voc", "method=seam", "conta=on"])
    assert recipe.experiment_name == os16.experiment_name  # one folder name: voc_seam_conta
    with pytest.raises(RecipeMismatchError) as err:
        check_run_recipe(recipe, tmp_path)
    assert isinstance(err.value, UserError)
    message = str(err.value)
    assert "backbone.strides: [2, 2, 2, 1] there, [2, 2, 1, 1] now" in message
    assert "experiment_name=voc_seam_conta_" in message and RECIPE_FILE in message


def test_the_same_recipe_and_a_new_folder_pass(tmp_path):
    cfg = compose_cfg(["experiment=voc_conta"])
    check_run_recipe(cfg, tmp_path)  # nothing recorded yet
    record_run_recipe(cfg, tmp_path)
    check_run_recipe(compose_cfg(["experiment=voc", "conta=on", "num_workers=0"]), tmp_path)
    assert (
        run_recipe(cfg)["method"] == "irnet" and "weights_path" not in run_recipe(cfg)["backbone"]
    )


def test_train_refuses_before_any_stage_runs(tmp_path):
    first = compose_cfg(["conta=off", TINY], tmp_path)
    run_dir = tmp_path / "outputs" / first.experiment_name / "seed_0"
    run_dir.mkdir(parents=True)
    record_run_recipe(compose_cfg(["conta=off", "backbone=resnet50"]), run_dir)
    with pytest.raises(RecipeMismatchError, match=r"backbone\.arch: 'resnet50' there"):
        train(first)
    assert sorted(p.name for p in run_dir.iterdir()) == [RECIPE_FILE]
