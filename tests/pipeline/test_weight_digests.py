"""The weight files the stages write (classifier, IRNet / PSA affinity nets, the SEC/DSRG net)
carry a content digest (src/utils/weights.py): a good file loads into its net, a flipped byte or
a damaged payload is refused with an error naming the file and the stage to redo."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch

from src.methods.irnet import AFFINITY_WEIGHTS
from src.methods.seam import PSA_WEIGHTS
from src.methods.seeded import SEEDED_WEIGHTS, build_seeded_module
from src.pipeline.stages.affinity import build_affinity_module
from src.pipeline.stages.cam import (
    WEIGHTS_FILE,
    WeightsFileError,
    build_cam_classifier,
    load_cam_classifier,
    read_weights,
)
from src.utils.errors import MissingArtifactError, UserError
from src.utils.weights import WEIGHTS_FORMAT, save_weights, tensor_digest
from tests.conftest import TINY, compose_cfg
from tests.test_untrusted_files import _flip_a_weight_byte

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

# stage -> (method, weight file, the net that stage trains)
KINDS = {
    "train_cam": ("irnet", WEIGHTS_FILE),
    "train_affinity": ("irnet", AFFINITY_WEIGHTS),
    "train_psa_affinity": ("seam", PSA_WEIGHTS),
    "train_seeded": ("sec", SEEDED_WEIGHTS),
}


def _net(stage: str, root: Path) -> torch.nn.Module:
    """The net `stage` saves, built as the stage builds it (a classifier saved in `root` first
    where the net starts from it)."""
    method, _ = KINDS[stage]
    cfg = compose_cfg([TINY, f"method={method}", "conta=off"])
    torch.manual_seed(0)
    classifier = build_cam_classifier(cfg).net
    if stage == "train_cam":
        return classifier
    save_weights(root / WEIGHTS_FILE, classifier.state_dict())
    if stage == "train_seeded":
        return build_seeded_module(cfg, root).net
    return build_affinity_module(cfg, root).net


@pytest.fixture(scope="module", params=list(KINDS))
def saved(request, tmp_path_factory) -> tuple[str, Path, torch.nn.Module]:
    stage = request.param
    root = tmp_path_factory.mktemp(stage)
    net = _net(stage, root)
    path = root / KINDS[stage][1]
    save_weights(path, net.state_dict())
    return stage, path, net


def test_a_good_weight_file_loads_into_its_net(saved, caplog):
    stage, path, net = saved
    with caplog.at_level(logging.WARNING):
        state = read_weights(path, stage)
    assert "digest" not in caplog.text  # checked, not the unchecked older format
    net.load_state_dict(state)  # strict: every tensor of the net, nothing else
    for name, tensor in net.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_a_flipped_byte_is_refused_naming_the_file_and_the_stage(saved, tmp_path):
    stage, good, _ = saved
    path = tmp_path / good.name
    path.write_bytes(good.read_bytes())
    _flip_a_weight_byte(path)
    with pytest.raises(WeightsFileError, match="does not match its digest") as err:
        read_weights(path, stage)
    message = str(err.value)
    assert str(path) in message and f"force=[{stage}]" in message and "Fix:" in message
    # a user error (exit 2, one line) that the stages' callers also know as a bad artifact
    assert isinstance(err.value, UserError) and isinstance(err.value, MissingArtifactError)


def _payload(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


DAMAGED = {
    "digest_of_other_weights": (
        lambda p: {**p, "digest": tensor_digest({"x": torch.zeros(1)})},
        "does not match its digest",
    ),
    "digest_missing": (lambda p: {k: v for k, v in p.items() if k != "digest"}, "its digest is"),
    "digest_not_text": (lambda p: {**p, "digest": 7}, "its digest is int"),
    "tensor_zeroed": (lambda p: {**p, "state_dict": _zeroed(p["state_dict"])}, "match its digest"),
    "unknown_entry": (lambda p: {**p, "hook": "os.system"}, r"unknown entries \['hook'\]"),
    "other_format": (lambda p: {**p, "format": "wsss-segmenter/1"}, "its format is"),
    "state_not_tensors": (
        lambda p: {**p, "state_dict": {"w": [1.0]}},
        r"the 'state_dict'\['w'\] is list",
    ),
    "nan_weights": (
        lambda p: _with_nan(p["state_dict"]),
        "NaN or inf",
    ),
}


def _zeroed(state: dict) -> dict:
    """One tensor zeroed, the recorded digest kept: what an edit of the weights looks like."""
    name = next(k for k, v in state.items() if v.is_floating_point())
    return {**state, name: torch.zeros_like(state[name])}


def _with_nan(state: dict) -> dict:
    name = next(k for k, v in state.items() if v.is_floating_point())
    state = {**state, name: torch.full_like(state[name], float("nan"))}
    return {"format": WEIGHTS_FORMAT, "state_dict": state, "digest": tensor_digest(state)}


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classifier")
    save_weights(root / WEIGHTS_FILE, _net("train_cam", root).state_dict())
    return root / WEIGHTS_FILE


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_classifier_file_is_refused_where_the_stages_load_it(
    case, classifier_file, tmp_path
):
    """Every kind goes through read_weights; the classifier's loader stands for them."""
    change, expected = DAMAGED[case]
    torch.save(change(_payload(classifier_file)), tmp_path / WEIGHTS_FILE)
    cfg = compose_cfg([TINY, "method=irnet", "conta=off"])
    with pytest.raises(WeightsFileError, match=expected) as err:
        load_cam_classifier(cfg, tmp_path)
    assert str(tmp_path / WEIGHTS_FILE) in str(err.value)


def test_a_folder_or_fifo_named_like_the_weights_is_refused_unopened(tmp_path):
    (tmp_path / "folder.pt").mkdir()
    with pytest.raises(WeightsFileError, match="not a regular file"):
        read_weights(tmp_path / "folder.pt", "train_cam")
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # opened, it would block for a writer
    with pytest.raises(WeightsFileError, match="not a regular file"):
        read_weights(fifo, "train_cam")


def test_an_older_flat_weight_file_loads_with_a_warning(saved, tmp_path, caplog):
    """Written before weight files carried a digest (a run finished earlier): still loads."""
    stage, good, net = saved
    torch.save(net.state_dict(), tmp_path / good.name)
    with caplog.at_level(logging.WARNING, logger="src.utils.weights"):
        state = read_weights(tmp_path / good.name, stage)
    assert "carries no content digest" in caplog.text
    net.load_state_dict(state)
