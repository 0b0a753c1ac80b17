"""Recipes and set-ups (conf/recipe/, conf/experiment/): a method's recipe per scale picks its
classifier, expansion and backbone; an experiment is a set-up with method= and conta= as axes.
Every paper combination composes into a plan, and two commands that run one recipe share one
run folder (the same config), two that run different recipes never do."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from src.pipeline.driver import check_stages
from tests.conftest import CONF_DIR, compose_cfg

CONF = Path(CONF_DIR)
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
SCALES = sorted(p.stem for p in (CONF / "scale").glob("*.yaml"))
# The groups only a recipe chooses.
RECIPE_GROUPS = {"backbone", "cam", "affinity", "seeded"}


def _defaults(path: Path) -> list:
    return (yaml.safe_load(path.read_text()) or {}).get("defaults", [])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", SCALES)
def test_every_method_has_one_recipe_per_scale_choosing_its_networks(method, scale):
    path = CONF / "recipe" / f"{method}_{scale}.yaml"
    assert path.is_file(), f"method={method} has no recipe at scale={scale}: add {path}"
    groups = {next(iter(entry)).strip("/") for entry in _defaults(path)}
    assert {"backbone", "cam"} <= groups <= RECIPE_GROUPS, (path, groups)


def test_experiments_set_up_data_and_machine_only():
    """No experiment picks a network or sets a stage's value: that is the recipe's."""
    for path in sorted((CONF / "experiment").glob("*.yaml")):
        text = yaml.safe_load(path.read_text()) or {}
        picked = {
            next(iter(e)).replace("override ", "").strip("/")
            for e in _defaults(path)
            if isinstance(e, dict)
        }
        assert not picked & RECIPE_GROUPS, (path.name, picked & RECIPE_GROUPS)
        assert not set(text) & (RECIPE_GROUPS | {"segmenter"}) or text.get("segmenter") == {
            "labels": "gt"  # the supervised bounds' one setting: what the segmenter learns from
        }, path.name


def test_no_network_config_only_renames_another():
    for group in sorted(RECIPE_GROUPS):
        for path in sorted((CONF / group).glob("*.yaml")):
            body = yaml.safe_load(path.read_text()) or {}
            assert set(body) - {"defaults"}, f"{path} only aliases {body.get('defaults')}"


@pytest.mark.parametrize("data", ["voc", "coco"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("conta", ["off", "on"])
def test_each_paper_combination_composes_into_a_plan(data, method, conta):
    cfg = compose_cfg([f"experiment={data}", f"method={method}", f"conta={conta}"])
    plan = check_stages(cfg)
    assert cfg.experiment_name == f"{data}_{method}" + ("_conta" if conta == "on" else "")
    assert cfg.scale.name == "paper" and cfg.backbone.weights == "IMAGENET1K_V1"
    # SEAM's stand-in for ResNet-38 is at output stride 8; every other classifier is IRNet's.
    strides = [2, 2, 1, 1] if method == "seam" else [2, 2, 2, 1]
    assert (cfg.backbone.arch, list(cfg.backbone.strides)) == ("resnet50", strides)
    assert ("confounders" in plan.names) == (conta == "on")


@pytest.mark.parametrize("data", ["synth", "voc", "coco"])
def test_the_bounds_and_the_classifier_runs_compose(data):
    bound = compose_cfg([f"experiment={data}_supervised"])
    assert bound.experiment_name == f"{data}_supervised" and bound.segmenter.labels == "gt"
    check_stages(bound)
    cam = compose_cfg([f"experiment={data}_cam", "method=seam"])
    assert cam.experiment_name == f"{data}_seam_cam" and check_stages(cam).names == [
        "train_cam",
        "make_cams",
        "eval_cams",
    ]


def test_the_paper_run_keeps_its_name():
    cfg = compose_cfg(["experiment=voc_conta"])
    assert (cfg.data.name, cfg.method.name, cfg.conta.enabled) == ("voc", "irnet", True)
    assert cfg.experiment_name == "voc_irnet_conta" and cfg.upper_bound == "voc_supervised"


def test_two_commands_for_one_recipe_are_one_config_and_share_its_folder():
    """`experiment=voc_conta method=seam` once ran SEAM at output stride 16 in the folder of
    SEAM's output-stride-8 recipe; the backbone is now the recipe's, so both are one run."""
    a = compose_cfg(["experiment=voc_conta", "method=seam"])
    b = compose_cfg(["experiment=voc", "method=seam", "conta=on"])
    assert OmegaConf.to_container(a, resolve=True) == OmegaConf.to_container(b, resolve=True)
    assert a.experiment_name == "voc_seam_conta" and list(a.backbone.strides) == [2, 2, 1, 1]
