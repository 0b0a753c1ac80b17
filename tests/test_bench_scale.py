"""bench/scale.py's GPU half: every GPU stage runs through its module at a GPU's share of the
batch, in each precision, and the projection turns the rates into hours."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_stages  # noqa: E402
import scale  # noqa: E402

STAGES = (
    "train_cam",
    "make_cams",
    "train_cam_conta",
    "make_cams_conta",
    "train_affinity",
    "make_pseudo_masks",
    "train_segmenter",
    "predict_segmenter",
    "confounders",
)


@pytest.mark.parametrize(
    "batch, accumulate, gpus, share",
    [(16, 1, 1, 16), (16, 1, 8, 2), (32, 1, 8, 4), (5, 2, 1, 5), (5, 2, 2, 5), (5, 2, 8, 2)],
)
def test_a_gpus_share_is_the_pipelines_and_rounds_up_where_it_does_not_divide(
    batch, accumulate, gpus, share
):
    assert gpu_stages.gpu_share(batch, accumulate, gpus, "key") == share


@pytest.mark.slow  # 68 s: every GPU stage twice on the CPU (make bench-gpu runs it on a GPU)
def test_every_gpu_stage_runs_in_both_precisions_at_its_share():
    cfg = gpu_stages.compose_experiment("synth_conta")
    rates = gpu_stages.measure(
        cfg, "cpu", list(gpu_stages.PRECISIONS), [1, 8], steps=1, warmup=1, size=(64, 48)
    )
    assert {k[0] for k in rates} == set(STAGES)
    for precision in gpu_stages.PRECISIONS:
        for gpus in (1, 8):
            shares = gpu_stages.batch_sizes(cfg, gpus)
            for stage in STAGES:
                rate = rates[stage, precision, gpus]
                assert rate.images_per_s > 0 and rate.peak_gib is None  # no GPU memory on CPU
                assert rate.batch == shares[stage]
    assert rates["train_cam", "32-true", 8].batch == cfg.cam.batch_size // 8
    # An inference stage does not depend on the number of GPUs: timed once.
    assert rates["make_cams", "32-true", 1] is rates["make_cams", "32-true", 8]


def test_the_gpu_projection_divides_each_stages_images_by_the_gpus_rate():
    cfg = gpu_stages.compose_experiment("voc_conta")
    images = scale.gpu_stage_images("voc", cfg)
    assert images["train_segmenter"] == 20_000 * 10  # deeplab-pytorch's steps x 5 x 2
    assert images["train_cam"] == 5 * 10_582 and images["confounders"] == 10_582 + 1_449
    rates = {
        (stage, "bf16-mixed", gpus): gpu_stages.Rate(images_per_s=2.0, batch=1, peak_gib=None)
        for stage in STAGES
        for gpus in (1, 8)
    }
    rates["train_cam_conta", "bf16-mixed", 8] = gpu_stages.Rate(1.0, 1, None)
    hours = scale.project_gpu("voc", cfg, rates, "bf16-mixed", 8)
    assert set(hours) == set(STAGES) - set(gpu_stages.CONTA_STAGES)
    assert hours["train_segmenter"] == pytest.approx(scale.ROUNDS * 200_000 / (8 * 2.0) / 3600)
    # Round 0 trains the plain classifier, rounds 1..3 the CONTA one (here at half the rate).
    rounds = 1 / (8 * 2.0) + (scale.ROUNDS - 1) / (8 * 1.0)
    assert hours["train_cam"] == pytest.approx(5 * 10_582 * rounds / 3600)
