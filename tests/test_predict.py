"""`predict.py` / `src.predict.predict`: masks and overlays for an image or a folder from a tiny
DeepLabV2 checkpoint, per-image failures, clear errors for bad checkpoints and inputs, the CLI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from src.datamodules.palette import read_label_png
from src.models.deeplab import CheckpointError, DeepLabV2, save_segmenter
from src.predict import PredictError, list_images, plan_outputs, predict
from tests.conftest import predict_cli

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO_ROOT / "conf")
NUM_CLASSES = 3
BACKBONE = {
    "_target_": "src.models.backbone.ResNetBackbone",
    "arch": "resnet_tiny",
    "weights": None,
    "weights_path": None,
    "strides": [2, 2, 1, 1],
    "dilations": [1, 1, 2, 4],
    "norm": "train",
    "frozen_stages": 0,
}
# name -> (H, W, PIL mode); the grayscale one checks the RGB conversion.
VALID = {"a.png": (40, 56, "RGB"), "b.JPG": (33, 47, "RGB"), "c.jpeg": (24, 30, "L")}


def compose_predict(overrides: list[str], hydra_cfg: bool = False) -> DictConfig:
    """Compose conf/predict.yaml as `python predict.py <overrides>` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONF_DIR):
        cfg = compose("predict", overrides=overrides, return_hydra_config=hydra_cfg)
    GlobalHydra.instance().clear()
    return cfg


def run_cfg(checkpoint: Path, input_path: Path, output: Path, *extra: str) -> DictConfig:
    return compose_predict(
        [f"checkpoint={checkpoint}", f"input={input_path}", f"output={output}", "device=cpu"]
        + list(extra)
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = DeepLabV2(instantiate(BACKBONE), NUM_CLASSES, [1, 2])
    spec = {
        "backbone": BACKBONE,
        "num_classes": NUM_CLASSES,
        "class_names": ["background", "cat", "dog"],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "scales": [1.0, 0.5],
        "rates": [1, 2],
    }
    path = tmp_path_factory.mktemp("ckpt") / "segmenter.pt"
    save_segmenter(path, net, spec)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w, mode) in VALID.items():
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).convert(mode).save(folder / name)
    (folder / "bad.jpg").write_bytes(b"\x00garbage, not a JPEG" * 8)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "nested" / "d.png")
    return folder


def test_folder_masks_overlays_and_failures(checkpoint, image_dir, tmp_path):
    out = tmp_path / "out"
    result = predict(run_cfg(checkpoint, image_dir, out))

    assert (result["images"], result["written"], result["failed"]) == (4, 3, 1)
    assert [Path(f["path"]).name for f in result["failures"]] == ["bad.jpg"]
    assert "bad.jpg" in result["failures"][0]["error"]
    for name, (h, w, _) in VALID.items():
        stem = Path(name).stem
        mask = read_label_png(out / f"{stem}.png")
        assert mask.shape == (h, w)
        assert mask.max() < NUM_CLASSES
        with Image.open(out / f"{stem}.png") as img:
            assert img.mode == "P"
        with Image.open(out / f"{stem}_overlay.png") as img:
            assert img.width == 2 * w and img.height >= h
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        f"{Path(n).stem}{s}.png" for n in VALID for s in ("", "_overlay")
    )  # nothing for bad.jpg / notes.txt / nested/, no temp files
    assert sorted(Path(p).name for p in result["masks"]) == ["a.png", "b.png", "c.png"]


def test_single_image_without_overlay(checkpoint, image_dir, tmp_path):
    out = tmp_path / "deep" / "out"
    result = predict(run_cfg(checkpoint, image_dir / "b.JPG", out, "overlay=false"))
    assert (result["images"], result["written"], result["failed"]) == (1, 1, 0)
    assert [p.name for p in out.iterdir()] == ["b.png"]
    assert read_label_png(out / "b.png").shape == VALID["b.JPG"][:2]


@pytest.mark.parametrize("kind", ["missing", "not_segmenter", "garbage"])
def test_bad_checkpoint_fails_before_any_image(kind, image_dir, tmp_path):
    ckpt = tmp_path / "segmenter.pt"
    if kind == "not_segmenter":
        torch.save({"a": 1}, ckpt)
    elif kind == "garbage":
        ckpt.write_bytes(b"not a torch file")
    expected = {
        "missing": "not found",
        "not_segmenter": "not a segmenter checkpoint",
        "garbage": "not a readable torch checkpoint",
    }[kind]
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=expected) as err:
        predict(run_cfg(ckpt, image_dir, out))
    assert str(ckpt) in str(err.value)
    assert not out.exists()


def test_missing_input_and_empty_folder(checkpoint, tmp_path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(PredictError, match="does not exist") as err:
        predict(run_cfg(checkpoint, missing, tmp_path / "out"))
    assert str(missing) in str(err.value)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(PredictError, match="holds no image") as err:
        predict(run_cfg(checkpoint, empty, tmp_path / "out"))
    assert str(empty) in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unset_keys_and_unavailable_device(checkpoint, image_dir, tmp_path):
    with pytest.raises(PredictError, match="output not set. Usage: python predict.py"):
        predict(compose_predict([f"checkpoint={checkpoint}", f"input={image_dir}"]))
    if not torch.cuda.is_available():
        with pytest.raises(PredictError, match="CUDA is not available"):
            predict(run_cfg(checkpoint, image_dir, tmp_path / "out", "device=cuda"))


def test_crf_refinement(checkpoint, image_dir, tmp_path):
    pytest.importorskip("pydensecrf")
    out = tmp_path / "out"
    result = predict(run_cfg(checkpoint, image_dir / "a.png", out, "crf=true"))
    assert result["written"] == 1
    mask = read_label_png(out / "a.png")
    assert mask.shape == VALID["a.png"][:2] and mask.max() < NUM_CLASSES


def test_output_plan_never_overwrites(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("x.jpg", "x.png", "y.webp", "z.PNG"):
        (folder / name).write_bytes(b"")  # planning only looks at names
    images = list_images(folder)
    assert [p.name for p in images] == ["x.jpg", "x.png", "y.webp", "z.PNG"]
    # Equal stems get the extension; masks next to the inputs would replace x.png.
    assert plan_outputs(images, tmp_path / "out") == ["x_jpg", "x_png", "y", "z"]
    with pytest.raises(PredictError, match="would overwrite the input image"):
        plan_outputs(list_images(folder / "x.png"), folder)
    (folder / "y_overlay.png").write_bytes(b"")
    with pytest.raises(PredictError, match="would overwrite"):
        plan_outputs(list_images(folder), tmp_path / "out")


def test_config_has_no_timestamped_run_dir(tmp_path):
    cfg = compose_predict(["checkpoint=c.pt", "input=i", f"output={tmp_path}"], hydra_cfg=True)
    assert cfg.hydra.run.dir == str(tmp_path)
    assert cfg.hydra.output_subdir is None
    assert (cfg.device, cfg.crf, cfg.overlay) == ("auto", False, True)


def test_cli_shim_exits_2_on_bad_checkpoint(image_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("predict_cli", REPO_ROOT / "predict.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    cfg = run_cfg(tmp_path / "missing.pt", image_dir, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        cli.main.__wrapped__(cfg)
    assert exit_info.value.code == 2


def test_cli_exits_1_and_prints_summary(checkpoint, image_dir, tmp_path):
    out = tmp_path / "cli_out"
    proc = predict_cli(
        f"checkpoint={checkpoint}", f"input={image_dir}", f"output={out}", "overlay=false"
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    assert "4 images, 3 written, 1 failed" in log
    assert str(image_dir / "bad.jpg") in log
    # Hydra made no timestamped folder and no .hydra/ record: masks plus the job log only.
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png", "c.png", "predict.log"]
