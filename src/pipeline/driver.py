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

from src.datamodules import prepare_data
from src.evaluation.report import (
    attach_upper_bound,
    load_results,
    print_results,
    round_curves,
    update_results,
    write_markdown,
)
from src.pipeline.artifacts import RUNNING_FILE, StageDir
from src.pipeline.batching import check_global_batches
from src.pipeline.checks import check_before_work
from src.pipeline.fingerprint import data_fingerprints, file_digest
from src.pipeline.hashing import picked_config, plan_digests, stage_keys, stage_seed
from src.pipeline.plan import PipelineError, Plan, build_plan
from src.pipeline.registry import ROLES, STAGES
from src.pipeline.resources import stage_resources
from src.pipeline.reuse import (
    StageRecord,
    finish_rescore,
    pending_rescore,
    remove_killed_copies,
    reuse_stage,
)
from src.pipeline.run_recipe import check_run_recipe, record_run_recipe
from src.pipeline.sharding import prepare_shards
from src.pipeline.stage import Stage, StageContext
from src.pipeline.stages.context import validate_conta
from src.pipeline.trainers import configured_world_size, ranks_started_outside, start_ranks
from src.utils.io import atomic_write_json, atomic_write_text
from src.utils.loggers import build_loggers, finish_loggers, log_metrics
from src.utils.ranks import barrier, is_global_zero, run_on_rank_zero
from src.utils.untrusted import read_json_object

log = logging.getLogger(__name__)
FINGERPRINTS_FILE = "data_fingerprints.json"


def check_stages(cfg: DictConfig) -> Plan:
    """The run's plan (cfg.stages with every role resolved), or a PipelineError saying why not."""
    validate_conta(cfg)
    plan = build_plan(list(cfg.stages), STAGES, cfg.round, ROLES)
    # The classifier is an optional input of train_segmenter; backbone_init=cam needs it.
    segmenter_init = OmegaConf.select(cfg, "segmenter.backbone_init")
    roles = plan.producers
    if "segmenter" in roles and segmenter_init == "cam" and "classifier" not in roles:
        raise PipelineError(
            "segmenter.backbone_init=cam starts the segmenter from this round's classifier, but "
            f"no stage of `stages` ({plan.names}) produces it. Fix: add the method's classifier "
            "stage (train_cam) before train_segmenter, or set segmenter.backbone_init=pretrained."
        )
    return plan


def run_pipeline(cfg: DictConfig) -> dict:
    """Run (or resume) rounds 0..cfg.round; returns the results dict written to results.json."""
    run_dir = Path(cfg.paths.run_dir).resolve()
    if ranks_started_outside(cfg):  # several nodes, torchrun, srun: every rank is here already
        start_ranks(cfg)
    plan = check_stages(cfg)
    if cfg.round < 0:
        raise PipelineError(f"round={cfg.round} must be >= 0")
    check_before_work(cfg)
    check_global_batches(cfg, plan, configured_world_size(cfg))
    check_run_recipe(cfg, run_dir)  # a folder made by another recipe is refused, on every rank

    def start_run() -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        record_run_recipe(cfg, run_dir)
        # Temp file + rename: a config.yaml that is a link (or a hard-linked copy of another
        # run's) is replaced, never written through.
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        # Whatever reuse_from says now: a copy killed by an earlier run is never kept.
        remove_killed_copies(run_dir)

    run_on_rank_zero(start_run, "writing the run's config")
    fingerprints = _data_fingerprints(cfg, run_dir)
    weights_digest = _weights_digest(cfg)
    digests = plan_digests(cfg, plan, fingerprints, weights_digest)
    redone: set[tuple[int, str]] = set()
    for round_idx in range(cfg.round + 1):
        for stage in plan:
            reason = _redo_reason(cfg, plan, stage, round_idx, redone)
            picked = picked_config(cfg, stage_keys(stage, round_idx), fingerprints, weights_digest)
            key = (round_idx, stage.name)
            ran = _run_stage(cfg, run_dir, round_idx, plan, stage, digests[key], picked, reason)
            if ran and reason is not None:
                redone.add(key)
    barrier()  # every rank has left its last stage

    def report() -> None:
        if cfg.get("upper_bound"):
            bound_dir = Path(cfg.paths.output_dir) / cfg.upper_bound / f"seed_{cfg.seed}"
            attach_upper_bound(run_dir, bound_dir, cfg.upper_bound)
        results = load_results(run_dir)
        if len(results["rounds"]) > 1:
            round_curves(results, run_dir / "rounds.png")
        write_markdown(run_dir)
        print_results(results)

    run_on_rank_zero(report, "the results table")
    return load_results(run_dir)


def run_identity(cfg: DictConfig) -> dict:
    """The run's point of the data x method x conta axes, written into results.json. A run of
    part of a method (synth_cam) or of none (the supervised bound) names no method, so report.py
    never takes it for the method's row."""
    method_stages = set(OmegaConf.select(cfg, "method.stages", default=None) or ["?"])
    conta = bool(OmegaConf.select(cfg, "conta.enabled", default=cfg.round > 0))
    return {
        "data": cfg.data.name,
        "method": cfg.method.name if method_stages <= set(cfg.stages) else None,
        "conta": conta,
        # The context module of the CONTA rounds (paper: Eq. 3; calibrated: this project's).
        "context": OmegaConf.select(cfg, "conta.context") if conta else None,
    }


def _data_fingerprints(cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """Content fingerprints of the configured splits: rank 0 reads the files, every rank reads
    its result, so all ranks hash alike."""
    path = run_dir / FINGERPRINTS_FILE

    def digest_splits() -> None:
        prepare_data(cfg.data)  # a generated set must exist before its files are digested
        names = {cfg.data.get(k) for k in ("train_split", "eval_split", "val_split")}
        configured = set(cfg.data.get("splits") or {})
        atomic_write_json(path, data_fingerprints(cfg.data, sorted(names & configured)))

    run_on_rank_zero(digest_splits, "fingerprinting the data")
    return json.loads(path.read_text())


def _weights_digest(cfg: DictConfig):
    cache_dir = cfg.data.get("cache_dir")
    return lambda path: file_digest(path, cache_dir)


def _redo_reason(
    cfg: DictConfig, plan: Plan, stage: Stage, round_idx: int, redone: set[tuple[int, str]]
) -> str | None:
    """Why a stage must run even if its DONE.json matches: it is forced, or a stage it reads was
    just redone by force (forced work need not reproduce bit for bit, e.g. on a GPU, so
    everything downstream of it is redone too). A stage redone because its DONE.json was missing
    (an interrupted first attempt) has no finished readers to redo."""
    if stage.name in cfg.force:
        return "forced"
    inputs = [(round_idx, name) for name in plan.inputs(stage).values()]
    if round_idx > 0:
        inputs += [(round_idx - 1, name) for name in plan.previous(stage).values()]
    rerun = [f"round {r} {name}" for r, name in inputs if (r, name) in redone]
    return f"its input was redone ({', '.join(rerun)})" if rerun else None


def _run_stage(
    cfg: DictConfig,
    run_dir: Path,
    round_idx: int,
    plan: Plan,
    stage: Stage,
    digest: str,
    picked: dict,
    reason: str | None,
) -> bool:
    """Run `stage` unless its DONE.json matches `digest` (and no `reason` says otherwise);
    returns whether it ran."""
    sdir = StageDir(run_dir, round_idx, stage.name)
    barrier()  # every rank decides skip-or-run on the same state of the disk
    if reason is None and sdir.is_done(digest):
        log.info("round %d: %s already done (%s), skipping", round_idx, stage.name, digest)
        return False
    if reason is None and cfg.get("reuse_from") and stage.reuse:
        run_on_rank_zero(lambda: _reuse(cfg, sdir, digest, stage), f"reusing {sdir.path}")
        if sdir.is_done(digest):
            return False
        if stage.rescore is not None and pending_rescore(sdir, digest) is not None:
            _rescore(cfg, run_dir, plan, stage, sdir, digest)
            return False
    if reason is None:
        _explain_redo(sdir, picked)
    else:
        log.info("round %d: redoing %s: %s", round_idx, stage.name, reason)
    barrier()
    run_on_rank_zero(lambda: _prepare_stage_dir(sdir, digest), f"preparing {sdir.path}")
    ctx = _stage_context(cfg, run_dir, round_idx, plan, stage)
    log.info("round %d: running %s (hash %s, seed %d)", round_idx, stage.name, digest, ctx.seed)
    start = time.perf_counter()

    def execute():
        ctx.loggers = (
            build_loggers(cfg, round_idx, stage.name, sdir.path) if is_global_zero() else []
        )
        status = "failed"
        try:
            result = stage.run(ctx)
            log_metrics(ctx.loggers, result.metrics)  # before finishing: W&B drops later calls
            status = "success"
        finally:
            finish_loggers(ctx.loggers, status)
        return result

    def record(result, usage: dict) -> None:
        seconds = time.perf_counter() - start
        # Stages without a results row still record their seconds.
        row = StageRecord(result.prefix or stage.name, result.results or {}, result.nested)
        _record_results(cfg, run_dir, round_idx, stage.name, row, seconds)
        sdir.mark_done(
            digest,
            metrics=result.metrics,
            seconds=seconds,
            artifacts=result.artifacts,
            config=picked,
            results=row.to_json(),
            resources=usage,
        )
        (sdir.path / RUNNING_FILE).unlink(missing_ok=True)

    # Every rank runs the stage (its trainers or its shards, src/pipeline/sharding.py, sync
    # them); rank 0 keeps the books in a settle rather than behind a bare barrier, so that when it
    # fails every rank stops at once (src.utils.ranks.ranks_settle) instead of waiting out the timeout.
    with stage_resources() as usage:
        result = execute()
    run_on_rank_zero(lambda: record(result, usage), f"round {round_idx}: {stage.name}")
    return True


def _stage_context(
    cfg: DictConfig, run_dir: Path, round_idx: int, plan: Plan, stage: Stage
) -> StageContext:
    """Every rank started, shards ready, the stage's seed set: the context its function (or its
    rescore) runs in."""
    start_ranks(cfg)
    prepare_shards()
    seed = stage_seed(cfg.seed, stage.name)
    L.seed_everything(seed, workers=True, verbose=False)
    prev_inputs = plan.previous(stage) if round_idx > 0 else {}
    return StageContext(
        cfg=cfg,
        round=round_idx,
        name=stage.name,
        dir=StageDir(run_dir, round_idx, stage.name).path,
        inputs={r: StageDir(run_dir, round_idx, n).path for r, n in plan.inputs(stage).items()},
        seed=seed,
        previous={r: StageDir(run_dir, round_idx - 1, n).path for r, n in prev_inputs.items()},
    )


def _rescore(
    cfg: DictConfig, run_dir: Path, plan: Plan, stage: Stage, sdir: StageDir, digest: str
) -> None:
    """A copied stage that records scores: recompute its record from the copied artifacts on
    every rank (Stage.rescore), then write it into results.json and the copy's DONE.json, in that
    order (a kill in between leaves a copy that is not done: it is copied or computed again)."""
    round_idx = sdir.round
    log.info("round %d: %s copied; recomputing its record from the copy", round_idx, stage.name)
    ctx = _stage_context(cfg, run_dir, round_idx, plan, stage)
    start = time.perf_counter()
    result = stage.rescore(ctx)

    def record() -> None:
        held = pending_rescore(sdir, digest)
        if held is None:
            raise PipelineError(f"{sdir.path}: the copy lost its held-back marker while rescored")
        row = StageRecord(result.prefix or stage.name, result.results or {}, result.nested)
        seconds = time.perf_counter() - start
        _record_results(cfg, run_dir, round_idx, stage.name, row, seconds)
        finish_rescore(sdir, held, row, result.metrics)

    run_on_rank_zero(record, f"round {round_idx}: {stage.name} (rescored copy)")


def _record_results(
    cfg: DictConfig, run_dir: Path, round_idx: int, stage: str, row: StageRecord, seconds: float
) -> None:
    update_results(
        run_dir,
        round_idx,
        row.prefix,
        row.values,
        seconds={stage: round(seconds, 1)},
        experiment=cfg.experiment_name,
        seed=cfg.seed,
        nested=row.nested,
        identity=run_identity(cfg),
    )


def _reuse(cfg: DictConfig, sdir: StageDir, digest: str, stage: Stage) -> None:
    """Copy the stage from a `reuse_from` run that finished it with the same hash, and add its
    results to this run's results.json (its seconds: the copy's, not the donor's compute). A
    stage with a rescore is left for _rescore, which computes its record from the copy."""
    start = time.perf_counter()
    rescore = stage.rescore is not None
    donor = reuse_stage(sdir, digest, [Path(p) for p in cfg.reuse_from], rescore=rescore)
    if donor is None or rescore:
        return
    row = StageRecord.from_done(sdir.read_done() or {})
    if row is None:  # the copied marker is the donor's, checked before copying
        raise PipelineError(f"{sdir.done_file}: the copied DONE.json lost its results record")
    _record_results(cfg, sdir.run_dir, sdir.round, sdir.stage, row, time.perf_counter() - start)
    log.info("round %d: %s reused from %s (same hash %s)", sdir.round, sdir.stage, donor, digest)


def _explain_redo(sdir: StageDir, config: dict) -> None:
    """A finished stage is about to be redone: say which settings (or inputs) changed, so a
    config edited between rounds is never mixed in silently."""
    done = sdir.read_done() if is_global_zero() else None
    if done is None:
        return
    old = done.get("config") if isinstance(done.get("config"), dict) else {}
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
    """Keep an interrupted attempt at the same config (resume); wipe anything else.

    A resumed attempt keeps every finished file but not the temporary files of writes a kill
    cut short (`.{name}.{random}.tmp` of src/utils/io.py, anywhere under this stage's folder and
    nowhere else): they never become artifacts and would pile up over repeated kills."""
    running = sdir.path / RUNNING_FILE
    same_attempt = (read_json_object(running) or {}).get("config_hash") == digest
    if same_attempt and sdir.read_done() is None:
        removed = sdir.remove_temp_files()
        log.info(
            "resuming interrupted %s (%d temporary file%s of the killed attempt removed)",
            sdir.path,
            removed,
            "" if removed == 1 else "s",
        )
        return
    sdir.reset()
    atomic_write_json(running, {"config_hash": digest})
