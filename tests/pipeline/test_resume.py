"""Kill -9 in the middle of a stage, run the same command again: finished stages are kept, the
interrupted one resumes (proven by what its DONE.json counts, not assumed), and the results equal
an uninterrupted run with the same seed.

The subprocess tests run `train.py` in its own process group and SIGKILL the group, as a crash or
an OOM kill would; the unit tests below pin the pieces (temp-file cleanup, resume counts, the RNG
checkpoint callback, a truncated checkpoint) without a subprocess.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from src.pipeline import driver
from src.pipeline.artifacts import StageDir, missing_items, resume_counts
from src.pipeline.stage import StageContext
from src.pipeline.stages.cam import read_weights
from tests.conftest import TINY, TINY_OUTPUTS

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Round 0 of the IRNet baseline; one image per CAM batch so make_cams lasts long enough to be hit.
ARGS = [
    "experiment=synth",
    "conta=off",
    TINY,
    "cam.inference.batch_size=1",
    "callbacks.rich_progress_bar=null",
]
IRNET_RUN = f"{TINY_OUTPUTS}/synth_irnet/seed_0"
TRAIN_IMAGES = 24  # conf/debug/tiny.yaml
# The classifier alone, for three epochs of 24 / 8 = 3 optimizer steps.
CAM_ARGS = ["experiment=synth_cam", TINY, "cam.max_epochs=3", "stages=[train_cam]"]
STEPS_PER_EPOCH = 3
CAM_STAGE = f"{TINY_OUTPUTS}/synth_irnet_cam/seed_0/round_0/train_cam"


class KillMidEpoch(L.Callback):
    """SIGKILLs its own process group after batch `batch` of epoch `epoch` (0-based): in the
    middle of an epoch, after the previous epoch's checkpoint, long before DONE. A kill from
    outside would race the training loop; this one lands at the same batch every time."""

    def __init__(self, epoch: int = 1, batch: int = 1):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.killpg(os.getpgrp(), signal.SIGKILL)


KILL_IN_SECOND_EPOCH = (
    "+callbacks.kill={_target_:tests.pipeline.test_resume.KillMidEpoch,epoch:1,batch:1}"
)


def start(root: Path, args: list[str] = ARGS) -> subprocess.Popen:
    env = {**os.environ, "PROJECT_ROOT": str(root)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill takes any children too
    )


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]


def rounds(root: Path) -> dict:
    return json.loads((root / IRNET_RUN / "results.json").read_text())["rounds"]


def done(stage: Path) -> dict:
    return json.loads((stage / "DONE.json").read_text())


def test_sigkill_mid_stage_then_rerun_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    finish(start(reference))
    assert done(reference / IRNET_RUN / "round_0/make_cams")["metrics"]["resume"] == {
        "computed": TRAIN_IMAGES,
        "reused": 0,
    }

    root = tmp_path / "killed"
    round0 = root / IRNET_RUN / "round_0"
    stage = round0 / "make_cams"
    proc = start(root)
    deadline = time.monotonic() + 300
    while not list((stage / "cams").glob("*.npz")):
        assert proc.poll() is None, "the run ended before make_cams wrote anything"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage / "DONE.json").exists(), "make_cams finished before the kill"
    kept = {p.name: p.stat().st_mtime_ns for p in (stage / "cams").glob("*.npz")}
    assert 0 < len(kept) < TRAIN_IMAGES
    finished = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in round0.glob("*/DONE.json")}
    assert [p.parent.name for p in finished] == ["train_cam"]
    # A write the kill cut short leaves a temp file: removed when make_cams restarts. One in a
    # finished stage's folder is outside the restarting stage and stays.
    stale = stage / "cams" / ".img_x.npz.k1ll3d.tmp"
    stale.write_bytes(b"half a file")
    foreign = round0 / "train_cam" / ".cam_net.pt.n0tm1n3.tmp"
    foreign.write_bytes(b"not make_cams' business")

    finish(start(root))
    for path, (data, mtime) in finished.items():  # finished stages are not redone
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime, path
    resume = done(stage)["metrics"]["resume"]
    # The CAMs on disk at the kill are reused, exactly those, and the rest computed.
    assert resume == {"computed": TRAIN_IMAGES - len(kept), "reused": len(kept)}
    assert resume["reused"] > 0 and resume["computed"] > 0
    assert resume["computed"] + resume["reused"] == TRAIN_IMAGES
    assert len(list((stage / "cams").glob("*.npz"))) == TRAIN_IMAGES
    for name, mtime in kept.items():  # reused as they were, not rewritten
        assert (stage / "cams" / name).stat().st_mtime_ns == mtime, name
    # Stages after the interrupted one ran once, in the second attempt: all computed.
    assert done(round0 / "make_pseudo_masks")["metrics"]["resume"] == {
        "computed": TRAIN_IMAGES,
        "reused": 0,
    }
    assert done(round0 / "train_affinity")["metrics"]["resume"]["resumed_from_step"] == 0
    assert not stale.exists() and foreign.exists()
    assert not list(stage.rglob("*.tmp"))
    log = (root / IRNET_RUN / "train.log").read_text()
    removed = re.findall(r"\((\d+) temporary files? of the killed attempt removed\)", log)
    assert removed and int(removed[-1]) >= 1, "the cleanup was not logged"
    got, want = rounds(root)["0"], rounds(reference)["0"]
    for key in [k for k in want if k.endswith("_miou")]:
        # Same seeds, CPU kernels, no DataLoader workers: equal up to float summation order.
        assert abs(got[key] - want[key]) < 1e-6, key


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_mid_training_then_resume_equals_an_uninterrupted_run(tmp_path, workers):
    """Three epochs of train_cam, killed in the second (after the first epoch's checkpoint);
    the rerun resumes from checkpoints/last.ckpt at step 3 and must end with the same weights,
    bit for bit, and the same DONE metrics as an uninterrupted run.

    Exact because the checkpoint is taken at an epoch boundary and carries the global RNGs
    (src/callbacks/rng_state.py) and the epoch, from which the training loader derives its order
    and every sample's augmentation seed (datamodule.training_loader), on CPU: also with 2
    persistent DataLoader workers, whose own RNG state no checkpoint sees. The second epoch's
    first two batches, done before the kill, are thrown away and redone."""
    args = [*CAM_ARGS, f"num_workers={workers}"]
    reference = tmp_path / "reference"
    finish(start(reference, args))

    root = tmp_path / "killed"
    stage = root / CAM_STAGE
    proc = start(root, [*args, KILL_IN_SECOND_EPOCH])
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, err[-4000:]
    assert not (stage / "DONE.json").exists()
    ckpt = torch.load(stage / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, STEPS_PER_EPOCH)  # the epoch boundary
    assert not list(stage.rglob("*.tmp"))

    finish(start(root, args))
    got, want = done(stage), done(reference / CAM_STAGE)
    assert got["metrics"].pop("resume") == {
        "resumed_from_step": STEPS_PER_EPOCH,
        "steps": 2 * STEPS_PER_EPOCH,
    }
    assert want["metrics"].pop("resume") == {"resumed_from_step": 0, "steps": 3 * STEPS_PER_EPOCH}
    assert got["metrics"] == want["metrics"]  # losses and mAP, compared as exact floats
    assert got["artifacts"] == want["artifacts"]
    weights = [a for a in want["artifacts"] if a.endswith(".pt")]
    assert weights
    for name in weights:
        a = read_weights(stage / name, "train_cam")  # their digests checked
        b = read_weights(reference / CAM_STAGE / name, "train_cam")
        assert a.keys() == b.keys()
        unequal = [k for k in b if not torch.equal(a[k], b[k])]
        assert not unequal, f"{name}: {len(unequal)} of {len(b)} tensors differ, e.g. {unequal[:3]}"


# -- the pieces, without a subprocess ---------------------------------------------------------
def test_restart_removes_only_the_stage_s_own_temp_files(tmp_path, caplog):
    run_dir = tmp_path / "run"
    sdir, other = StageDir(run_dir, 0, "make_cams"), StageDir(run_dir, 0, "train_cam")
    (sdir.path / "cams").mkdir(parents=True)
    other.path.mkdir(parents=True)
    (sdir.path / driver.RUNNING_FILE).write_text(json.dumps({"config_hash": "abc"}))
    keep = [sdir.path / "cams/a.npz", sdir.path / ".hidden", sdir.path / "b.tmp"]
    stale = [sdir.path / "cams/.a.npz.x1.tmp", sdir.path / ".RUNNING.json.y2.tmp"]
    outside = [other.path / ".cam_net.pt.z3.tmp", run_dir / ".results.json.w4.tmp"]
    for p in keep + stale + outside:
        p.write_bytes(b"x")
    with caplog.at_level(logging.INFO, logger=driver.__name__):
        driver._prepare_stage_dir(sdir, "abc")  # the same config: resume
    assert all(p.exists() for p in keep + outside)
    assert not any(p.exists() for p in stale)
    assert "(2 temporary files of the killed attempt removed)" in caplog.text
    driver._prepare_stage_dir(sdir, "other")  # another config: start over
    assert [p.name for p in sdir.path.iterdir()] == [driver.RUNNING_FILE]


def test_resume_counts_come_from_the_disk(tmp_path):
    ids = ["a", "b", "c", "d"]
    masks, logits = tmp_path / "masks", tmp_path / "logits"
    masks.mkdir()
    logits.mkdir()
    for i in ["a", "b", "c"]:
        (masks / f"{i}.png").write_bytes(b"x")
    (logits / "a.npz").write_bytes(b"x")
    (masks / ".d.png.x1.tmp").write_bytes(b"x")  # cut short: not an output
    assert missing_items(ids, (masks, ".png")) == [3]
    assert missing_items(ids, (masks, ".png"), (logits, ".npz")) == [1, 2, 3]
    todo = missing_items(ids, (masks, ".png"))
    assert resume_counts(ids, todo, (masks, ".png")) == {"computed": 0, "reused": 3}
    (masks / "d.png").write_bytes(b"x")
    assert resume_counts(ids, todo, (masks, ".png")) == {"computed": 1, "reused": 3}


def test_truncated_checkpoint_is_not_resumed_from(tmp_path, caplog):
    ctx = StageContext(cfg=OmegaConf.create({}), round=0, name="s", dir=tmp_path, inputs={}, seed=0)
    assert ctx.checkpoint_to_resume() is None and ctx.resumed_from_step == 0
    last = tmp_path / "checkpoints/last.ckpt"
    last.parent.mkdir()
    buf = io.BytesIO()
    torch.save({"global_step": 7, "state_dict": {"w": torch.ones(1000)}}, buf)
    last.write_bytes(buf.getvalue())
    assert ctx.checkpoint_to_resume() == str(last) and ctx.resumed_from_step == 7
    last.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # a copy killed half-way
    with caplog.at_level(logging.WARNING):
        assert ctx.checkpoint_to_resume() is None
    assert ctx.resumed_from_step == 0 and not last.exists()
    assert "not a complete checkpoint" in caplog.text


def _bad_archive(path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as z:  # a complete zip, but not torch.save's layout
        z.writestr("archive/readme.txt", "not a checkpoint")


def _saved(obj) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        path.write_bytes(buf.getvalue())

    return write


DAMAGED_CHECKPOINTS = {
    "a list payload": _saved([1, 2, 3]),
    "a tensor payload": _saved(torch.ones(3)),
    "another zip": _bad_archive,
    "a pickled global": _saved({"global_step": 7, "when": datetime.date(2020, 1, 1)}),
    "a string step": _saved({"global_step": "7", "state_dict": {}}),
    "a negative step": _saved({"global_step": -1, "state_dict": {}}),
    "a state dict of strings": _saved({"global_step": 7, "state_dict": {"w": "x"}}),
}


@pytest.mark.parametrize("write", list(DAMAGED_CHECKPOINTS.values()), ids=list(DAMAGED_CHECKPOINTS))
def test_a_damaged_checkpoint_is_removed_and_training_starts_over(tmp_path, caplog, write):
    ctx = StageContext(cfg=OmegaConf.create({}), round=0, name="s", dir=tmp_path, inputs={}, seed=0)
    last = tmp_path / "checkpoints/last.ckpt"
    last.parent.mkdir()
    write(last)
    with caplog.at_level(logging.WARNING):
        assert ctx.checkpoint_to_resume() is None
    assert ctx.resumed_from_step == 0 and not last.exists()
    assert f"{last} is not a checkpoint of this stage" in caplog.text
    assert "training starts over" in caplog.text
    assert ctx.checkpoint_to_resume() is None  # and the next rerun has nothing to trip on


@pytest.mark.parametrize("steps", [0, 5])
def test_training_resume_metrics(tmp_path, steps):
    ctx = StageContext(cfg=OmegaConf.create({}), round=0, name="s", dir=tmp_path, inputs={}, seed=0)
    ctx.resumed_from_step = steps
    trainer = SimpleNamespace(global_step=12)
    assert ctx.training_resume(trainer) == {"resumed_from_step": steps, "steps": 12 - steps}


SEGMENTER_ARGS = [
    "experiment=synth_supervised",
    TINY,
    "stages=[train_cam,train_segmenter]",
    "segmenter.max_steps=12",  # four epochs of 24 / 8 = 3 steps
    "num_workers=0",
    "callbacks.rich_progress_bar=null",
]
SEGMENTER_STAGE = f"{TINY_OUTPUTS}/synth_supervised/seed_0/round_0/train_segmenter"


@pytest.mark.parametrize(
    "val_every, kill_epoch",
    [
        # Lightning's set_epoch one ahead after a max_steps resume (RNGStateCheckpoint); slow:
        # the (2, 1) case keeps the segmenter's resume in the fast suite.
        pytest.param(5, 1, marks=pytest.mark.slow),
        (2, 1),  # the resumed epoch holds a validation pass: a max_steps resume replayed a batch
    ],
)
def test_sigkill_mid_segmenter_training_then_resume_equals_an_uninterrupted_run(
    tmp_path, val_every, kill_epoch
):
    """The one training stage specified in steps (callbacks/step_budget.py): both cases were
    found by bench/faults.py. Killed after batch 1 of `kill_epoch`, resumed from the checkpoint
    of the epoch before; weights and reported metrics equal the uninterrupted run's."""
    args = [*SEGMENTER_ARGS, f"segmenter.val_every_n_epochs={val_every}"]
    kill = f"+callbacks.kill={{_target_:tests.pipeline.test_resume.KillMidEpoch,epoch:{kill_epoch},batch:1}}"
    reference = tmp_path / "reference"
    finish(start(reference, args))
    root = tmp_path / "killed"
    proc = start(root, [*args, kill])
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    finish(start(root, args))
    resumed, uninterrupted = done(root / SEGMENTER_STAGE), done(reference / SEGMENTER_STAGE)
    assert resumed["metrics"]["resume"] == {
        "resumed_from_step": kill_epoch * STEPS_PER_EPOCH,
        "steps": 12 - kill_epoch * STEPS_PER_EPOCH,
    }
    del resumed["metrics"]["resume"], uninterrupted["metrics"]["resume"]
    assert resumed["metrics"] == uninterrupted["metrics"]  # train/loss, and val/mIoU if it ran
    a = torch.load(root / SEGMENTER_STAGE / "segmenter.pt", weights_only=True)["state_dict"]
    b = torch.load(reference / SEGMENTER_STAGE / "segmenter.pt", weights_only=True)["state_dict"]
    unequal = [k for k in b if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} of {len(b)} tensors differ, e.g. {unequal[:3]}"


def test_a_lightning_checkpoint_with_an_ordered_state_dict_is_resumed_from(tmp_path):
    """What Lightning writes: the state_dict is an OrderedDict (a first version of the damage
    check took it for damage and made every killed training start over)."""
    from collections import OrderedDict

    ctx = StageContext(cfg=OmegaConf.create({}), round=0, name="s", dir=tmp_path, inputs={}, seed=0)
    last = tmp_path / "checkpoints/last.ckpt"
    last.parent.mkdir()
    state = OrderedDict(w=torch.ones(3))
    _saved({"epoch": 0, "global_step": 3, "state_dict": state, "loops": {}})(last)
    assert ctx.checkpoint_to_resume() == str(last) and ctx.resumed_from_step == 3
