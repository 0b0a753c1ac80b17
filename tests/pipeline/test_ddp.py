"""A CONTA round under 2 gloo processes (`trainer=ddp_cpu`), through the real CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY, TINY_OUTPUTS, compose_cfg
from tests.pipeline.conftest import ROUND0

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["experiment=synth_conta", "round=0", TINY]
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
    return json.loads((root / TINY_OUTPUTS / "synth_irnet_conta/seed_0/results.json").read_text())[
        "rounds"
    ]["0"]


def launch(
    root: Path, *extra: str, base: list[str] = ARGS
) -> tuple[subprocess.CompletedProcess, float, float]:
    """`python train.py` as `run` does, whatever its outcome; its seconds from launch until every
    rank has ended, and the time.time() then. The other ranks inherit its stdout and stderr, so
    the pipes close only when the last process is gone."""
    env = {**os.environ, "PROJECT_ROOT": str(root)}
    cmd = [sys.executable, str(ROOT / "train.py"), *base, *extra]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return done, time.monotonic() - start, time.time()


# A failed rank could leave the others in a collective until its 30-minute timeout (gloo does
# notice a peer's closed socket, with a second, misleading traceback; NCCL does not). Once the
# error is logged every process must be gone within EXIT_BOUND_S, and the whole failing command
# (two processes starting, importing, predicting on 2 shared cores) within COMMAND_BOUND_S.
EXIT_BOUND_S = 60
COMMAND_BOUND_S = 300


def logged_at(out: str, message: str) -> float:
    """The time.time() of the one log line ending in `message` (Hydra's `[%Y-%m-%d %H:%M:%S,ms]`)."""
    lines = [line for line in out.splitlines() if line.endswith(message)]
    assert len(lines) == 1, lines
    return datetime.strptime(lines[0][1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def round_dir(root: Path) -> Path:
    return root / TINY_OUTPUTS / "synth_irnet_conta/seed_0/round_0"


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


def test_sharded_cpu_stages_match_a_single_process_run(finished_run, tmp_path):
    """eval_cams and make_ir_labels, first to run in a DDP invocation (no trainer has started
    the second rank): the ranks start, each does half the images, and the summed scores and
    the label files equal those of one process (the session's finished run: its round 0 is
    this command's work, so the CLI skips train_cam and make_cams by their hashes)."""
    stages = "stages=[train_cam,make_cams,eval_cams,make_ir_labels]"
    cfg, results = finished_run
    single = results["rounds"]["0"]
    rdir = round_dir(tmp_path)
    shutil.copytree(Path(cfg.paths.run_dir), rdir.parent)
    labels = {p.name: p.read_bytes() for p in (rdir / "make_ir_labels/ir_labels").glob("*.png")}
    for stage in ("eval_cams", "make_ir_labels"):
        (rdir / stage / "DONE.json").unlink()
    done, _, _ = launch(tmp_path, stages, "trainer=ddp_cpu")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.count("make_ir_labels: 12 of 24 images here, 1 workers") == 2, out[-4000:]
    for stage in ("train_cam", "make_cams"):  # the reference's own weights and CAMs
        assert f"round 0: {stage} already done" in out, out[-4000:]
    ddp = json.loads((rdir.parent / "results.json").read_text())["rounds"]["0"]
    assert ddp["cam_miou"] == pytest.approx(single["cam_miou"], abs=1e-12)
    assert ddp["cam_sweep"] == pytest.approx(single["cam_sweep"], abs=1e-12)
    done_ir = json.loads((rdir / "make_ir_labels/DONE.json").read_text())["metrics"]
    assert done_ir["resume"]["computed"] == 24, done_ir
    again = {p.name: p.read_bytes() for p in (rdir / "make_ir_labels/ir_labels").glob("*.png")}
    assert again == labels and len(labels) == 24


@pytest.mark.slow
def test_sharded_inference_matches_a_single_process_run(tmp_path):
    """The same trained weights: every inference stage redone on 2 ranks (sharded predictions,
    gathered confounders) gives the single-process metrics and confounders."""
    single = run(tmp_path)
    conf = round_dir(tmp_path) / "confounders/confounders.npz"
    with np.load(conf) as z:
        a = {k: z[k] for k in z.files}
    # The device count is not hashed, so the trained stages are kept; the inference stages lose
    # their DONE markers (force would redo the trainings that read them too).
    for stage in INFERENCE:
        (round_dir(tmp_path) / stage / "DONE.json").unlink()
    ddp = run(tmp_path, "trainer=ddp_cpu")
    for key in ("cam_miou", "pseudo_miou", "pseudo_ir_label_miou", "seg_miou", "seg_crf_miou"):
        assert ddp[key] == pytest.approx(single[key], abs=1e-6), key
    with np.load(conf) as b:
        np.testing.assert_array_equal(a["ids"], b["ids"])
        np.testing.assert_allclose(a["centers"], b["centers"], atol=1e-6)
        np.testing.assert_array_equal(a["codes"], b["codes"])


def test_a_sharded_stage_failing_ends_every_rank(tmp_path):
    """eval_cams (sharded; train_cam has started the second rank) meets a sweep threshold
    outside [0, 1] (of the right type, so the start-up checks let it through), on both ranks
    alike: both end promptly and non-zero; rank 0 shows the error,
    once, and the other rank says in one line that it failed the same way."""
    done, seconds, ended = launch(
        tmp_path,
        "trainer=ddp_cpu",
        "stages=[train_cam,make_cams,eval_cams]",
        "cam.eval.sweep=[0.1,1.5]",  # read by eval_cams alone
    )
    out = done.stdout + done.stderr
    failed = logged_at(out, "rank 0 failed in round 0: eval_cams")
    print(
        f"failing DDP run: {seconds:.1f} s launch to exit, {ended - failed:.1f} s failure to exit"
    )
    assert ended - failed < EXIT_BOUND_S, out[-4000:]
    assert seconds < COMMAND_BOUND_S, out[-4000:]
    assert done.returncode != 0, out[-4000:]
    assert out.count("CAM background thresholds [1.5] lie outside [0, 1]") == 1, out[-6000:]
    assert out.count("Traceback (most recent call last)") == 1, out[-6000:]
    same = "rank 1 failed in round 0: eval_cams with the same error as rank 0"
    assert out.count(same) == 1, out[-4000:]
    assert "Connection closed" not in out
    rdir = round_dir(tmp_path)
    assert (rdir / "make_cams/DONE.json").is_file()
    assert not (rdir / "eval_cams/DONE.json").exists()


def test_prepare_data_failing_on_rank_zero_ends_the_run(tmp_path):
    """Rank 0 prepares the data before Lightning starts the other rank: a data folder it must
    not overwrite ends the run at once, with the error shown once."""
    cfg = compose_cfg([*ARGS, "trainer=ddp_cpu"], tmp_path)
    data_root = Path(cfg.data.root)
    data_root.mkdir(parents=True)
    (data_root / "someone_elses.txt").write_text("not a synthetic data set")
    done, seconds, _ = launch(tmp_path, "trainer=ddp_cpu")
    out = done.stdout + done.stderr
    print(f"failing DDP run (prepare_data): {seconds:.1f} s from launch until it ended")
    assert seconds < COMMAND_BOUND_S, out[-4000:]
    assert done.returncode != 0
    assert out.count("is not a synthetic data set folder (no meta.json)") == 1, out[-4000:]
    assert not (tmp_path / TINY_OUTPUTS / "synth_irnet_conta/seed_0/round_0").exists()


SETTLE_SCRIPT = """
import json
import sys

import torch.distributed as dist
import torch.multiprocessing as mp

from src.utils.ranks import RankFailed, error_shown, ranks_settle, run_on_rank_zero


def outcome(block):
    try:
        return f"ok {block()}"
    except RankFailed as error:
        return f"RankFailed: {error}"
    except (ValueError, ZeroDivisionError) as error:
        return f"own {type(error).__name__}, shown={error_shown(error)}"


def settle(rank, failing):
    with ranks_settle(f"rank {failing}'s part"):
        if rank == failing:
            raise ValueError("boom")


def both_fail(rank, alike):
    with ranks_settle("both"):
        raise ValueError("boom" if alike else f"boom on {rank}")


def worker(rank, port, out):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    seen = {f"{failing} fails": outcome(lambda: settle(rank, failing)) for failing in (0, 1, 2)}
    seen["both fail alike"] = outcome(lambda: both_fail(rank, True))
    seen["both fail apart"] = outcome(lambda: both_fail(rank, False))
    seen["on rank 0, fails"] = outcome(lambda: run_on_rank_zero(lambda: 1 / 0, "division"))
    seen["on rank 0"] = outcome(lambda: run_on_rank_zero(lambda: 42, "answer"))
    dist.destroy_process_group()
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    mp.spawn(worker, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ranks_settle_on_two_gloo_ranks(tmp_path):
    """Either rank failing in a settled block: it re-raises its own error (already logged), the
    other gets RankFailed naming it; nobody waits on the failed rank. Both failing: each
    re-raises its own, and an error already shown by a lower rank is not shown again."""
    script = tmp_path / "settle.py"
    script.write_text(SETTLE_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(script), str(free_port()), str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    seen = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    own = "own ValueError, shown=True"
    assert seen[0]["0 fails"] == seen[1]["1 fails"] == own
    assert seen[1]["0 fails"] == "RankFailed: rank 0 failed in rank 0's part; see its error"
    assert seen[0]["1 fails"] == "RankFailed: rank 1 failed in rank 1's part; see its error"
    assert seen[0]["2 fails"] == seen[1]["2 fails"] == "ok None"
    assert seen[0]["on rank 0, fails"] == "own ZeroDivisionError, shown=True"
    assert seen[1]["on rank 0, fails"] == "RankFailed: rank 0 failed in division; see its error"
    assert (seen[0]["on rank 0"], seen[1]["on rank 0"]) == ("ok 42", "ok None")
    for case in ("both fail alike", "both fail apart"):
        assert seen[0][case] == seen[1][case] == own
    # Each failure logged once, by its own rank; one repeated on a later rank, in one line.
    assert done.stderr.count("Traceback (most recent call last)") == 6, done.stderr[-4000:]
    assert done.stderr.count("rank 1 failed in both with the same error as rank 0") == 1


WATCHED_CHILD = textwrap.dedent(
    """
    import time
    from src.utils.ranks import exit_with_rank_zero
    exit_with_rank_zero(poll_s=0.1)
    print("watching", flush=True)
    time.sleep(60)
    """
)
FAKE_RANK_ZERO = textwrap.dedent(
    f"""
    import os, subprocess, sys, time
    from src.utils.ranks import exit_with_rank_zero
    exit_with_rank_zero()  # rank 0: notes its pid for its children
    child = subprocess.Popen(
        [sys.executable, "-c", {WATCHED_CHILD!r}],
        env={{**os.environ, "LOCAL_RANK": "1"}},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "watching"
    print(time.time(), flush=True)
    sys.exit(3)  # dies without a word to its child, as a crashed rank 0 would
    """
)


def test_a_rank_started_by_rank_zero_ends_with_it(tmp_path):
    """The backstop for failures no settle covers: a rank Lightning's launcher started as rank
    0's child exits (status 1, one line) soon after rank 0's process is gone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LOCAL_RANK", None)
    env.pop("RANK", None)
    cmd = [sys.executable, "-c", FAKE_RANK_ZERO]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    # run() returns once the child, which shares stderr, has ended too: well before its 60 s.
    assert done.returncode == 3, done.stderr[-4000:]
    assert time.time() - float(done.stdout) < 20, done.stderr[-4000:]
    assert "rank 1: rank 0 (pid" in done.stderr and "has ended; stopping too" in done.stderr


@pytest.mark.slow  # 27 s; test_sharded_cpu_stages_match_a_single_process_run keeps the path fast
def test_sharded_cue_summary_matches_a_single_process_run(tmp_path):
    """SEC's make_cues first in a DDP invocation: each rank writes and reads back half the cue
    files; the joined summary (counts, named examples) and the files equal one process's."""
    base = ["experiment=synth", "method=sec", "conta=off", "round=0", TINY]
    stages = ["stages=[train_cam,make_cams,make_cues]"]
    done, _, _ = launch(tmp_path, *stages, base=base)
    assert done.returncode == 0, done.stderr[-4000:]
    (cue_stage,) = (tmp_path / TINY_OUTPUTS).glob("*/seed_0/round_0/make_cues")
    single = json.loads((cue_stage / "DONE.json").read_text())["metrics"]
    files = {p.name: p.read_bytes() for p in (cue_stage / "cues").glob("*.npz")}
    (cue_stage / "DONE.json").unlink()
    done, _, _ = launch(tmp_path, *stages, "trainer=ddp_cpu", base=base)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert out.count("make_cues: 24 of 24 images") == 2, out[-4000:]  # both ranks ran it
    ddp = json.loads((cue_stage / "DONE.json").read_text())["metrics"]
    assert ddp["resume"]["computed"] == 24 and ddp["images"] == single["images"] == 24
    assert {k: v for k, v in ddp.items() if k != "resume"} == {
        k: v for k, v in single.items() if k != "resume"
    }
    assert {p.name: p.read_bytes() for p in (cue_stage / "cues").glob("*.npz")} == files
