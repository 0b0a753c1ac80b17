"""Global batches: the recipe's images per optimizer step, whatever the number of ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.pipeline.artifacts import StageDir
from src.pipeline.batching import RankBatch, rank_batch
from src.pipeline.plan import PipelineError
from src.pipeline.registry import STAGES
from src.train import train
from tests.conftest import TINY, TINY_OUTPUTS, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "batch, accumulate, world, expected",
    [
        (16, 1, 1, RankBatch(16, 1, 16, 1)),  # IRNet's classifier on one device
        (16, 1, 8, RankBatch(16, 8, 2, 1)),  # ... on eight: 2 each, 16 per step still
        (5, 2, 1, RankBatch(10, 1, 5, 2)),  # DeepLab's 5 x ITER_SIZE 2
        (5, 2, 2, RankBatch(10, 2, 5, 1)),  # two ranks of 5: no accumulation needed
        (5, 2, 5, RankBatch(10, 5, 2, 1)),
        (4, 3, 2, RankBatch(12, 2, 3, 2)),  # 6 per rank in micro-batches of at most 4: 3 x 2
        (20, 1, 4, RankBatch(20, 4, 5, 1)),  # DSRG's 20 on four
    ],
)
def test_each_rank_takes_its_share_of_the_global_batch(batch, accumulate, world, expected):
    share = rank_batch(batch, accumulate, world, "cam.batch_size")
    assert share == expected
    assert share.per_rank * share.accumulate * share.world == batch * accumulate
    assert share.per_rank <= batch  # never more per forward than the recipe was sized for


def test_a_batch_that_does_not_divide_names_the_key_and_a_fix():
    with pytest.raises(ValueError, match=r"segmenter\.batch_size.*10 images.*8 ranks.*e\.g\. 16"):
        rank_batch(5, 2, 8, "segmenter.batch_size")
    with pytest.raises(ValueError, match="seeded.batch_size=0"):
        rank_batch(0, 1, 1, "seeded.batch_size")


# One classifier and one accumulating segmenter: batches of 8 = 4 x 2 on one process.
ARGS = [
    "experiment=synth_supervised",
    TINY,
    "stages=[train_cam,train_segmenter]",
    "segmenter.batch_size=4",
    "segmenter.accumulate_grad_batches=2",
    "segmenter.val_every_n_epochs=100",
]
TRAINING = ("train_cam", "train_segmenter")


def _batches(run_dir: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for stage in TRAINING:
        metrics = StageDir(run_dir, 0, stage).read_done()["metrics"]
        out[stage] = (metrics["global_batch_size"], metrics["optimizer_steps"])
    return out


def test_ddp_trains_with_the_single_process_global_batch_and_steps(tmp_path):
    single = compose_cfg(ARGS, tmp_path / "single")
    train(single)
    expected = _batches(Path(single.paths.run_dir))
    assert expected == {"train_cam": (8, 3), "train_segmenter": (8, 4)}  # 24 images, 1 epoch

    env = {**os.environ, "PROJECT_ROOT": str(tmp_path / "ddp")}
    cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, "trainer=ddp_cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "ddp" / TINY_OUTPUTS / "synth_supervised/seed_0"
    assert _batches(run_dir) == expected
    for stage in TRAINING:  # the same recipe, so the same stage hashes
        ddp_done = json.loads((run_dir / "round_0" / stage / "DONE.json").read_text())
        single_done = StageDir(Path(single.paths.run_dir), 0, stage).read_done()
        assert ddp_done["config_hash"] == single_done["config_hash"]


def test_a_batch_that_does_not_divide_stops_the_run_before_any_stage(tmp_path):
    # Three ranks: the classifier's 8 and the segmenter's 4 x 2 both fail, and both are named.
    cfg = compose_cfg([*ARGS, "trainer=ddp_cpu", "trainer.devices=3"], tmp_path)
    with pytest.raises(PipelineError, match="no stage has run") as err:
        train(cfg)
    assert "train_cam: the global batch of cam.batch_size (8 images" in str(err.value)
    assert "train_segmenter: the global batch of segmenter.batch_size (8 images" in str(err.value)
    assert not Path(cfg.paths.run_dir).exists()  # nothing launched, nothing written


def test_every_training_stage_declares_its_global_batch():
    training = {n for n, s in STAGES.items() if s.global_batch}
    assert training == {n for n in STAGES if n.startswith("train_")}
    assert len(training) == 5  # classifier, two affinity nets, seeded net, segmenter
    assert STAGES["train_segmenter"].global_batch[1] == "segmenter.accumulate_grad_batches"
