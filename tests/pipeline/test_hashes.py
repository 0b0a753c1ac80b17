"""A changed setting redoes exactly what depends on it.

The table below says, independently of the stage declarations, which stages each leaf of the
config can change. For every leaf of three full configs the test changes that leaf alone and
checks that the digests of exactly those stages change, in every round, with everything
downstream of them (the same round's readers, the next round's CONTA stages) and nothing else.
A key the table does not know fails the test: a new setting must be classified.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf, open_dict
from PIL import Image

from src.datamodules import prepare_data
from src.pipeline.driver import check_stages
from src.pipeline.fingerprint import data_fingerprints
from src.pipeline.hashing import plan_digests
from src.pipeline.registry import STAGES
from tests.conftest import TINY, compose_cfg

ALL = set(STAGES)
# Sets name the stages of every method; a plan holds one method's (expected() keeps those).
AFFINITY_TRAINING = {"train_affinity", "train_psa_affinity"}
WALK = {"make_pseudo_masks", "make_psa_pseudo_masks"}
SEEDED = {"make_cues", "train_seeded", "make_seeded_masks"}  # SEC / DSRG
SEEDED_NET = {"train_seeded", "make_seeded_masks"}
TORCH = {
    *SEEDED,
    "train_cam",
    "make_cams",
    *AFFINITY_TRAINING,
    *WALK,
    "train_segmenter",
    "predict_segmenter",
    "confounders",
}
READS_TRAIN = {
    *SEEDED,
    "train_cam",
    "make_cams",
    "make_ir_labels",
    "make_psa_labels",
    "make_cam_masks",
    *AFFINITY_TRAINING,
    *WALK,
    "train_segmenter",
    "confounders",
}
SCORING = {"eval_cams", "eval_pseudo", "eval_segmenter", "crf_segmenter"}
CAM_NET = {"train_cam", "make_cams", *AFFINITY_TRAINING, *WALK, *SEEDED}
SEGMENTER_NET = {"train_segmenter", "predict_segmenter", "confounders"}
NOTHING: set[str] = set()
# CONTA classifier settings: from round 1 on only (round 0 is the shared plain baseline).
LATER = "rounds>=1"

# (pattern, stages it changes directly[, LATER]); first match wins.
TABLE: list[tuple] = [
    # Where and how the run executes, or what it is called: never its results.
    ("paths.*", NOTHING),
    ("experiment_name", NOTHING),
    ("upper_bound", NOTHING),
    ("reuse_from*", NOTHING),
    ("logger.*", NOTHING),
    ("callbacks.*", NOTHING),
    ("trainer._target_", NOTHING),
    ("trainer.log_every_n_steps", NOTHING),
    ("*.inference.batch_size", NOTHING),
    ("affinity.inference_batch_size", NOTHING),
    # Process pools of numpy stages: the same result for any count.
    ("affinity.ir_label.workers", NOTHING),
    ("affinity.psa_label.workers", NOTHING),
    ("segmenter.crf_workers", NOTHING),
    # Content, not paths: data folders are fingerprinted (test_moved_data_keeps_its_hashes).
    ("data.root", NOTHING),
    ("data.cache_dir", NOTHING),
    ("data.generator.*", NOTHING),
    ("data.splits.*", NOTHING),
    ("data.max_images", NOTHING),  # enters every split's fingerprint (test_max_images_...)
    ("seed", ALL),
    # The machine, not the recipe (a run moved to other hardware continues).
    ("num_workers", NOTHING),
    ("trainer.accelerator", NOTHING),
    ("trainer.devices", NOTHING),
    ("trainer.num_nodes", NOTHING),
    ("trainer.strategy", NOTHING),
    ("trainer.deterministic", NOTHING),
    ("trainer.num_sanity_val_steps", NOTHING),
    ("trainer.precision", TORCH),
    ("figure_images", SCORING),
    ("data.name", {"confounders", "make_cues"}),  # recorded in the files, checked when read
    ("data.format", ALL),
    ("data.on_empty_label", ALL),
    ("data.num_classes", ALL),
    ("data.class_names", SCORING | {"train_segmenter"}),
    ("data.train_split", READS_TRAIN),
    ("data.eval_split", {"eval_cams", "eval_pseudo"}),
    ("data.val_split", {"predict_segmenter", "eval_segmenter", "crf_segmenter", "confounders"}),
    ("data.mean", TORCH),
    ("data.std", TORCH),
    ("backbone.*", CAM_NET),
    ("cam.inference.*", {"make_cams"}),
    ("cam.net.*", {"train_cam", "make_cams", "make_cues"}),
    ("cam.module._target_", {"train_cam", "make_cams"}),
    ("cam.eval.bg_threshold", {"eval_cams", "make_cam_masks"}),  # method=cam: its pseudo-masks
    ("cam.eval.*", {"eval_cams"}),
    ("cam.*", {"train_cam"}),
    ("affinity.ir_label.*", {"make_ir_labels"}),
    ("affinity.psa_label.*", {"make_psa_labels"}),
    ("affinity.backbone_init", AFFINITY_TRAINING | WALK),
    ("affinity.backbone.*", AFFINITY_TRAINING | WALK),  # PSA's net (merged over `backbone`)
    ("affinity.net.*", AFFINITY_TRAINING | WALK),
    ("affinity.module._target_", AFFINITY_TRAINING | WALK),
    ("affinity.module._partial_", AFFINITY_TRAINING | WALK),
    ("affinity.module.radius", AFFINITY_TRAINING | WALK),
    ("affinity.module.beta", WALK),
    ("affinity.module.exp_times", WALK),
    ("affinity.module.walk_radius", WALK),
    ("affinity.module.bg_threshold", WALK),
    ("affinity.module.logt", WALK),
    ("affinity.module.bg_alpha", WALK),
    ("affinity.*", AFFINITY_TRAINING),
    ("seeded.cues.*", {"make_cues"}),
    ("seeded.input_size", SEEDED),
    ("seeded.backbone", SEEDED_NET),  # the CPU recipe's "${backbone}"
    ("seeded.backbone.*", SEEDED_NET),
    ("seeded.backbone_init", SEEDED_NET),
    ("seeded.net.*", SEEDED_NET),
    ("seeded.module._target_", SEEDED_NET),
    ("seeded.module._partial_", {"train_seeded"}),
    ("seeded.test_crf.*", {"make_seeded_masks"}),
    ("seeded.masks.*", {"make_seeded_masks"}),  # all classes or the image's; test scales
    ("seeded.inference_batch_size", NOTHING),
    ("seeded.train_crf_workers", NOTHING),
    ("seeded.crf_workers", NOTHING),
    ("seeded.*", {"train_seeded"}),
    ("segmenter.backbone.*", SEGMENTER_NET),
    ("segmenter.rates", SEGMENTER_NET),
    ("segmenter.module.scales", SEGMENTER_NET),
    ("segmenter.inference.logits_dtype", {"predict_segmenter"}),
    ("segmenter.inference.logits_min_prob", {"predict_segmenter"}),
    ("segmenter.crf.*", {"crf_segmenter"}),
    ("segmenter.crf_images", {"crf_segmenter"}),
    ("segmenter.*", {"train_segmenter"}),
    ("conta.context", {"confounders"}),  # ... and the classifier, LATER (below)
    ("conta.size", {"confounders"}),
    ("conta.prior", {"confounders"}),
    ("conta.mask_encoding", {"confounders"}),
    ("conta.c_source", {"confounders"}),
    ("conta.m_source", {"confounders"}),
    ("conta.diagnostic_images", {"train_cam"}, LATER),
    ("conta.figure_images", {"make_cams"}, LATER),
    ("conta.*", {"train_cam", "make_cams", "make_cues"}, LATER),
]
ALSO_LATER = {"conta.context": {"train_cam", "make_cams", "make_cues"}}
# The plan's shape, not a setting of a stage: checked by the driver's own tests (method.stages
# and conta.enabled make `stages`, conta.rounds makes `round`, the suffix names the run).
STRUCTURE = {
    "stages",
    "round",
    "force",
    "method.name",
    "method.stages",
    "scale.name",
    "conta.enabled",
    "conta.suffix",
    "conta.rounds",
    # Acts only through the `${pretrained:...}` leaves it resolves (weights, BatchNorm modes),
    # each of which is in TABLE.
    "pretrained",
}

FINGERPRINTS = {"train": "T", "val": "V", "train_aug": "TA"}


def same_weights(path):
    return None if path in (None, "") else "one-file-content"


def leaves(node, prefix=""):
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from leaves(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def changed(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.1
    if isinstance(value, str):
        return value + "_x"
    if isinstance(value, list):
        return [*value, value[-1]] if value else ["x"]
    return "x"  # None


def classify(key: str):
    for row in TABLE:
        if fnmatch.fnmatchcase(key, row[0]):
            return row[1], len(row) > 2
    raise AssertionError(f"{key} is in no row of TABLE: say which stages it can change")


def expected(key: str, rounds: int, plan) -> set[tuple[int, str]]:
    direct, later_only = classify(key)
    direct = set(direct) & set(plan.names)
    hit = {(r, s) for r in range(rounds) for s in direct if r > 0 or not later_only}
    later = set(ALSO_LATER.get(key, ())) & set(plan.names)
    hit |= {(r, s) for r in range(1, rounds) for s in later}
    # Everything that reads a changed stage changes with it.
    grew = True
    while grew:
        grew = False
        for r in range(rounds):
            for stage in plan:
                reads = [(r, name) for name in plan.inputs(stage).values()]
                reads += [(r - 1, name) for name in plan.previous(stage).values()] if r > 0 else []
                if (r, stage.name) not in hit and any(x in hit for x in reads):
                    hit.add((r, stage.name))
                    grew = True
    return hit


def digests(cfg, stages):
    return plan_digests(cfg, stages, FINGERPRINTS, same_weights)


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # the default: synth_conta, three rounds
        ["experiment=voc_conta", "round=1"],
        ["experiment=coco_conta", "round=1", "trainer=ddp"],
        ["experiment=synth", "method=seam", "conta=on"],
        ["experiment=voc", "method=seam", "conta=on", "round=1"],
        ["method=sec"],
        ["experiment=voc", "method=dsrg", "round=1"],
        ["method=cam"],
    ],
    ids=[
        "synth_conta",
        "voc_conta",
        "coco_conta_ddp",
        "synth_seam_conta",
        "voc_seam_conta",
        "synth_sec_conta",
        "voc_dsrg_conta",
        "synth_cam_conta",
    ],
)
def test_each_leaf_redoes_exactly_the_stages_it_can_change(overrides):
    cfg = compose_cfg(overrides)
    stages = check_stages(cfg)
    base = digests(cfg, stages)
    rounds = cfg.round + 1
    checked = 0
    for key, value in leaves(OmegaConf.to_container(cfg, resolve=False)):
        if key in STRUCTURE:
            continue
        mutated = cfg.copy()
        with open_dict(mutated):
            OmegaConf.update(mutated, key, changed(value), merge=False)
        got = {k for k, v in digests(mutated, stages).items() if v != base[k]}
        assert got == expected(key, rounds, stages), key
        checked += 1
    assert checked > 120


def test_moved_data_keeps_its_hashes_and_an_edited_val_mask_redoes_only_val(tmp_path):
    cfg = compose_cfg(["experiment=synth_conta", TINY], tmp_path)
    prepare_data(cfg.data)
    before = data_fingerprints(cfg.data, ["train", "val"])

    moved = tmp_path / "elsewhere" / "synth"
    shutil.copytree(cfg.data.root, moved)
    with open_dict(cfg):
        cfg.data.root = str(moved)
        cfg.data.cache_dir = str(tmp_path / "elsewhere" / "cache")
    assert data_fingerprints(cfg.data, ["train", "val"]) == before

    val_id = (moved / cfg.data.splits.val.list).read_text().split()[0]
    mask_path = moved / cfg.data.splits.val.masks / f"{val_id}.png"
    with Image.open(mask_path) as img:
        mask = np.array(img)
        palette = img.getpalette()
    mask[0, 0] = 1 if mask[0, 0] != 1 else 2
    edited = Image.fromarray(mask, mode="P")
    edited.putpalette(palette)
    edited.save(mask_path)
    after = data_fingerprints(cfg.data, ["train", "val"])
    assert after["train"] == before["train"] and after["val"] != before["val"]

    plan_before = plan_digests(cfg, check_stages(cfg), before, same_weights)
    plan_after = plan_digests(cfg, check_stages(cfg), after, same_weights)
    redone = {s for (r, s), d in plan_after.items() if r == 0 and d != plan_before[(r, s)]}
    # val is validated on by nobody but the segmenter's scoring and the confounders (M of val).
    assert redone == {
        "predict_segmenter",
        "eval_segmenter",
        "crf_segmenter",
        "confounders",
    }


def test_digests_are_cached_by_size_and_mtime(tmp_path, monkeypatch):
    cfg = compose_cfg(["experiment=synth_cam", TINY], tmp_path)
    prepare_data(cfg.data)
    first = data_fingerprints(cfg.data, ["train"])
    opened = []
    real_open = Path.open

    def counting_open(self, *args, **kwargs):
        opened.append(self)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", counting_open)
    assert data_fingerprints(cfg.data, ["train"]) == first
    assert not [p for p in opened if p.suffix in (".jpg", ".png")]


def test_max_images_changes_every_fingerprint(tmp_path):
    """A preflight's first N images are other data than the whole split."""
    cfg = compose_cfg(["experiment=synth_cam", TINY], tmp_path)
    prepare_data(cfg.data)
    whole = data_fingerprints(cfg.data, ["train", "val"])
    with open_dict(cfg):
        cfg.data.max_images = 4
    cut = data_fingerprints(cfg.data, ["train", "val"])
    assert all(cut[s] != whole[s] for s in whole)
