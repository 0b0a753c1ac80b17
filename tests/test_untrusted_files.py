"""Files the project reads back are untrusted: crafted or damaged segmenter checkpoints, weight
files, confounder and CAM archives are refused with an error naming the file and the fix, and
nothing in them is ever instantiated."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from src.models.backbone import ResNetBackbone, WeightsUnavailableError
from src.models.context import CONFOUNDERS_FILE, ConfounderError, Confounders, build_confounders
from src.models.deeplab import (
    BACKBONES,
    SEGMENTER_FORMAT,
    CheckpointError,
    build_deeplab,
    load_segmenter,
    save_segmenter,
)
from src.pipeline.artifacts import StageDir
from src.pipeline.stages.cam import WEIGHTS_FILE, load_cam, load_classifier_backbone
from src.utils.errors import MissingArtifactError
from src.utils.untrusted import Source, UntrustedFileError, read_npz
from tests.conftest import predict_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGET = "src.models.backbone.ResNetBackbone"
SPEC = {
    "backbone": {
        "_target_": TARGET,
        "arch": "resnet_tiny",
        "weights": None,
        "weights_path": None,
        "strides": [2, 2, 1, 1],
        "dilations": [1, 1, 2, 4],
        "norm": "train",
        "frozen_stages": 0,
    },
    "num_classes": 3,
    "class_names": ["background", "cat", "dog"],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "scales": [1.0, 0.5],
    "rates": [1, 2],
}


@pytest.fixture(scope="module")
def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_deeplab(SPEC).state_dict()


def write_checkpoint(path: Path, spec, state, **extra) -> Path:
    """Bypasses save_segmenter (which refuses bad specs) the way an attacker would."""
    torch.save({"format": SEGMENTER_FORMAT, "spec": spec, "state_dict": state, **extra}, path)
    return path


def test_crafted_checkpoint_runs_nothing_through_the_cli(state_dict, tmp_path):
    victim = tmp_path / "created_by_checkpoint.txt"
    spec = copy.deepcopy(SPEC)
    spec["backbone"]["norm"] = {"_target_": "builtins.open", "_args_": [str(victim), "w"]}
    ckpt = write_checkpoint(tmp_path / "segmenter.pt", spec, state_dict)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(image)
    out = tmp_path / "out"
    proc = predict_cli(f"checkpoint={ckpt}", f"input={image}", f"output={out}")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 2, log
    assert str(ckpt) in log and "'norm'" in log and "'_target_'" in log and "Fix:" in log
    assert not victim.exists()
    assert not (out / "a.png").exists()


def _set(path: tuple, value):
    def change(spec: dict) -> dict:
        node = spec
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return spec

    return change


def _drop(key: str):
    def change(spec: dict) -> dict:
        del spec[key]
        return spec

    return change


# (change to a valid spec, text the error must contain)
BAD_SPECS = {
    "target_os_system": (_set(("backbone", "_target_"), "os.system"), "'os.system'"),
    "target_builtins_open": (_set(("backbone", "_target_"), "builtins.open"), "'builtins.open'"),
    "target_missing": (lambda s: {**s, "backbone": {"arch": "resnet_tiny"}}, "'_target_'"),
    "target_unhashable": (_set(("backbone", "_target_"), [TARGET]), "'_target_'"),
    "backbone_args": (_set(("backbone", "_args_"), ["x"]), "unknown key '_args_'"),
    "backbone_unknown_key": (_set(("backbone", "zero_init"), True), "unknown key 'zero_init'"),
    "nested_target_in_arch": (
        _set(("backbone", "arch"), {"_target_": "os.system", "_args_": ["true"]}),
        "['arch'] is an object spec with a '_target_'",
    ),
    "nested_target_in_list": (
        _set(("backbone", "strides"), [{"_target_": "os.getcwd"}, 2, 1, 1]),
        "['strides']",
    ),
    "backbone_bad_arch": (_set(("backbone", "arch"), "vgg16"), "does not build a backbone"),
    "backbone_zero_stride": (_set(("backbone", "strides"), [2, 0, 1, 1]), "['strides']"),
    "backbone_not_dict": (_set(("backbone",), "resnet_tiny"), "spec['backbone']"),
    "num_classes_str": (_set(("num_classes",), "3"), "spec['num_classes']"),
    "num_classes_bool": (_set(("num_classes",), True), "spec['num_classes']"),
    "num_classes_huge": (_set(("num_classes",), 10**9), "spec['num_classes']"),
    "rates_float": (_set(("rates",), [1.5, 2]), "spec['rates']"),
    "rates_empty": (_set(("rates",), []), "spec['rates']"),
    "class_names_count": (_set(("class_names",), ["bg"]), "spec['class_names']"),
    "class_names_not_str": (_set(("class_names",), ["bg", 1, None]), "spec['class_names']"),
    "mean_two": (_set(("mean",), [0.5, 0.5]), "spec['mean']"),
    "std_zero": (_set(("std",), [0.2, 0.0, 0.2]), "spec['std']"),
    "scales_nan": (_set(("scales",), [float("nan")]), "spec['scales']"),
    "scales_tensor": (_set(("scales",), torch.ones(2)), "spec['scales']"),
    "scales_huge": (_set(("scales",), [1.0, 1e6]), "spec['scales']"),  # a 49 PB allocation
    "scales_many": (_set(("scales",), [1.0] * 17), "spec['scales']"),
    "rates_huge": (_set(("rates",), [6, 10**6]), "spec['rates']"),
    "backbone_stride_three": (_set(("backbone", "strides"), [2, 3, 1, 1]), "['strides']"),
    "backbone_huge_dilation": (_set(("backbone", "dilations"), [1, 1, 2, 10**6]), "['dilations']"),
    "spec_unknown_key": (_set(("extra",), 1), "unknown key 'extra'"),
    "spec_missing_key": (_drop("rates"), "lacks ['rates']"),
    "spec_not_dict": (lambda s: list(s), "spec is list"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_spec_is_refused(case, state_dict, tmp_path):
    change, expected = BAD_SPECS[case]
    ckpt = write_checkpoint(tmp_path / "segmenter.pt", change(copy.deepcopy(SPEC)), state_dict)
    with pytest.raises(CheckpointError) as err:
        load_segmenter(ckpt)
    message = str(err.value)
    assert expected in message and str(ckpt) in message and "train_segmenter" in message


BAD_STATES = {
    "str_value": lambda s: {**s, "note": "hello"},
    "nested_dict": lambda s: {**s, "more": {"w": torch.zeros(1)}},
    "int_key": lambda s: {**s, 3: torch.zeros(1)},
    "list_not_dict": lambda s: list(s.values()),
}


@pytest.mark.parametrize("case", list(BAD_STATES))
def test_bad_state_dict_is_refused(case, state_dict, tmp_path):
    ckpt = write_checkpoint(tmp_path / "s.pt", SPEC, BAD_STATES[case](dict(state_dict)))
    with pytest.raises(CheckpointError, match="state_dict") as err:
        load_segmenter(ckpt)
    assert str(ckpt) in str(err.value)


def test_unknown_payload_entry_is_refused(state_dict, tmp_path):
    ckpt = write_checkpoint(tmp_path / "s.pt", SPEC, state_dict, hook="os.system")
    with pytest.raises(CheckpointError, match="unknown entries \\['hook'\\]"):
        load_segmenter(ckpt)


def _flip_a_weight_byte(path: Path) -> None:
    """Flip one bit in the middle of the largest tensor record of a torch.save zip (stored
    uncompressed), the way a bad disk or copy would: the archive itself stays readable."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack(
        "<HH", data[info.header_offset + 26 : info.header_offset + 30]
    )
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_saved_checkpoint_is_refused(tmp_path):
    net = build_deeplab(SPEC).eval()
    save_segmenter(tmp_path / "s.pt", net, SPEC)
    _flip_a_weight_byte(tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="does not match its digest") as err:
        load_segmenter(tmp_path / "s.pt")
    assert str(tmp_path / "s.pt") in str(err.value) and "Fix:" in str(err.value)


def test_nan_weights_are_refused(state_dict, tmp_path):
    state = dict(state_dict)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    ckpt = write_checkpoint(tmp_path / "s.pt", SPEC, state)
    with pytest.raises(CheckpointError, match=f"{re.escape(name)}.*NaN"):
        load_segmenter(ckpt)


def test_a_folder_or_fifo_is_not_reported_as_missing(tmp_path):
    folder = tmp_path / "segmenter.pt"
    folder.mkdir()
    with pytest.raises(CheckpointError, match="segmenter.pt is a folder"):
        load_segmenter(folder)
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)  # opened, it would block for a writer
    with pytest.raises(CheckpointError, match="fifo.pt is not a regular file"):
        load_segmenter(fifo)
    with pytest.raises(CheckpointError, match="not found"):
        load_segmenter(tmp_path / "missing.pt")


def test_legit_checkpoint_round_trip_and_save_refuses_bad_specs(tmp_path):
    net = build_deeplab(SPEC).eval()
    save_segmenter(tmp_path / "s.pt", net, SPEC)
    loaded, spec = load_segmenter(tmp_path / "s.pt")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    assert spec == SPEC
    bad = {**SPEC, "backbone": {**SPEC["backbone"], "_target_": "os.system"}}
    with pytest.raises(ValueError, match="'os.system'"):
        save_segmenter(tmp_path / "bad.pt", net, bad)
    assert not (tmp_path / "bad.pt").exists()


def test_backbone_allow_list_matches_signature_and_configs():
    cls, schema = BACKBONES[TARGET]
    assert cls is ResNetBackbone
    assert set(schema) == set(inspect.signature(ResNetBackbone).parameters)
    for name in ("resnet50", "resnet_tiny"):
        cfg = OmegaConf.to_container(OmegaConf.load(REPO_ROOT / f"conf/backbone/{name}.yaml"))
        assert cfg.pop("_target_") in BACKBONES and set(cfg) <= set(schema)


# ------------------------------------------------------------------------ other weight files
def test_classifier_weights_with_a_non_tensor_are_refused(tmp_path):
    backbone = ResNetBackbone(arch="resnet_tiny", norm="train", frozen_stages=0)
    state = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    torch.save({**state, "note": "not a tensor"}, tmp_path / WEIGHTS_FILE)
    with pytest.raises(MissingArtifactError, match="'note'.*Fix: delete it and re-run") as err:
        load_classifier_backbone(backbone, tmp_path, "segmenter.backbone_init")
    assert str(tmp_path / WEIGHTS_FILE) in str(err.value)


def test_imagenet_weights_path_with_a_non_tensor_is_refused(tmp_path):
    path = tmp_path / "r.pth"
    torch.save({"state_dict": {"conv1.weight": [1.0, 2.0]}}, path)
    with pytest.raises(WeightsUnavailableError, match="'conv1.weight'.*weights_path"):
        ResNetBackbone(arch="resnet_tiny", weights_path=str(path))


# ------------------------------------------------------------------------ npz and json files
def _confounders_file(tmp_path: Path) -> tuple[Path, dict, dict]:
    preds = {"a": np.array([[1, 0], [0, 0]], np.uint8), "b": np.array([[0, 2], [2, 2]], np.uint8)}
    labels = {"a": np.array([1, 0]), "b": np.array([0, 1])}
    build_confounders(
        preds, labels, num_classes=2, size=(2, 2), class_names=["cat", "dog"], dataset="synth"
    ).save(tmp_path)
    path = tmp_path / CONFOUNDERS_FILE
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    return path, arrays, json.loads(str(arrays["meta"]))


BAD_CONFOUNDERS = {
    "meta_unknown_key": (lambda a, m: {**m, "_target_": "os.system"}, "unknown key '_target_'"),
    "meta_wrong_type": (lambda a, m: {**m, "mask_scale": "1.0"}, "meta['mask_scale']"),
    "meta_nested_object": (
        lambda a, m: {**m, "dataset": {"_target_": "os.system"}},
        "meta['dataset'] is an object spec",
    ),
    "meta_bad_encoding": (lambda a, m: {**m, "encoding": "builtins.open"}, "meta['encoding']"),
    "meta_not_object": (lambda a, m: [m], "meta is list"),
    "meta_not_json": (lambda a, m: "{not json", "meta is not valid JSON"),
    "object_array": (
        lambda a, m: np.array([{"x": 1}, None], dtype=object),
        "not an npz archive of plain arrays",
    ),
    "extra_array": (lambda a, m: np.zeros(2), "unknown arrays ['extra']"),
    "codes_float": (lambda a, m: a["codes"].astype(np.float32), "array 'codes' has dtype"),
}


@pytest.mark.parametrize("case", list(BAD_CONFOUNDERS))
def test_tampered_confounder_file_is_refused(case, tmp_path):
    path, arrays, meta = _confounders_file(tmp_path)
    change, expected = BAD_CONFOUNDERS[case]
    value = change(arrays, meta)
    if case == "object_array":
        arrays["ids"] = value
    elif case == "extra_array":
        arrays["extra"] = value
    elif case == "codes_float":
        arrays["codes"] = value
    else:
        arrays["meta"] = np.array(value if isinstance(value, str) else json.dumps(value))
    np.savez(path, **arrays)
    with pytest.raises(ConfounderError) as err:
        Confounders.load(tmp_path, expected_dataset="synth", expected_num_classes=2)
    message = str(err.value)
    assert expected in message and str(path) in message and "Fix: re-run" in message


def test_cam_file_with_an_object_array_or_unknown_array_is_refused(tmp_path):
    keys, cam = np.array([1, 2], np.int16), np.zeros((2, 4, 4), np.float16)
    np.savez(tmp_path / "x.npz", keys=keys, cam=cam, high_res=np.array([None], dtype=object))
    with pytest.raises(MissingArtifactError, match="x.npz.*force=\\[make_cams\\]"):
        load_cam(tmp_path, "x")
    np.savez(tmp_path / "y.npz", keys=keys, cam=cam, high_res=cam, code=np.array("os.system"))
    with pytest.raises(MissingArtifactError, match="unknown arrays \\['code'\\]"):
        load_cam(tmp_path, "y")
    np.savez(tmp_path / "z.npz", keys=keys, cam=cam, high_res=cam)
    assert set(load_cam(tmp_path, "z")) == {"keys", "cam", "high_res"}


def test_read_npz_refuses_a_bare_npy_and_names_the_file(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(UntrustedFileError, match="a.npy: unreadable.*Fix: redo it"):
        read_npz(Source(tmp_path / "a.npy", "redo it"), {"x": "f"})


def test_damaged_done_marker_means_not_done(tmp_path):
    sdir = StageDir(tmp_path, 0, "train_cam")
    sdir.path.mkdir(parents=True)
    for text in ("{not json", "[1, 2]", "[" * 100_000, "\udcff"):
        sdir.done_file.write_text(text, errors="surrogateescape")  # the last: not UTF-8
        assert sdir.read_done() is None and not sdir.is_done("abc")
