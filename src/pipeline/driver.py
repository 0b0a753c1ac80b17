"""The resumable round driver: rounds 0..cfg.round, each a sequence of stages.

A stage runs unless its DONE.json carries the same config hash (its own config subtrees chained
with its inputs' hashes), so re-running the same command resumes after a crash and a changed
setting redoes exactly the stages it affects. Under DDP every rank runs this same function;
rank-zero-only stages are fenced by barriers.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from src.evaluation.report import (
    attach_upper_bound,
    load_results,
    print_results,
    round_curves,
    update_results,
    write_markdown,
)
from src.pipeline.artifacts import StageDir
from src.pipeline.runtime import (
    barrier,
    build_loggers,
    config_hash,
    finish_loggers,
    is_global_zero,
    log_metrics,
    picked_config,
    stage_seed,
)
from src.pipeline.stage import Stage, StageContext
from src.pipeline.stages import STAGES
from src.pipeline.stages.context import validate_conta
from src.utils.io import atomic_write_json

log = logging.getLogger(__name__)
RUNNING_FILE = "RUNNING.json"


class PipelineError(RuntimeError):
    pass


def check_stages(cfg: DictConfig) -> list[Stage]:
    validate_conta(cfg)
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise PipelineError(f"stages={unknown} unknown; available: {sorted(STAGES)}")
    stages = [STAGES[s] for s in cfg.stages]
    if cfg.round > 0:
        for stage in stages:
            missing = [i for i in stage.previous_inputs if i not in cfg.stages]
            if missing:
                raise PipelineError(
                    f"round={cfg.round}: from round 1 on, {stage.name} reads the previous "
                    f"round's {missing}, which is not in `stages`. Rounds > 0 are CONTA rounds: "
                    "use a *_conta experiment (e.g. experiment=synth_conta) or round=0."
                )
    seen: set[str] = set()
    for stage in stages:
        missing = [i for i in stage.present_inputs(list(cfg.stages)) if i not in seen]
        if missing:
            raise PipelineError(
                f"stage {stage.name} needs {missing} earlier in `stages` (got {list(cfg.stages)})"
            )
        seen.add(stage.name)
    # train_cam is an optional input of train_segmenter; backbone_init=cam makes it required.
    names = list(cfg.stages)
    segmenter_init = OmegaConf.select(cfg, "segmenter.backbone_init")
    if "train_segmenter" in names and segmenter_init == "cam" and "train_cam" not in names:
        raise PipelineError(
            "segmenter.backbone_init=cam starts the segmenter from this round's classifier, but "
            f"train_cam is not in `stages` ({names}). Fix: add train_cam before train_segmenter, "
            "or set segmenter.backbone_init=pretrained."
        )
    return stages


def run_pipeline(cfg: DictConfig) -> dict:
    """Run (or resume) rounds 0..cfg.round; returns the results dict written to results.json."""
    run_dir = Path(cfg.paths.run_dir).resolve()
    stages = check_stages(cfg)
    if cfg.round < 0:
        raise PipelineError(f"round={cfg.round} must be >= 0")
    if is_global_zero():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    previous: dict[str, str] = {}
    for round_idx in range(cfg.round + 1):
        hashes: dict[str, str] = {}
        for stage in stages:
            hashes[stage.name] = _run_stage(cfg, run_dir, round_idx, stage, hashes, previous)
        previous = hashes
    barrier()
    if is_global_zero():
        if cfg.get("upper_bound"):
            bound_dir = Path(cfg.paths.output_dir) / cfg.upper_bound / f"seed_{cfg.seed}"
            attach_upper_bound(run_dir, bound_dir, cfg.upper_bound)
        results = load_results(run_dir)
        if len(results["rounds"]) > 1:
            round_curves(results, run_dir / "rounds.png")
        write_markdown(run_dir)
        print_results(results)
    barrier()
    return load_results(run_dir)


def _run_stage(
    cfg: DictConfig,
    run_dir: Path,
    round_idx: int,
    stage: Stage,
    hashes: dict[str, str],
    previous: dict[str, str],
) -> str:
    sdir = StageDir(run_dir, round_idx, stage.name)
    inputs = stage.present_inputs(list(cfg.stages))
    keys = list(stage.config_keys)
    upstream = [hashes[i] for i in inputs]
    prev_inputs = stage.previous_inputs if round_idx > 0 else ()
    if round_idx > 0:
        keys += stage.round_keys
        upstream += [f"r{round_idx - 1}:{previous[i]}" for i in prev_inputs]
    digest = config_hash(cfg, keys, upstream)
    barrier()  # every rank decides skip-or-run on the same state of the disk
    if stage.name not in cfg.force and sdir.is_done(digest):
        log.info("round %d: %s already done (%s), skipping", round_idx, stage.name, digest)
        return digest
    if stage.name not in cfg.force:
        _explain_redo(sdir, picked_config(cfg, keys))
    barrier()
    if is_global_zero():
        _prepare_stage_dir(sdir, digest)
    barrier()
    seed = stage_seed(cfg.seed, stage.name)
    L.seed_everything(seed, workers=True, verbose=False)
    ctx = StageContext(
        cfg=cfg,
        round=round_idx,
        name=stage.name,
        dir=sdir.path,
        inputs={i: StageDir(run_dir, round_idx, i).path for i in inputs},
        seed=seed,
        previous={i: StageDir(run_dir, round_idx - 1, i).path for i in prev_inputs},
    )
    log.info("round %d: running %s (hash %s, seed %d)", round_idx, stage.name, digest, seed)
    start = time.perf_counter()
    if stage.rank_zero_only and not is_global_zero():
        barrier()
        return digest
    ctx.loggers = build_loggers(cfg, round_idx, stage.name, sdir.path) if is_global_zero() else []
    status = "failed"
    try:
        result = stage.run(ctx)
        log_metrics(ctx.loggers, result.metrics)  # before finishing: W&B drops later calls
        status = "success"
    finally:
        finish_loggers(ctx.loggers, status)
    seconds = time.perf_counter() - start
    if is_global_zero():
        # Stages without a results row still record their seconds.
        update_results(
            run_dir,
            round_idx,
            result.prefix or stage.name,
            result.results or {},
            seconds={stage.name: round(seconds, 1)},
            experiment=cfg.experiment_name,
            seed=cfg.seed,
            nested=result.nested,
        )
        sdir.mark_done(
            digest,
            metrics=result.metrics,
            seconds=seconds,
            artifacts=result.artifacts,
            config=picked_config(cfg, keys),
        )
        (sdir.path / RUNNING_FILE).unlink(missing_ok=True)
    if stage.rank_zero_only:
        barrier()
    return digest


def _explain_redo(sdir: StageDir, config: dict) -> None:
    """A finished stage is about to be redone: say which settings (or inputs) changed, so a
    config edited between rounds is never mixed in silently."""
    done = sdir.read_done() if is_global_zero() else None
    if done is None:
        return
    old = done.get("config", {})
    changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
    why = f"config changed: {changed}" if changed else "an input stage was redone"
    log.warning(
        "round %d: %s was done with another configuration (%s); redoing it and every stage "
        "downstream, later rounds included. Previous results of this stage are replaced.",
        sdir.round,
        sdir.stage,
        why,
    )


def _prepare_stage_dir(sdir: StageDir, digest: str) -> None:
    """Keep an interrupted attempt at the same config (resume); wipe anything else."""
    running = sdir.path / RUNNING_FILE
    same_attempt = (
        running.is_file() and json.loads(running.read_text()).get("config_hash") == digest
    )
    if same_attempt and sdir.read_done() is None:
        log.info("resuming interrupted %s", sdir.path)
        return
    sdir.reset()
    atomic_write_json(running, {"config_hash": digest})
