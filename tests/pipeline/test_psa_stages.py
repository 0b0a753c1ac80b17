"""The three PSA stages run directly on the tiny synthetic set with fabricated CAMs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from scipy.ndimage import uniform_filter

from src.datamodules import build_dataset
from src.datamodules.palette import read_label_png
from src.methods.seam import (
    PSA_WEIGHTS,
    STAGES,
    make_psa_labels,
    make_psa_pseudo_masks,
    train_psa_affinity,
)
from src.pipeline.stage import StageContext
from src.pipeline.stages.cam import CAM_DIR, WEIGHTS_FILE
from src.pipeline.stages.pseudo_masks import AFFINITY_LABEL_DIR, MASK_DIR, eval_pseudo
from src.utils.weights import save_weights
from tests.conftest import TINY, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

FAST_PSA = [
    "method=seam",
    "affinity.max_epochs=1",
    "affinity.batch_size=8",
    "affinity.inference_batch_size=8",
    "affinity.psa_label.workers=1",
    "affinity.module.logt=2",
]


@pytest.fixture(scope="module")
def psa_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("psa")
    # Eight 64 px training images: one training step, one walk batch.
    small = [TINY, "data.generator.num_train=8", "data.generator.num_val=2"]
    cfg = compose_cfg(["experiment=synth", "conta=off", *small, *FAST_PSA], tmp)
    with open_dict(cfg):
        cfg.figure_images = 1
    return cfg


@pytest.fixture(scope="module")
def inputs(psa_cfg, tmp_path_factory):
    """CAMs made from the ground truth (blurred masks of each present class, max-normalised) and
    a classifier file holding a fresh tiny backbone (backbone_init=cam)."""
    root = tmp_path_factory.mktemp("inputs")
    cam_dir = root / "make_cams" / CAM_DIR
    cam_dir.mkdir(parents=True)
    dataset = build_dataset(psa_cfg.data, psa_cfg.data.train_split)
    for i, image_id in enumerate(dataset.ids):
        mask = dataset.load_mask(i)
        keys = np.array([k for k in np.unique(mask) if 0 < k < 255], np.int16)
        high = np.stack([uniform_filter((mask == k).astype(np.float32), 9) for k in keys])
        high /= high.reshape(len(keys), -1).max(axis=1)[:, None, None]
        np.savez(
            cam_dir / f"{image_id}.npz",
            keys=keys,
            cam=high[:, ::4, ::4].astype(np.float16),
            high_res=high.astype(np.float16),
        )
    classifier = root / "train_cam"
    classifier.mkdir()
    backbone = instantiate(psa_cfg.backbone)  # the classifier's own layout (norm train)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    save_weights(classifier / WEIGHTS_FILE, state)
    return {"cams": cam_dir.parent, "classifier": classifier}


def _ctx(cfg, name: str, stage_dir: Path, inputs: dict[str, Path]) -> StageContext:
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(cfg=cfg, round=0, name=name, dir=stage_dir, inputs=inputs, seed=0)


def test_three_stages_run_resume_and_feed_eval_pseudo(psa_cfg, inputs, tmp_path):
    dataset = build_dataset(psa_cfg.data, psa_cfg.data.train_split)
    n = len(dataset)

    labels_ctx = _ctx(psa_cfg, "make_psa_labels", tmp_path / "labels", {"cams": inputs["cams"]})
    result = make_psa_labels(labels_ctx)
    assert result.artifacts == [AFFINITY_LABEL_DIR] and result.metrics["resume"]["computed"] == n
    assert result.metrics["foreground"] > 0 and result.metrics["background"] > 0
    for i, image_id in enumerate(dataset.ids):
        label = read_label_png(labels_ctx.dir / AFFINITY_LABEL_DIR / f"{image_id}.png")
        keys = set(np.unique(dataset.load_mask(i))) - {0, 255}
        assert label.shape == dataset.load_mask(i).shape
        assert set(np.unique(label)) <= {0, 255} | keys
    # Resume: only the missing label is redone.
    (labels_ctx.dir / AFFINITY_LABEL_DIR / f"{dataset.ids[3]}.png").unlink()
    again = make_psa_labels(labels_ctx)
    assert again.metrics["resume"] == {"computed": 1, "reused": n - 1}

    train_inputs = {"classifier": inputs["classifier"], "affinity_labels": labels_ctx.dir}
    train_ctx = _ctx(psa_cfg, "train_psa_affinity", tmp_path / "train", train_inputs)
    trained = train_psa_affinity(train_ctx)
    assert (train_ctx.dir / PSA_WEIGHTS).is_file()
    assert np.isfinite(trained.metrics["train/loss"])
    assert {"train/bg_pos", "train/fg_pos", "train/neg"} <= set(trained.metrics)
    assert trained.metrics["resume"]["steps"] == n // psa_cfg.affinity.batch_size

    walk_inputs = {**inputs, "affinity": train_ctx.dir}
    walk_ctx = _ctx(psa_cfg, "make_psa_pseudo_masks", tmp_path / "walk", walk_inputs)
    masks = make_psa_pseudo_masks(walk_ctx)
    assert masks.artifacts == [MASK_DIR] and masks.metrics["resume"]["computed"] == n
    for i, image_id in enumerate(dataset.ids):
        mask = read_label_png(walk_ctx.dir / MASK_DIR / f"{image_id}.png")
        keys = set(np.unique(dataset.load_mask(i))) - {0, 255}
        assert mask.shape == dataset.load_mask(i).shape
        assert set(np.unique(mask)) <= {0} | keys  # the walk leaves no pixel unsure
    (walk_ctx.dir / MASK_DIR / f"{dataset.ids[0]}.png").unlink()
    again = make_psa_pseudo_masks(walk_ctx)
    assert again.metrics["resume"] == {"computed": 1, "reused": n - 1}

    # The roles' layouts are IRNet's: the shared evaluation reads them unchanged.
    eval_inputs = {"affinity_labels": labels_ctx.dir, "pseudo_masks": walk_ctx.dir}
    scored = eval_pseudo(_ctx(psa_cfg, "eval_pseudo", tmp_path / "eval", eval_inputs))
    assert 0 <= scored.results["miou"] <= 1 and 0 <= scored.results["ir_label_miou"] <= 1


def test_walk_without_trained_weights_says_what_to_rerun(psa_cfg, inputs, tmp_path):
    from src.utils.errors import MissingArtifactError

    ctx = _ctx(psa_cfg, "walk", tmp_path / "walk", {**inputs, "affinity": tmp_path})
    with pytest.raises(MissingArtifactError, match="train_psa_affinity"):
        make_psa_pseudo_masks(ctx)


def test_stage_declarations_cover_every_psa_setting(psa_cfg):
    """Each config key a stage declares exists, and every leaf of affinity=seam_cpu (method=seam) is hashed
    by some PSA stage, or is one of the settings that cannot change a result."""
    assert [s.name for s in STAGES] == [
        "make_psa_labels",
        "train_psa_affinity",
        "make_psa_pseudo_masks",
    ]
    assert [s.produces for s in STAGES] == ["affinity_labels", "affinity", "pseudo_masks"]
    declared = {k for s in STAGES for k in s.config_keys}
    for key in declared:
        if ":" not in key:
            assert OmegaConf.select(psa_cfg, key, default="MISSING") != "MISSING", key
    unhashed = {"affinity.psa_label.workers", "affinity.inference_batch_size"}
    leaves = OmegaConf.to_container(psa_cfg.affinity, resolve=True)

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from walk(v, f"{prefix}.{k}")
        else:
            yield prefix

    for leaf in walk(leaves, "affinity"):
        covered = any(leaf == k or leaf.startswith(f"{k}.") for k in declared)
        assert covered != (leaf in unhashed), leaf
