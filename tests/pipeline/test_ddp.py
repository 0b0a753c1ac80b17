"""A CONTA round under 2 gloo processes (`trainer=ddp_cpu`), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import FAST
from tests.pipeline.conftest import ROUND0

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["experiment=synth_conta", "round=0", *FAST, "callbacks.rich_progress_bar=null"]
PER_IMAGE = {
    "make_cams": ("cams", "*.npz", 24),
    "make_ir_labels": ("ir_labels", "*.png", 24),
    "make_pseudo_masks": ("masks", "*.png", 24),
    "predict_segmenter": ("masks", "*.png", 8),
    "crf_segmenter": ("masks", "*.png", 8),
}
INFERENCE = [
    "make_cams",
    "eval_cams",
    "make_pseudo_masks",
    "eval_pseudo",
    "predict_segmenter",
    "eval_segmenter",
    "crf_segmenter",
    "confounders",
]


def run(root: Path, *extra: str) -> dict:
    env = {**os.environ, "PROJECT_ROOT": str(root)}
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, *extra]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((root / "outputs/synth_conta/seed_0/results.json").read_text())["rounds"]["0"]


def round_dir(root: Path) -> Path:
    return root / "outputs/synth_conta/seed_0/round_0"


@pytest.mark.slow
def test_one_round_under_ddp_cpu(tmp_path):
    """Training included: every artifact written once, by the right number of files."""
    row = run(tmp_path, "trainer=ddp_cpu")
    rdir = round_dir(tmp_path)
    for stage in ROUND0:
        assert (rdir / stage / "DONE.json").is_file(), stage
    for stage, (folder, pattern, count) in PER_IMAGE.items():
        assert len(list((rdir / stage / folder).glob(pattern))) == count, stage
    assert not list(rdir.rglob("*.tmp"))
    conf = np.load(rdir / "confounders/confounders.npz")
    assert len(conf["ids"]) == len(set(conf["ids"].tolist())) == 32
    for key in ("cam_miou", "pseudo_miou", "seg_miou", "seg_crf_miou"):
        assert 0 <= row[key] <= 1


@pytest.mark.slow
def test_sharded_inference_matches_a_single_process_run(tmp_path):
    """The same trained weights: every inference stage redone on 2 ranks (sharded predictions,
    gathered confounders) gives the single-process metrics and confounders."""
    single = run(tmp_path)
    conf = round_dir(tmp_path) / "confounders/confounders.npz"
    with np.load(conf) as z:
        a = {k: z[k] for k in z.files}
    # Same root: the data path is part of the config hashes, so the trained stages are kept.
    ddp = run(tmp_path, "trainer=ddp_cpu", f"force=[{','.join(INFERENCE)}]")
    for key in ("cam_miou", "pseudo_miou", "pseudo_ir_label_miou", "seg_miou", "seg_crf_miou"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
    with np.load(conf) as b:
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_allclose(a["centers"], b["centers"], atol=1e-6)
        np.testing.assert_array_equal(a["codes"], b["codes"])
