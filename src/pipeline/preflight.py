"""`debug=preflight`: every stage of a recipe on a few images before the real run.

`python train.py experiment=voc_conta debug=preflight` runs rounds 0 and 1 of the recipe as it
is (networks, crop sizes, CAM scales, walk, CRFs, DeepLab's MSC) with a tiny budget, in a run
folder of its own (`outputs/preflight/...`, never the real run's):

* every split is cut to its first `preflight.images` images (`data.max_images`);
* every training stage takes `preflight.batch_size` images a step (no accumulation) for about
  `preflight.steps` optimizer steps (epoch budgets become the epochs that hold them);
* nothing is reused from other runs.

It then prints, per stage, the seconds per image (training: per image of its optimizer steps),
peak memory and bytes written per image, and projects the full run from those rates
(src/pipeline/projection.py): the recipe's rounds 0..T at the real split sizes (or
`preflight.split_sizes`), on the same trainer. Stage set-up (building the net and the trainer)
is counted in the rate, so the projection errs long; training stages' files (weights,
checkpoints) are counted once per round, not per image.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from src.datamodules import build_dataset
from src.pipeline.artifacts import StageDir
from src.pipeline.hashing import DATA_PREFIX
from src.pipeline.plan import PipelineError, Plan
from src.pipeline.projection import projected_hours
from src.pipeline.trainers import configured_world_size
from src.utils.io import atomic_write_json, atomic_write_text
from src.utils.ranks import is_global_zero
from src.utils.untrusted import read_json_object

log = logging.getLogger(__name__)

PREFLIGHT_LAST_ROUND = 1  # the baseline round and one CONTA round
# The budget key of each training group: epochs or optimizer steps.
BUDGETS = {
    "cam": "max_epochs",
    "affinity": "max_epochs",
    "segmenter": "max_steps",
    "seeded": "max_steps",
}
# Stages that score a subset of their split (segmenter.crf_images: COCO's CRF on 5,000 images).
SUBSETS = {"crf_segmenter": "segmenter.crf_images"}
REPORT_FILE = "preflight.md"


def preflight_config(cfg: DictConfig, plan: Plan) -> DictConfig:
    """The recipe at the preflight's budget; `preflight.full` keeps what the full run would use
    (its last round, each training stage's global batch and budget)."""
    pf = cfg.preflight
    images, batch, steps = int(pf.images), int(pf.batch_size), int(pf.steps)
    if min(images, batch, steps) < 1 or batch > images:
        raise PipelineError(
            f"preflight.images={images}, batch_size={batch}, steps={steps}: all must be >= 1 and "
            "batch_size <= images"
        )
    cfg = cfg.copy()
    full: dict = {"round": int(cfg.round), "training": {}}
    with open_dict(cfg):
        for stage in plan:
            if not stage.global_batch:
                continue
            batch_key, *accumulate = stage.global_batch
            group = batch_key.split(".")[0]
            budget_key = f"{group}.{BUDGETS[group]}"
            global_batch = int(OmegaConf.select(cfg, batch_key))
            for key in accumulate:
                global_batch *= int(OmegaConf.select(cfg, key))
                OmegaConf.update(cfg, key, 1)
            full["training"][stage.name] = {
                "batch": global_batch,
                "budget_key": budget_key,
                "budget": int(OmegaConf.select(cfg, budget_key)),
            }
            OmegaConf.update(cfg, batch_key, batch)
            per_epoch = max(1, images // batch)
            epochs_or_steps = math.ceil(steps / per_epoch) if "epochs" in budget_key else steps
            OmegaConf.update(cfg, budget_key, epochs_or_steps)
        cfg.data.max_images = images
        cfg.round = min(int(cfg.round), PREFLIGHT_LAST_ROUND)
        cfg.reuse_from = []
        cfg.preflight.full = full
    return cfg


def split_sizes(cfg: DictConfig) -> tuple[dict[str, dict[str, int]], set[str]]:
    """({"full": {split: images}, "preflight": {split: images}}, the preflight's image ids) of
    the splits the run reads; the full sizes are counted (after the empty-label policy) unless
    preflight.split_sizes names them."""
    names = {cfg.data.get(k) for k in ("train_split", "eval_split", "val_split")} - {None}
    given = OmegaConf.to_container(cfg.preflight.get("split_sizes") or {})
    cap = int(cfg.data.max_images)
    data = cfg.data.copy()
    with open_dict(data):
        data.max_images = None
    full, ids = {}, set()
    for split in names:
        dataset = build_dataset(data, split, validate=False)
        full[split] = int(given[split]) if split in given else len(dataset)
        ids.update(dataset.ids[:cap])
    return {"full": full, "preflight": {s: min(n, cap) for s, n in full.items()}}, ids


def _bytes(folder: Path, ids: set[str]) -> tuple[int, int]:
    """(bytes of the per-image files: those named by an image id; bytes of the rest: figures,
    logs, weights, markers, written once a round)."""
    per_image = rest = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        if path.is_file() and not path.is_symlink():
            if path.name.split(".")[0] in ids:
                per_image += path.stat().st_size
            else:
                rest += path.stat().st_size
    return per_image, rest


def _units(cfg: DictConfig, stage, sizes: dict[str, int]) -> int:
    """Images a round of `stage` reads, from the splits its hash names."""
    splits = {
        cfg.data[k[len(DATA_PREFIX) :]] for k in stage.config_keys if k.startswith(DATA_PREFIX)
    }
    n = sum(sizes[s] for s in splits)
    subset = OmegaConf.select(cfg, SUBSETS[stage.name]) if stage.name in SUBSETS else None
    return min(n, int(subset)) if subset is not None else n


def preflight_report(cfg: DictConfig, plan: Plan) -> dict:
    """Per-stage rates of the finished preflight and the full run they project to; written to
    the run folder (preflight.json, preflight.md) and returned."""
    run_dir = Path(cfg.paths.run_dir)
    sizes, ids = split_sizes(cfg)
    full = OmegaConf.to_container(cfg.preflight.full)
    rows, rate, units_full, fixed_bytes, bytes_per_unit = [], {}, {}, {}, {}
    for round_idx in range(int(cfg.round) + 1):
        for stage in plan:
            sdir = StageDir(run_dir, round_idx, stage.name)
            done = read_json_object(sdir.done_file) or {}
            res = done.get("resources") if isinstance(done.get("resources"), dict) else {}
            metrics = done.get("metrics") if isinstance(done.get("metrics"), dict) else {}
            seconds = float(done.get("seconds") or 0.0)
            train = full["training"].get(stage.name)
            if train is not None:  # images = its optimizer steps x its global batch
                n = int(metrics.get("optimizer_steps", 0)) * int(
                    metrics.get("global_batch_size", 0)
                )
                per_epoch = sizes["full"][cfg.data.train_split] // train["batch"]
                steps = train["budget"] * (per_epoch if "epochs" in train["budget_key"] else 1)
                units_full[stage.name] = steps * train["batch"]
            else:
                n = _units(cfg, stage, sizes["preflight"])
                units_full[stage.name] = _units(cfg, stage, sizes["full"])
            per_image, fixed_bytes[stage.name] = _bytes(sdir.path, ids)
            bytes_per_unit[stage.name] = per_image / max(1, n)
            rate[round_idx, stage.name] = seconds / max(1, n)
            rows.append(
                {
                    "round": round_idx,
                    "stage": stage.name,
                    "images": n,
                    "seconds": seconds,
                    "seconds_per_image": rate[round_idx, stage.name],
                    "peak_rss_mb": res.get("peak_rss_mb"),
                    "children_peak_rss_mb": res.get("children_peak_rss_mb"),
                    "gpu_peak_mb": res.get("gpu_peak_mb"),
                    "bytes_per_image": bytes_per_unit[stage.name],
                    "other_bytes": fixed_bytes[stage.name],
                }
            )
    rounds = int(full["round"]) + 1
    last = int(cfg.round)

    def seconds_per_image(round_idx: int, stage: str) -> float:
        return rate[min(round_idx, last), stage]

    # The ranks share every stage's images (trainers and sharded CPU stages alike).
    hours = projected_hours(units_full, seconds_per_image, rounds, configured_world_size(cfg))
    disk = {
        s: rounds * (fixed_bytes.get(s, 0) + bytes_per_unit.get(s, 0) * units_full[s])
        for s in hours
    }
    report = {
        "experiment": cfg.experiment_name,
        "split_sizes": sizes,
        "stages": rows,
        "projection": {
            "rounds": rounds,
            "processes": configured_world_size(cfg),
            "hours": hours,
            "disk_gb": {s: b / 1e9 for s, b in disk.items()},
            "total_hours": sum(hours.values()),
            "total_disk_gb": sum(disk.values()) / 1e9,
        },
    }
    atomic_write_json(run_dir / "preflight.json", report)
    atomic_write_text(run_dir / REPORT_FILE, render(report))
    return report


def _mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def render(report: dict) -> str:
    sizes, proj = report["split_sizes"], report["projection"]
    lines = [
        f"# Preflight of {report['experiment']}",
        "",
        f"Images per split in the preflight: {sizes['preflight']}; in the full run: {sizes['full']}.",
        "",
        "| round | stage | images | s | s / image | peak RSS MB | children MB | GPU MB "
        "| bytes / image | other bytes |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["stages"]:
        lines.append(
            f"| {r['round']} | {r['stage']} | {r['images']} | {r['seconds']:.1f} | "
            f"{r['seconds_per_image']:.2f} | {_mb(r['peak_rss_mb'])} | "
            f"{_mb(r['children_peak_rss_mb'])} | {_mb(r['gpu_peak_mb'])} | "
            f"{r['bytes_per_image']:,.0f} | {r['other_bytes']:,} |"
        )
    lines += [
        "",
        f"Projected full run: rounds 0..{proj['rounds'] - 1} on {proj['processes']} process(es) "
        f"of this trainer: **{proj['total_hours']:.1f} h**, **{proj['total_disk_gb']:.1f} GB** "
        "(stage set-up counted in each rate: errs long).",
        "",
        "| stage | hours | disk GB |",
        "|---|---:|---:|",
    ]
    for stage, hours in sorted(proj["hours"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {stage} | {hours:.2f} | {proj['disk_gb'][stage]:.2f} |")
    return "\n".join(lines) + "\n"


def run_preflight(cfg: DictConfig) -> dict:
    """Run the recipe at the preflight's budget, then print and write its report (rank 0)."""
    from src.pipeline.driver import check_stages, run_pipeline

    plan = check_stages(cfg)
    preflight_cfg = preflight_config(cfg, plan)
    results = run_pipeline(preflight_cfg)
    if is_global_zero():
        print(render(preflight_report(preflight_cfg, plan)))
    return results
