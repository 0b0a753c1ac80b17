"""Run results: ``results.json`` (merged per round and stage), ``results.md`` and a printed table.

Row keys are ``{stage}_{metric}``: for stage "cam" a SegmentationMetric dict gives ``cam_miou``,
``cam_per_class_iou``, ``cam_errors`` (the three error rates), ``cam_error_shares``,
``cam_context_leakage`` ... (None values are left out); a ThresholdSweep dict adds ``cam_threshold``, ``cam_best_miou``,
``cam_best_threshold`` and ``cam_sweep``. Seconds go to ``row["seconds"][stage]``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from src.evaluation.metrics import ERROR_KEYS
from src.utils.io import atomic_write_text

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# Most downstream first: the stage whose errors a summary row shows.
MAIN_STAGE_ORDER = ("seg_crf", "seg", "pseudo", "cam")
STAGE_ORDER = ("cam", "ir_label", "pseudo", "seg", "seg_crf")
_ERROR_ABBREV = {
    "incomplete_foreground": "IF",
    "object_ambiguity": "OA",
    "incomplete_background": "IB",
}
_MISSING = "–"


def _jsonable(x: Any) -> Any:
    """numpy/torch scalars and arrays -> plain JSON; NaN -> None (JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):  # np.ndarray, np.generic, Tensor
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def stage_row(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Flatten one stage's metric dict into ``{prefix}_*`` row keys (None values are dropped)."""
    if "at_configured" in metrics:  # a ThresholdSweep result: main numbers at the configured thr
        row = stage_row(prefix, metrics["at_configured"])
        row[f"{prefix}_threshold"] = metrics["configured_threshold"]
        row[f"{prefix}_best_miou"] = metrics["best_miou"]
        row[f"{prefix}_best_threshold"] = metrics["best_threshold"]
        row[f"{prefix}_sweep"] = {
            "thresholds": metrics["thresholds"],
            "miou": metrics["miou_per_threshold"],
        }
        return row
    row: dict[str, Any] = {}
    errors = dict(metrics.get("errors") or {})
    errors.update({k: metrics[k] for k in ERROR_KEYS if metrics.get(k) is not None})
    if errors:
        row[f"{prefix}_errors"] = errors
    for key, value in metrics.items():
        if key not in (*ERROR_KEYS, "errors") and value is not None:
            row[f"{prefix}_{key}"] = value
    return row


def _empty_results() -> dict[str, Any]:
    return {"experiment": None, "seed": None, "rounds": {}}


def load_results(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RESULTS_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the pipeline (train.py) for this run first")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it and re-run eval.py") from err
    if not isinstance(results, dict) or not isinstance(results.get("rounds"), dict):
        raise ValueError(f"{path} has no 'rounds' mapping; delete it and re-run eval.py")
    return results


def update_results(
    run_dir: str | os.PathLike,
    round_idx: int,
    stage_prefix: str,
    metrics: Mapping[str, Any],
    seconds: float | Mapping[str, float] | None = None,
    experiment: str | None = None,
    seed: int | None = None,
    nested: bool = False,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merge one stage's metrics into ``results.json`` (and refresh ``results.md``); returns all.

    ``identity``: top-level fields naming the run's point of a sweep (data, method, conta), which
    report.py groups by.

    ``nested``: store the metrics as one dict under ``row[stage_prefix]`` (e.g. ``context``)
    instead of flattening them into ``{stage_prefix}_*`` keys.

    ``seconds``: a float is this stage's time; a mapping merges several {stage: s}. Call from one
    process only (rank 0): the write is atomic, but two concurrent writers would lose an update.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / RESULTS_JSON
    results = load_results(run_dir) if path.exists() else _empty_results()
    if experiment is not None:
        results["experiment"] = experiment
    if seed is not None:
        results["seed"] = int(seed)
    results.update(_jsonable(dict(identity or {})))
    row = results["rounds"].setdefault(str(int(round_idx)), {})
    if nested:
        row[stage_prefix] = _jsonable(dict(metrics))
    else:
        row.update(_jsonable(stage_row(stage_prefix, metrics)))
    if seconds is not None:
        times = seconds if isinstance(seconds, Mapping) else {stage_prefix: seconds}
        row.setdefault("seconds", {}).update(_jsonable(dict(times)))
    # Rounds in numeric order, whatever order stages finished in.
    results["rounds"] = dict(sorted(results["rounds"].items(), key=lambda kv: int(kv[0])))
    # Rendered before anything is written: a value the table cannot show fails here, leaving
    # results.json as it was rather than unreadable for every later run.
    markdown = render_markdown(results)
    atomic_write_text(path, json.dumps(results, indent=2) + "\n")
    atomic_write_text(run_dir / RESULTS_MD, markdown)
    return results


# ----------------------------------------------------------------------------- table model


def _pct(x: Any) -> str:
    return _MISSING if x is None else f"{100 * x:.1f}"


def _delta(a: Any, b: Any) -> str:
    return _MISSING if a is None or b is None else f"{100 * (b - a):+.1f}"


def _main_stage(row: Mapping[str, Any]) -> str | None:
    return next((s for s in MAIN_STAGE_ORDER if f"{s}_errors" in row), None)


def _stage_seconds(results: Mapping[str, Any]) -> list[str]:
    stages: list[str] = []
    for row in results["rounds"].values():
        stages += [s for s in row.get("seconds", {}) if s not in stages]
    return stages


def _summary_values(row: Mapping[str, Any], timed: list[str]) -> dict[str, Any]:
    """Numeric cells of one round (fractions, seconds); formatting happens later."""
    main = _main_stage(row)
    errors = row.get(f"{main}_errors", {}) if main else {}
    secs = row.get("seconds", {})
    values: dict[str, Any] = {
        "CAM mIoU": row.get("cam_miou"),
        "CAM best": row.get("cam_best_miou"),
        "Pseudo mIoU": row.get("pseudo_miou"),
        "Seg mIoU": row.get("seg_miou"),
        "Seg+CRF mIoU": row.get("seg_crf_miou"),
        "Errors of": main,
    }
    for key, abbrev in _ERROR_ABBREV.items():
        values[f"{abbrev} %"] = errors.get(key)
    values["Leak %"] = row.get(f"{main}_context_leakage") if main else None
    for stage in timed:
        values[f"{stage} s"] = secs.get(stage)
    values["Total s"] = sum(secs.values()) if secs else None
    return values


def _crf_subset_note(row: Mapping[str, Any]) -> str:
    """' (on 5,000 of 40,504)' when the CRF was scored on a fixed subset (segmenter.crf_images),
    with the segmenter's score on those images, which is the one to compare against."""
    n, of = row.get("seg_crf_images"), row.get("seg_crf_split_images")
    if not isinstance(n, int) or not isinstance(of, int) or n >= of:
        return ""
    return f" (on {n:,} of {of:,}; no CRF: {_pct(row.get('seg_crf_without_crf_miou'))})"


def summary_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of strings): one row per round, plus a change row vs round 0."""
    rounds = results["rounds"]
    timed = _stage_seconds(results)
    values = {r: _summary_values(row, timed) for r, row in rounds.items()}
    headers = ["Round"] + (list(next(iter(values.values()))) if values else [])
    rows = []
    for r, vals in values.items():
        cells = [r]
        for name, v in vals.items():
            if name == "Errors of":
                cells.append(v or _MISSING)
            elif name.endswith(" s"):
                cells.append(_MISSING if v is None else f"{v:.1f}")
            elif name == "CAM best":
                thr = rounds[r].get("cam_best_threshold")
                cells.append(_pct(v) if v is None or thr is None else f"{_pct(v)} @{thr:.2f}")
            elif name == "Seg+CRF mIoU":
                cells.append(_pct(v) + _crf_subset_note(rounds[r]))
            else:
                cells.append(_pct(v))
        rows.append(cells)
    if len(values) > 1 and "0" in values:
        last = list(values)[-1]
        same_stage = values["0"]["Errors of"] == values[last]["Errors of"]
        cells = [f"Δ r{last}−r0"]
        for name, v in values[last].items():
            if name == "Errors of" or name.endswith(" s"):
                cells.append("")
            elif name in {"IF %", "OA %", "IB %", "Leak %"} and not same_stage:
                cells.append(_MISSING)  # different stages: a difference would mean nothing
            else:
                cells.append(_delta(values["0"][name], v))
        rows.append(cells)
    rows += _upper_bound_rows(results, headers, values)
    return headers, rows


def _upper_bound_rows(
    results: Mapping[str, Any], headers: list[str], values: Mapping[str, dict]
) -> list[list[str]]:
    """The fully-supervised segmenter on the same data, and the last round as a % of it."""
    bound = results.get("upper_bound")
    if not bound or not values:
        return []
    last = list(values)[-1]
    sup_row = [f"supervised ({bound.get('experiment')})"]
    ratio_row = [f"r{last} / supervised"]
    for name in headers[1:]:
        key = {"Seg mIoU": "seg_miou", "Seg+CRF mIoU": "seg_crf_miou"}.get(name)
        sup = bound.get(key) if key else None
        ours = values[last].get(name)
        sup_row.append(_pct(sup) if key else "")
        ratio = None if sup in (None, 0) or ours is None else ours / sup
        ratio_row.append(f"{100 * ratio:.0f}%" if ratio is not None else "")
    return [sup_row, ratio_row]


def attach_upper_bound(run_dir: str | os.PathLike, bound_dir: str | os.PathLike, name: str) -> dict:
    """Copy the supervised run's segmenter mIoU (round 0) into this run's results.json."""
    results = load_results(run_dir)
    path = Path(bound_dir) / RESULTS_JSON
    if not path.is_file():
        results.pop("upper_bound", None)
    else:
        row = load_results(bound_dir)["rounds"].get("0", {})
        results["upper_bound"] = {
            "experiment": name,
            "seg_miou": row.get("seg_miou"),
            "seg_crf_miou": row.get("seg_crf_miou"),
            "run_dir": str(Path(bound_dir)),
        }
    atomic_write_text(Path(run_dir) / RESULTS_JSON, json.dumps(results, indent=2) + "\n")
    return results


def round_curves(results: Mapping[str, Any], out_path: str | os.PathLike) -> Path:
    """mIoU of every stage per round (the CONTA curves), with the supervised bound if known."""
    from src.evaluation.figures import curve_plot

    rounds = results["rounds"]
    xs = [int(r) for r in rounds]
    series = {
        label: [rounds[r].get(key) for r in rounds]
        for label, key in [
            ("CAM", "cam_miou"),
            ("pseudo-mask", "pseudo_miou"),
            ("seg", "seg_miou"),
            ("seg + CRF", "seg_crf_miou"),
        ]
    }
    series = {k: [None if v is None else 100 * v for v in vs] for k, vs in series.items()}
    series = {k: vs for k, vs in series.items() if any(v is not None for v in vs)}
    bound = (results.get("upper_bound") or {}).get("seg_miou")
    if bound is not None:
        series["supervised seg"] = [100 * bound] * len(xs)
    return curve_plot(
        xs, series, out_path, xlabel="round", ylabel="mIoU (%)", title=_title(results)
    )


def per_class_table(results: Mapping[str, Any]) -> tuple[str | None, list[str], list[list[str]]]:
    """(round, headers, rows): per-class IoU % of the latest round, one column per stage."""
    if not results["rounds"]:
        return None, [], []
    r, row = list(results["rounds"].items())[-1]
    found = [k[: -len("_per_class_iou")] for k in row if k.endswith("_per_class_iou")]
    stages = [s for s in STAGE_ORDER if s in found] + sorted(
        s for s in found if s not in STAGE_ORDER
    )
    classes: list[str] = []
    for s in stages:
        classes += [c for c in row[f"{s}_per_class_iou"] if c not in classes]
    rows = [[c] + [_pct(row[f"{s}_per_class_iou"].get(c)) for s in stages] for c in classes]
    return r, ["Class"] + stages, rows


# ----------------------------------------------------------------------------- renderers


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


_LEGEND = (
    "mIoU in %, VOC protocol. IF/OA/IB: incomplete foreground (object pixels predicted as "
    "background), object ambiguity (object pixels predicted as another object), incomplete "
    "background (background pixels predicted as an object), as % of their ground-truth "
    "pixels, for the stage in 'Errors of'. Leak: % of predicted-object pixels on a context region."
)


def _title(results: Mapping[str, Any]) -> str:
    seed = results.get("seed")
    return f"Results: {results.get('experiment') or 'run'}" + (
        f" (seed {seed})" if seed is not None else ""
    )


CONTEXT_COLUMNS = ("alpha_max", "alpha_entropy", "m_spread", "m_logit_share")
_CONTEXT_TITLE = "CONTA context map (is M alive, does it reach the logits?)"
_CONTEXT_LEGEND = (
    "Over the training images, per CONTA round: alpha_max = mean max_i alpha_i (1/n: uniform "
    "attention); alpha_entropy = mean entropy of alpha / log n (1: uniform); m_spread = mean "
    "over positions of M's std across images / M's mean (0: one map for every image); "
    "m_logit_share = mean |what the M channel adds to the top class logit| / |that logit|."
)


def context_table(results: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): the context diagnostics of every round >= 1 that has them."""
    rows = []
    for r, row in results["rounds"].items():
        ctx = row.get("context")
        if not isinstance(ctx, Mapping):
            continue
        cells = [f"{ctx[k]:.3f}" if ctx.get(k) is not None else _MISSING for k in CONTEXT_COLUMNS]
        rows.append([r, *cells, "yes" if ctx.get("inert") else "no"])
    return ["Round", *CONTEXT_COLUMNS, "inert"], rows


def render_markdown(results: Mapping[str, Any]) -> str:
    headers, rows = summary_table(results)
    parts = [f"# {_title(results)}", "", _markdown_table(headers, rows), "", _LEGEND]
    ctx_headers, ctx_rows = context_table(results)
    if ctx_rows:
        parts += ["", f"## {_CONTEXT_TITLE}", "", _markdown_table(ctx_headers, ctx_rows)]
        parts += ["", _CONTEXT_LEGEND]
    r, pc_headers, pc_rows = per_class_table(results)
    if pc_rows:
        parts += ["", f"## Per-class IoU (%), round {r}", "", _markdown_table(pc_headers, pc_rows)]
    return "\n".join(parts) + "\n"


def write_markdown(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / RESULTS_MD
    atomic_write_text(path, render_markdown(load_results(run_dir)))
    return path


def _rich_table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
    for cells in rows:
        table.add_row(*cells)
    return table


def print_results(results: Mapping[str, Any], console: Console | None = None) -> None:
    """Print the summary (and per-class) table with rich; plain text when stdout is no TTY."""
    tables = [_rich_table(_title(results), *summary_table(results))]
    ctx_headers, ctx_rows = context_table(results)
    if ctx_rows:
        tables.append(_rich_table(_CONTEXT_TITLE, ctx_headers, ctx_rows))
    r, pc_headers, pc_rows = per_class_table(results)
    if pc_rows:
        tables.append(_rich_table(f"Per-class IoU (%), round {r}", pc_headers, pc_rows))
    if console is None:
        console = Console()
        if not console.is_terminal:
            # A pipe or log file gets rich's 80-column default, which would squash the table.
            wide = console.options.update(max_width=10_000)
            width = max(console.measure(t, options=wide).maximum for t in tables)
            console = Console(file=sys.stdout, width=max(width, 80), color_system=None)
    for table in tables:
        console.print(table)
    console.print(_LEGEND, style="dim")
