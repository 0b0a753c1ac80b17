"""Preemption loses nothing: SLURM's signals (SIGTERM, SIGUSR1) sent to the whole process group
of a run, as SLURM sends them, mid-`train_cam` and mid-`make_ir_labels`; the rerun of the same
command (what a requeued job does) resumes at the stage it left (training from its last
epoch-end checkpoint, the per-image stage keeping its finished files), and every output equals
an uninterrupted run's, bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from src.train import SIGTERM_EXIT
from tests.conftest import TINY, TINY_OUTPUTS

ROOT = Path(__file__).resolve().parents[1]
N_CAMS = 48  # make_cams: one file per train image
ARGS = [
    "experiment=synth",
    "conta=off",
    TINY,
    "data.generator.num_train=48",  # 6 steps an epoch
    "cam.max_epochs=3",
    "stages=[train_cam,make_cams,make_ir_labels]",
    "affinity.ir_label.workers=2",
]


def _run(tmp: Path, signum: int | None = None, ready=None, args=ARGS) -> tuple[int, bool]:
    """`python train.py ARGS` with outputs under tmp; with `signum`, that signal goes to its
    process group as soon as ready() holds. Returns (exit status, whether it was signalled)."""
    env = {**os.environ, "PROJECT_ROOT": str(tmp), "OMP_NUM_THREADS": "1"}
    with open(tmp / "train.out", "a") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a SLURM job step
        )
        sent = False
        try:
            while signum is not None and proc.poll() is None and not sent:
                if ready():
                    os.killpg(proc.pid, signum)
                    sent = True
                time.sleep(0.02)
            return proc.wait(timeout=600), sent
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _round(tmp: Path, experiment: str = "synth_irnet") -> Path:
    return tmp / TINY_OUTPUTS / experiment / "seed_0" / "round_0"


def _done(tmp: Path, stage: str) -> dict:
    return json.loads((_round(tmp) / stage / "DONE.json").read_text())


@pytest.mark.slow  # 3 min: an uninterrupted run, then one stopped twice and resumed
def test_signals_mid_stage_lose_nothing(tmp_path):
    ref, pre = tmp_path / "ref", tmp_path / "pre"
    ref.mkdir(), pre.mkdir()
    assert _run(ref) == (0, False), (ref / "train.out").read_text()[-3000:]

    # SIGTERM once epoch 1's checkpoint is complete: Lightning stops after the batch in
    # progress, the run exits with 143 (not 0: it did not finish)
    ckpt = _round(pre) / "train_cam" / "checkpoints" / "last.ckpt"
    status, sent = _run(pre, signal.SIGTERM, lambda: ckpt.is_file() and zipfile.is_zipfile(ckpt))
    assert sent and status == SIGTERM_EXIT, (pre / "train.out").read_text()[-3000:]
    assert not (_round(pre) / "train_cam" / "DONE.json").exists()

    # the requeued job: SIGUSR1 (no handler outside SLURM: the default action, the process dies)
    # once make_ir_labels has written a few labels
    labels = _round(pre) / "make_ir_labels" / "ir_labels"
    status, sent = _run(pre, signal.SIGUSR1, lambda: len(list(labels.glob("*.png"))) >= 4)
    assert sent and status == -signal.SIGUSR1
    assert not (_round(pre) / "make_ir_labels" / "DONE.json").exists()
    kept = len(list(labels.glob("*.png")))

    assert _run(pre) == (0, False), (pre / "train.out").read_text()[-3000:]

    # train_cam resumed at the end of an epoch, and did the steps after it only
    resume = _done(pre, "train_cam")["metrics"].pop("resume")
    assert resume["resumed_from_step"] in (6, 12)
    assert resume["resumed_from_step"] + resume["steps"] == 18
    reference = _done(ref, "train_cam")["metrics"]
    assert reference.pop("resume") == {"resumed_from_step": 0, "steps": 18}
    assert _done(pre, "train_cam")["metrics"] | {"resume": None} == reference | {"resume": None}
    a = torch.load(_round(ref) / "train_cam" / "cam_net.pt", map_location="cpu")
    b = torch.load(_round(pre) / "train_cam" / "cam_net.pt", map_location="cpu")
    a = a.get("state_dict", a) if isinstance(a, dict) else a
    b = b.get("state_dict", b) if isinstance(b, dict) else b
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    cams = sorted((_round(ref) / "make_cams" / "cams").glob("*.npz"))
    assert len(cams) == N_CAMS
    for f in cams:
        x, y = np.load(f), np.load(_round(pre) / "make_cams" / "cams" / f.name)
        assert x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files), f.name

    # make_ir_labels kept the labels written before the signal and computed the rest
    assert _done(pre, "make_ir_labels")["metrics"]["resume"]["reused"] == kept
    ref_labels = sorted((_round(ref) / "make_ir_labels" / "ir_labels").glob("*.png"))
    assert len(ref_labels) == 48
    for f in ref_labels:
        assert f.read_bytes() == (labels / f.name).read_bytes(), f.name
    figures = {
        "train_cam": resume | {"of_steps": 18},
        "make_ir_labels": {"kept": kept, "computed_after": 48 - kept},
        "compared": {"cam_net_tensors": len(a), "cam_files": len(cams), "ir_labels": 48},
    }
    print("preemption figures:", json.dumps(figures))  # pytest -s shows them


SEGMENTER_ARGS = [
    "experiment=synth",
    "method=cam",
    "conta=off",
    TINY,  # 24 train images: 3 steps an epoch at batch 8
    "segmenter.max_steps=9",  # 3 epochs
    "stages=[train_cam,make_cams,eval_cams,make_cam_masks,eval_pseudo,train_segmenter,"
    "predict_segmenter,eval_segmenter]",
]


@pytest.mark.slow  # 2 min: an uninterrupted run, then one stopped mid-train_segmenter
def test_sigterm_mid_train_segmenter_loses_nothing(tmp_path):
    ref, pre = tmp_path / "ref", tmp_path / "pre"
    ref.mkdir(), pre.mkdir()
    assert _run(ref, args=SEGMENTER_ARGS) == (0, False), (ref / "train.out").read_text()[-3000:]
    stage = _round(pre, "synth_cam") / "train_segmenter"
    ckpt = stage / "checkpoints" / "last.ckpt"
    status, sent = _run(
        pre, signal.SIGTERM, lambda: ckpt.is_file() and zipfile.is_zipfile(ckpt), SEGMENTER_ARGS
    )
    assert sent and status == SIGTERM_EXIT, (pre / "train.out").read_text()[-3000:]
    assert not (stage / "DONE.json").exists()
    assert _run(pre, args=SEGMENTER_ARGS) == (0, False), (pre / "train.out").read_text()[-3000:]

    ref_stage = _round(ref, "synth_cam") / "train_segmenter"
    done_ref = json.loads((ref_stage / "DONE.json").read_text())["metrics"]
    done_pre = json.loads((stage / "DONE.json").read_text())["metrics"]
    resume = done_pre.pop("resume")
    assert done_ref.pop("resume") == {"resumed_from_step": 0, "steps": 9}
    assert resume["resumed_from_step"] in (3, 6) and sum(resume.values()) == 9
    assert done_pre == done_ref
    a = torch.load(ref_stage / "segmenter.pt", map_location="cpu")
    b = torch.load(stage / "segmenter.pt", map_location="cpu")
    a, b = (x.get("state_dict", x) for x in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [
        json.loads((r / TINY_OUTPUTS / "synth_cam/seed_0/results.json").read_text())["rounds"]["0"]
        for r in (ref, pre)
    ]
    assert rows[0]["seg_miou"] == rows[1]["seg_miou"]
    masks = sorted((_round(ref, "synth_cam") / "predict_segmenter" / "masks").glob("*.png"))
    assert masks
    for f in masks:
        assert (
            f.read_bytes()
            == (_round(pre, "synth_cam") / "predict_segmenter/masks" / f.name).read_bytes()
        )
    print(
        "preemption figures (train_segmenter):",
        json.dumps(
            {
                **resume,
                "of_steps": 9,
                "tensors": len(a),
                "masks": len(masks),
                "seg_miou": [rows[0]["seg_miou"], rows[1]["seg_miou"]],
            }
        ),
    )


def test_a_trainer_removes_lightnings_mid_epoch_requeue_checkpoints(tiny_cfg, tmp_path):
    """Lightning's SLURM auto-requeue saves hpc_ckpt_<n>.ckpt mid-epoch into the stage folder and
    would resume from it when no ckpt_path is given; the stage's trainer removes them, keeping the
    epoch-end last.ckpt that Stage.checkpoint_to_resume resumes from exactly."""
    from src.pipeline.trainers import build_trainer

    stage = tmp_path / "train_cam"
    (stage / "checkpoints").mkdir(parents=True)
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "checkpoints/last.ckpt"):
        (stage / name).write_bytes(b"x")
    build_trainer(tiny_cfg, stage, [], training=True)
    assert sorted(p.relative_to(stage).as_posix() for p in stage.rglob("*.ckpt")) == [
        "checkpoints/last.ckpt"
    ]
