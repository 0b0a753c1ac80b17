"""Kill -9 in the middle of a stage, run the same command again: finished stages are kept, the
interrupted one resumes, and the results equal an uninterrupted run with the same seed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[2]
# Round 0 of the IRNet baseline; one image per CAM batch so make_cams lasts long enough to be hit.
ARGS = [
    "experiment=synth_irnet",
    *FAST,
    "cam.inference.batch_size=1",
    "callbacks.rich_progress_bar=null",
]


def start(root: Path) -> subprocess.Popen:
    env = {**os.environ, "PROJECT_ROOT": str(root)}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *ARGS],
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
    return json.loads((root / "outputs/synth_irnet/seed_0/results.json").read_text())["rounds"]


def test_sigkill_mid_stage_then_rerun_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    finish(start(reference))

    root = tmp_path / "killed"
    stage = root / "outputs/synth_irnet/seed_0/round_0/make_cams"
    proc = start(root)
    deadline = time.monotonic() + 300
    while not list((stage / "cams").glob("*.npz")):
        assert proc.poll() is None, "the run ended before make_cams wrote anything"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (stage / "DONE.json").exists(), "make_cams finished before the kill"
    written = len(list((stage / "cams").glob("*.npz")))
    train_done = (stage.parent / "train_cam/DONE.json").stat().st_mtime_ns

    finish(start(root))
    assert (stage.parent / "train_cam/DONE.json").stat().st_mtime_ns == train_done  # not redone
    assert 0 < written < len(list((stage / "cams").glob("*.npz"))) == 24
    assert not list(stage.rglob("*.tmp"))
    got, want = rounds(root)["0"], rounds(reference)["0"]
    for key in [k for k in want if k.endswith("_miou")]:
        # Same seeds, CPU kernels, no DataLoader workers: equal up to float summation order.
        assert abs(got[key] - want[key]) < 1e-6, key
