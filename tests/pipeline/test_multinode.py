"""Several nodes, simulated on this host: 2 "nodes" x 1 rank under gloo, each node's process
started beside the other with Lightning's variables (MASTER_ADDR, MASTER_PORT, NODE_RANK) and
`trainer.num_nodes=2`, as a cluster's job starts them. The sharded CPU stages and the metric
reduction give what one process gives; the per-node CRF pool is split among the ranks that share
a host (here both "nodes")."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from src.utils.ranks import global_rank
from tests.conftest import TINY, TINY_OUTPUTS

ROOT = Path(__file__).resolve().parents[2]
BASE = ["experiment=synth", "conta=off", TINY, "affinity.ir_label.workers=2"]
ARGS = [*BASE, "stages=[train_cam,make_cams,eval_cams,make_ir_labels]"]
NODES = ["trainer=ddp_cpu", "trainer.devices=1", "+trainer.num_nodes=2"]


def _env(root: Path) -> dict:
    return {**os.environ, "PROJECT_ROOT": str(root), "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_nodes(root: Path, *extra: str, base: list[str] = ARGS) -> list[str]:
    """One `python train.py` per node, started together; every one must succeed. Their logs."""
    port, procs = _free_port(), []
    for node in (0, 1):
        env = {**_env(root), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        env["NODE_RANK"] = str(node)
        log = open(root / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        cmd = [sys.executable, str(ROOT / "train.py"), *base, *NODES, *extra]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log), log))
    try:
        codes = [p.wait(timeout=900) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = [(root / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], "\n".join(text[-3000:] for text in logs)
    return logs


def round_dir(root: Path) -> Path:
    return root / TINY_OUTPUTS / "synth_irnet/seed_0/round_0"


def _train(root: Path, *args: str) -> None:
    """`python train.py <args>` in one process (Lightning starts any other rank), to the end."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def results(root: Path) -> dict:
    return json.loads((round_dir(root).parent / "results.json").read_text())["rounds"]["0"]


@pytest.mark.slow  # 2 min: one single-process run, then two "nodes"
def test_two_nodes_shard_like_one_process(tmp_path):
    """The stages after training redone on 2 nodes: each node's rank takes half the images with
    half the node's pool (both nodes are this host), and the gathered scores and label files
    equal the single process's."""
    _train(tmp_path, *ARGS)
    single = results(tmp_path)
    rdir = round_dir(tmp_path)
    labels = {p.name: p.read_bytes() for p in (rdir / "make_ir_labels/ir_labels").glob("*.png")}
    for stage in ("eval_cams", "make_ir_labels"):
        (rdir / stage / "DONE.json").unlink()

    logs = run_nodes(tmp_path)
    for log in logs:
        assert "make_ir_labels: 12 of 24 images here, 1 workers" in log, log[-3000:]
    nodes = results(tmp_path)
    assert nodes["cam_miou"] == pytest.approx(single["cam_miou"], abs=1e-12)
    assert nodes["cam_sweep"] == pytest.approx(single["cam_sweep"], abs=1e-12)
    assert json.loads((rdir / "make_ir_labels/DONE.json").read_text())["metrics"]["resume"] == {
        "computed": 24,
        "reused": 0,
    }
    again = {p.name: p.read_bytes() for p in (rdir / "make_ir_labels/ir_labels").glob("*.png")}
    assert again == labels and len(labels) == 24
    print("multi-node figures:", json.dumps({k: [single[k], nodes[k]] for k in ("cam_miou",)}))


@pytest.mark.slow  # 3 min: two 2-rank runs
def test_two_nodes_train_as_two_ranks_on_one_node(tmp_path):
    """train_cam, make_cams and eval_cams on 2 nodes x 1 rank equal 1 node x 2 ranks (Lightning's
    own launcher): the same world, so the same weights, tensor for tensor, and the same score."""
    import torch

    one, two = tmp_path / "one_node", tmp_path / "two_nodes"
    one.mkdir(), two.mkdir()
    stages = "stages=[train_cam,make_cams,eval_cams]"
    _train(one, *BASE, stages, "trainer=ddp_cpu")
    run_nodes(two, stages, base=BASE)
    a = torch.load(round_dir(one) / "train_cam/cam_net.pt", map_location="cpu")
    b = torch.load(round_dir(two) / "train_cam/cam_net.pt", map_location="cpu")
    a, b = (x.get("state_dict", x) for x in (a, b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert results(two)["cam_miou"] == results(one)["cam_miou"]
    steps = json.loads((round_dir(two) / "train_cam/DONE.json").read_text())["metrics"]
    print(
        "multi-node training figures:",
        json.dumps(
            {
                "tensors_equal": len(a),
                "cam_miou": [results(one)["cam_miou"], results(two)["cam_miou"]],
                "optimizer_steps": steps.get("optimizer_steps"),
            }
        ),
    )


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"RANK": "3", "LOCAL_RANK": "1"}, 3),  # torchrun
        ({"LOCAL_RANK": "1"}, 1),  # a child of Lightning's launcher
        ({"NODE_RANK": "1"}, 1),  # the process started on node 1
        ({"NODE_RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, 3),
        ({"SLURM_NTASKS": "8", "SLURM_PROCID": "5"}, 5),  # srun, one task per rank
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "LOCAL_RANK": "1"}, 1),  # sbatch, no srun
    ],
)
def test_the_rank_before_the_process_group_exists(monkeypatch, env, rank):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key in ("SLURM_NTASKS", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert global_rank() == rank
