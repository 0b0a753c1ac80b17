"""Per-stage loggers: names, W&B grouping and offline mode, metric and figure logging."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.train import train
from src.utils.loggers import build_loggers, finish_loggers, log_figure, log_metrics
from tests.conftest import TINY, compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


def test_wandb_runs_offline_grouped_by_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(["logger=wandb"], tmp_path)
    stage_dir = tmp_path / "round_1" / "eval_cams"
    loggers = build_loggers(cfg, 1, "eval_cams", stage_dir)
    (wb,) = loggers
    assert wb._offline
    run = wb.experiment
    assert (run.name, run.group, run.job_type) == ("r1_eval_cams", cfg.experiment_name, "eval_cams")
    log_metrics(loggers, {"cam": {"miou": 0.5}})
    figure = tmp_path / "f.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(figure)
    log_figure(loggers, "cam/overlays", figure)
    finish_loggers(loggers)
    offline_runs = list(Path(stage_dir / "logs").rglob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))


def test_csv_logger_writes_into_the_stage_folder(tmp_path):
    cfg = compose_cfg(["logger=csv"], tmp_path)
    loggers = build_loggers(cfg, 0, "eval_cams", tmp_path / "stage")
    log_metrics(loggers, {"cam": {"miou": 0.25}, "note": "text is skipped"})
    finish_loggers(loggers)
    text = next((tmp_path / "stage" / "logs").rglob("metrics.csv")).read_text()
    assert "cam/miou" in text and "0.25" in text


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline `.wandb` file (LevelDB log format: a 7-byte header,
    32 KiB blocks, records split into FULL/FIRST/MIDDLE/LAST chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B data file"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too small for a header: padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:  # zero padding up to the block end
            pos += block - pos % block
            continue
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_tiny_pipeline_logs_one_offline_wandb_run_per_stage(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(["experiment=synth_cam", "logger=wandb", TINY], tmp_path)
    results = train(cfg)
    run_dir = Path(cfg.paths.run_dir)
    for stage in cfg.stages:
        (run_file,) = (run_dir / "round_0" / stage / "logs").rglob("offline-run-*/*.wandb")
        records = read_wandb_records(run_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        (run,) = [r.run for r in records if r.HasField("run")]
        assert (run.display_name, run.run_group, run.job_type) == (
            f"r0_{stage}",
            "synth_irnet_cam",
            stage,
        )
        assert kinds[-1] == "exit"  # wandb.finish() was called
        logged = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for r in records
            if r.HasField("history")
            for item in r.history.item
        }
        if stage == "eval_cams":
            assert logged["miou"] == pytest.approx(results["rounds"]["0"]["cam_miou"])
            assert logged["cam/overlays/count"] == 1  # the overlay figure
        if stage == "train_cam":
            assert "train/loss" in logged
