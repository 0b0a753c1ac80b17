"""Per-stage loggers: names, W&B grouping and offline mode, metric and figure logging."""

from pathlib import Path

import numpy as np
from PIL import Image

from src.pipeline.runtime import build_loggers, finish_loggers, log_figure, log_metrics
from tests.conftest import compose_cfg


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
