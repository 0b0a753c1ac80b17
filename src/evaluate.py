"""`evaluate(cfg)`: re-score a finished run's stage outputs without retraining (behind eval.py).

The run is the one `python train.py <same overrides>` wrote (run_dir from experiment and seed).
For round `round` it re-runs the evaluation stages on the saved artifacts: CAMs and pseudo-masks
on `split` (default: data.eval_split, the run's), the segmenter on `split` (default:
data.val_split; another split is predicted first with the round's trained weights) and, with
`crf=true`, its CRF refinement (the run's CRF masks are reused when they cover the split).
Results go to run_dir/eval/round_{t}_{split}/ (results.json, results.md, figures); the run's own
files are not touched.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, open_dict

from src.evaluation.report import load_results, print_results, update_results
from src.pipeline.artifacts import StageDir
from src.pipeline.plan import build_plan
from src.pipeline.registry import ROLES, STAGES
from src.pipeline.stage import StageContext
from src.utils.errors import MissingArtifactError, UserError
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)
# Evaluation stage -> the results prefix it writes.
# The run's stage hashes an evaluation folder was made from.
SOURCE_FILE = "SOURCE.json"
_SCORED = {"eval_cams": "cam", "eval_pseudo": "pseudo", "eval_segmenter": "seg"}


class EvaluationError(UserError, RuntimeError):
    """A run that cannot be re-scored as asked (no finished run, an unknown split)."""


def _finished(run_dir: Path, round_idx: int, stage: str) -> Path:
    sdir = StageDir(run_dir, round_idx, stage)
    if sdir.read_done() is None:
        raise MissingArtifactError(
            f"round {round_idx}: stage {stage} of {run_dir} has not finished ({sdir.done_file} "
            f"missing). Run `python train.py` with the same overrides (round={round_idx}) first."
        )
    return sdir.path


def _context(cfg, run_dir, round_idx, name, out_dir, inputs=None, previous=None) -> StageContext:
    plan = build_plan(list(cfg.stages), STAGES, cfg.round, ROLES)
    stage = STAGES[name]
    if inputs is None:
        inputs = {r: _finished(run_dir, round_idx, n) for r, n in plan.inputs(stage).items()}
    if previous is None and round_idx > 0:
        previous = {
            r: _finished(run_dir, round_idx - 1, n) for r, n in plan.previous(stage).items()
        }
    return StageContext(
        cfg=cfg,
        round=round_idx,
        name=name,
        dir=out_dir / name,
        inputs=inputs,
        seed=cfg.seed,
        previous=previous or {},
    )


def _link_tree(src: Path, dst: Path) -> None:
    """Reuse finished per-image files without copying their bytes (hard links)."""
    if src.is_dir() and not dst.exists():
        shutil.copytree(src, dst, copy_function=os.link)


def evaluate(cfg: DictConfig) -> dict:
    """Re-score round `cfg.round` of the run; returns {prefix: results} and prints a table."""
    cfg = copy.deepcopy(cfg)  # the split override below must not leak into the caller's config
    run_dir = Path(cfg.paths.run_dir).resolve()
    if not (run_dir / "results.json").is_file():
        raise EvaluationError(
            f"{run_dir} holds no finished run (no results.json): pass the same experiment=/seed= "
            "as the training run, or run train.py first"
        )
    round_idx = int(cfg.round)
    run_val_split, run_eval_split = cfg.data.val_split, cfg.data.eval_split
    split = cfg.get("split") or None
    # Checked before anything is created or removed: the split names a folder that
    # _tie_to_run may delete, so it must be a configured split and stay inside the run.
    out_dir = _output_dir(cfg, run_dir, round_idx, split)
    with open_dict(cfg):
        if split is not None:
            cfg.data.eval_split = split
            cfg.data.val_split = split
    _tie_to_run(out_dir, run_dir, round_idx, cfg)

    scored: dict[str, dict] = {}
    for name, prefix in _SCORED.items():
        if name not in cfg.stages:
            continue
        if name == "eval_segmenter":
            pred_dir = _segmenter_predictions(cfg, run_dir, round_idx, out_dir, run_val_split)
            ctx = _context(cfg, run_dir, round_idx, name, out_dir, {"segmentation": pred_dir})
        else:
            if split is not None and split != run_eval_split:
                log.info("%s on %s: the run scored %s", name, split, run_eval_split)
            ctx = _context(cfg, run_dir, round_idx, name, out_dir)
        ctx.dir.mkdir(parents=True, exist_ok=True)
        scored[prefix] = STAGES[name].run(ctx).results
    if cfg.crf and "eval_segmenter" in cfg.stages:
        scored["seg_crf"] = _crf_scores(cfg, run_dir, round_idx, out_dir, run_val_split)
    if not scored:
        raise EvaluationError(f"stages={list(cfg.stages)} has no evaluation stage to re-run")

    for prefix, results in scored.items():
        update_results(out_dir, round_idx, prefix, results, experiment=cfg.experiment_name)
    results = load_results(out_dir)
    print_results(results)
    _compare_with_run(run_dir, round_idx, scored, split)
    return scored


def _output_dir(cfg: DictConfig, run_dir: Path, round_idx: int, split: str | None) -> Path:
    """run_dir/eval/round_{t}_{split}, once `split` is known to be one of data.splits and the
    folder (resolved) lies inside run_dir/eval; else an EvaluationError naming the fix."""
    configured = [str(s) for s in (cfg.data.get("splits") or {})]
    if split is not None and (type(split) is not str or split not in configured):
        raise EvaluationError(
            f"split={split!r} is not a split of data={cfg.data.name}. "
            f"Fix: pass one of {configured}, or leave split out for the run's own splits"
        )
    if round_idx < 0:
        raise EvaluationError(f"round={round_idx} must be >= 0. Fix: pass the round to re-score")
    root = run_dir / "eval"
    out_dir = (root / f"round_{round_idx}_{split or 'default'}").resolve()
    if not out_dir.is_relative_to(root.resolve()) or out_dir == root.resolve():
        raise EvaluationError(
            f"the evaluation folder {out_dir} lies outside {root} (split={split!r}). "
            "Fix: pass a split name that is a plain folder name"
        )
    return out_dir


def _tie_to_run(out_dir: Path, run_dir: Path, round_idx: int, cfg: DictConfig) -> None:
    """Keep an earlier evaluation's files (predictions, CRF masks) only if they came from the
    run's current stage outputs: a retrained round makes them stale, so start over."""
    source = {
        name: (StageDir(run_dir, round_idx, name).read_done() or {}).get("config_hash")
        for name in cfg.stages
    }
    marker = out_dir / SOURCE_FILE
    if out_dir.exists():
        try:
            kept = json.loads(marker.read_text())
        except (OSError, ValueError):
            kept = None
        if kept != source:
            log.info("%s came from other stage outputs of the run: starting it over", out_dir)
            shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, source)


def _segmenter_predictions(cfg, run_dir: Path, round_idx: int, out_dir: Path, run_split: str):
    """The run's val predictions, or (another split) fresh ones from the round's weights."""
    if cfg.data.val_split == run_split:
        return _finished(run_dir, round_idx, "predict_segmenter")
    ctx = _context(cfg, run_dir, round_idx, "predict_segmenter", out_dir)
    STAGES["predict_segmenter"].run(ctx)
    return ctx.dir


def _crf_scores(cfg, run_dir: Path, round_idx: int, out_dir: Path, run_split: str) -> dict:
    pred_dir = out_dir / "predict_segmenter"
    if cfg.data.val_split == run_split:
        pred_dir = _finished(run_dir, round_idx, "predict_segmenter")
        run_crf = StageDir(run_dir, round_idx, "crf_segmenter")
        if run_crf.read_done() is not None:
            _link_tree(run_crf.path / "masks", out_dir / "crf_segmenter" / "masks")
    ctx = _context(cfg, run_dir, round_idx, "crf_segmenter", out_dir, {"segmentation": pred_dir})
    ctx.dir.mkdir(parents=True, exist_ok=True)
    return STAGES["crf_segmenter"].run(ctx).results


def _compare_with_run(run_dir: Path, round_idx: int, scored: dict, split: str | None) -> None:
    """Log the run's own numbers next to the re-evaluated ones (on the run's own splits)."""
    if split is not None:
        return
    row = load_results(run_dir)["rounds"].get(str(round_idx), {})
    for prefix, results in scored.items():
        before = row.get(f"{prefix}_miou")
        if before is not None:
            log.info(
                "%s mIoU: run %.2f, re-evaluated %.2f (difference %+.4f)",
                prefix,
                100 * before,
                100 * results["miou"],
                100 * (results["miou"] - before),
            )
