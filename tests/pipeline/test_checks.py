"""Errors before work: what a stage would meet hours in is found before the first stage, and a
user error is one line with exit status 2 (issue: the paper recipes run end to end)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from src.datamodules import DatasetError
from src.models.backbone import WeightsUnavailableError
from src.pipeline.checks import check_accelerator, check_data_files, check_weights
from src.pipeline.plan import PipelineError
from src.pipeline.schema import ConfigTypeError, check_config_types, config_type_problems
from src.train import train
from tests.conftest import CONF_DIR, compose_cfg

PAPER = ["experiment=voc_conta", "trainer=cpu", "pretrained=false"]


def test_every_experiment_fits_the_schema():
    for path in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml")):
        assert config_type_problems(compose_cfg([f"experiment={path.stem}"])) == [], path.stem


def test_a_null_or_a_string_where_the_schema_wants_a_pair_or_a_count_is_named():
    cfg = compose_cfg(
        [*PAPER, "cam.resize_long=null", "cam.scale_range=[1.5,0.5]", "segmenter.crop_size=big"]
    )
    with pytest.raises(ConfigTypeError) as err:
        check_config_types(cfg)
    message = str(err.value)
    assert "cam.scale_range=[1.5, 0.5]: expected a pair" in message
    assert "segmenter.crop_size='big': expected int" in message
    assert "resize_long" not in message  # null is allowed there (scale_range or nothing)


def test_the_paper_classifier_takes_a_null_scale_range():
    """d04b298: `tuple(None)` in the datamodule stopped voc_conta's first stage."""
    from src.datamodules import WSSSDataModule

    cfg = compose_cfg(PAPER)
    assert cfg.cam.scale_range is None and cfg.cam.resize_long is not None
    module = WSSSDataModule(
        cfg.data, train_split="train", scale_range=cfg.cam.scale_range, resize_long=[32, 48]
    )
    assert module.scale_range is None


def test_a_gpu_trainer_on_a_machine_without_one_is_refused_naming_trainer_cpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    cfg = compose_cfg(["experiment=voc_conta", "pretrained=false"])
    with pytest.raises(PipelineError, match="trainer=cpu"):
        check_accelerator(cfg)


def test_a_missing_data_root_or_split_list_is_named_before_any_stage(tmp_path):
    cfg = compose_cfg([*PAPER, f"data.root={tmp_path}/nowhere"])
    with pytest.raises(DatasetError, match="data.root"):
        check_data_files(cfg)
    (tmp_path / "VOC").mkdir()
    cfg = compose_cfg([*PAPER, f"data.root={tmp_path}/VOC"])
    with pytest.raises(DatasetError, match="train_aug list .*train_aug.txt not found"):
        check_data_files(cfg)


def test_weights_that_are_neither_cached_nor_downloadable_fail_at_start(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(self, *args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    cfg = compose_cfg(["experiment=voc_conta", "trainer=cpu"])
    with pytest.raises(WeightsUnavailableError, match="not cached"):
        check_weights(cfg)


def test_pretrained_false_is_the_one_switch_to_random_init():
    for experiment, method in (("voc", "irnet"), ("voc", "seam"), ("voc", "sec"), ("coco", "dsrg")):
        cfg = compose_cfg([f"experiment={experiment}", f"method={method}", "pretrained=false"])
        for key in ("backbone", "segmenter.backbone", "seeded.backbone", "affinity.backbone"):
            node = OmegaConf.select(cfg, key)
            if node is None:
                continue
            assert node.get("weights") is None, (experiment, method, key)
            # BatchNorm that keeps ImageNet statistics has none to keep: it trains instead.
            assert node.get("norm", "train") == "train", (experiment, method, key)
    cfg = compose_cfg(["experiment=voc_conta"])
    assert cfg.backbone.weights == "IMAGENET1K_V1" and cfg.segmenter.backbone.norm == "frozen"


def test_nothing_is_written_when_a_start_up_check_fails(tmp_path):
    cfg = compose_cfg([*PAPER, f"data.root={tmp_path}/nowhere"], tmp_path)
    with pytest.raises(DatasetError):
        train(cfg)
    assert not Path(cfg.paths.run_dir).exists()


def test_a_user_error_is_one_line_and_exit_status_2(tmp_path):
    run = subprocess.run(
        [
            sys.executable,
            "train.py",
            *PAPER,
            f"data.root={tmp_path}/nowhere",
            f"paths.output_dir={tmp_path}/out",
        ],
        cwd=Path(CONF_DIR).parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    assert "DatasetError: data set root" in run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
