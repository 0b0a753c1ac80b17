"""The paper's Table 2 from a sweep: each baseline with and without CONTA, mean ± std over seeds.

A sweep (`python train.py -m method=irnet,seam conta=off,on seed=0,1,2`) leaves one run folder
per job, each with a ``results.json``. This module finds them, checks them (they are read back
from disk, so nothing is trusted: see `read_run`) and builds, per data set and method:

* ``<method>``: round 0, from the conta=off runs or, when there are none, from round 0 of the
  conta=on runs (round 0 of a CONTA run is the plain baseline); the "From" column says which;
* ``<method> + CONTA``: the last round T of the conta=on runs (the paper reports round T);
* a gain row: the per-seed difference (same seed, + CONTA minus baseline) as its mean and a
  95 % t-interval with n - 1 degrees of freedom. Pairing by seed removes the seed-to-seed spread
  both rows share, which is why the gain has its own row instead of a difference of means.

Columns CAM / Mask / Seg / Seg+CRF are cam_miou, pseudo_miou, seg_miou, seg_crf_miou in %; a
column no run of a method reports (a method without a segmenter) shows "–". Outputs: markdown,
a PNG of grouped bars, and optionally a W&B table.

The statistics are the bench's (bench/conta_vs_baseline.py: sample std, t-interval of the paired
differences), written again here in a few lines: the bench is a script outside the package
(importing it means editing sys.path and importing Hydra's compose API), not a library.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from src.evaluation.report import RESULTS_JSON
from src.utils.io import atomic_write_text
from src.utils.untrusted import Source, conforms, describe, parse_json, read_text

RUN_DIR_TXT = "run_dir.txt"  # written by every Hydra multirun job: the path of its run folder
SWEEP_SUMMARY = "sweep_summary.json"  # written by the sweeper (hydra_plugins/conta_sweeper)
TABLE_MD = "table2.md"
TABLE_PNG = "table2.png"
# (column, results.json round key); the paper's "Mask" is the pseudo-mask.
COLUMNS = (
    ("CAM", "cam_miou"),
    ("Mask", "pseudo_miou"),
    ("Seg", "seg_miou"),
    ("Seg+CRF", "seg_crf_miou"),
)
CRF_SHARE = "seg_crf_share"  # carried beside the columns: marks a CRF scored on a subset
SUBSET_MARK = "‡"
REQUIRED = ("cam_miou",)  # every method has a CAM stage; the other columns may be "–"
CONFIDENCE = 0.95
MISSING = "–"
HEADERS = ["Data", "Method", "From", "n", *[name for name, _ in COLUMNS]]
# Method and data names come from config group names; anything else would also break the table.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}\Z")
_FIX_RERUN = "re-run train.py for this run (finished stages are skipped), or leave it out"
_FIX_OLD = (
    "it was written before results.json recorded 'method', 'conta' and 'data': re-run train.py "
    "for this run with the current code, or leave it out"
)


class Table2Error(ValueError):
    """Bad input to the table: the message names the file(s) and the fix (one line)."""


@dataclass(frozen=True)
class Run:
    """One checked results.json: its identity and, per round, the table's metrics (fractions)."""

    path: Path
    data: str
    method: str
    conta: bool
    seed: int
    rounds: dict[int, dict[str, float | None]]
    context: str | None = None  # the CONTA rounds' context module (older files: not recorded)

    @property
    def last_round(self) -> int:
        return max(self.rounds)


@dataclass(frozen=True)
class Arm:
    """One table row's runs: per seed, the metrics (in %) of the round the row reports."""

    label: str
    source: str  # the "From" column: which runs and round
    values: dict[int, dict[str, float | None]]  # seed -> key -> %


@dataclass(frozen=True)
class Block:
    """One method on one data set: its baseline row, its + CONTA row (if any runs), columns."""

    data: str
    method: str
    keys: tuple[str, ...]  # the metric keys some run of this method reports
    baseline: Arm
    conta: Arm | None


# ----------------------------------------------------------------------------- finding runs


def _fail(paths: Iterable[Path], problem: str, fix: str) -> Table2Error:
    names = ", ".join(str(p) for p in paths)
    return Table2Error(f"{names}: {problem}. Fix: {fix}")


@dataclass(frozen=True)
class Missing:
    """A sweep job with no finished run: its folder, why, and where its log is (if known)."""

    job: Path
    reason: str
    log: str | None = None


def _run_dir_target(txt: Path) -> Path | Missing:
    """The results.json a sweep job's run_dir.txt points at (relative paths from its folder);
    a Missing when that run folder has none (the job failed or has not finished)."""
    # A regular file of one path: a device or FIFO under that name is refused, not read.
    text = read_text(Source(txt, "re-run that sweep job", Table2Error), limit=1 << 16).strip()
    if not text or "\n" in text or "\0" in text:
        raise _fail([txt], "does not hold one path", "re-run that sweep job")
    target = txt.parent / text  # an absolute `text` replaces the folder
    if not (target / RESULTS_JSON).is_file():
        return Missing(txt.parent, f"the job did not finish: {target} has no {RESULTS_JSON}")
    return target / RESULTS_JSON


def _sweep_failures(path: Path) -> list[Missing]:
    """The failed jobs a sweep_summary.json (hydra_plugins/conta_sweeper) lists, checked as
    untrusted input: {"jobs": [{"status", "job_dir", "error", "log", ...}, ...]}."""
    src = Source(path, "re-run the sweep, or delete the file to tabulate without it", Table2Error)
    obj = parse_json(read_text(src), src, "the file")
    jobs = obj.get("jobs") if type(obj) is dict else None
    if type(jobs) is not list or not all(type(j) is dict for j in jobs):
        src.fail("is not a sweep summary (no 'jobs' list of objects)")
    out = []
    for j in jobs:
        fields = {k: j.get(k) for k in ("status", "job_dir", "error", "log")}
        if not all(v is None or type(v) is str for v in fields.values()):
            src.fail(f"job {describe(j.get('num'))} has a field that is not a string")
        if fields["status"] != "completed" and fields["job_dir"]:
            reason = f"failed: {(fields['error'] or 'no error recorded')[:500]}"
            out.append(Missing(Path(fields["job_dir"]), reason, fields["log"]))
    return out


def find_runs(dirs: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Missing]]:
    """The results.json of every run under `dirs`: a run folder (results.json), a sweep job
    folder (run_dir.txt), or any folder searched for both; and the sweep jobs with no finished
    run (a run_dir.txt whose run folder has no results.json, a failed job of a
    sweep_summary.json), each once. The same file reached twice (a sweep and its run folders)
    counts once; a folder with no finished run is an error, not an empty table."""
    # resolved path -> the path it was found as (an ordered set; errors name the found path,
    # not what a link resolves to)
    found: dict[Path, Path] = {}
    missing: dict[Path, Missing] = {}
    for d in map(Path, dirs):
        if not d.is_dir():
            raise _fail([d], "is not a folder", "pass run folders or sweep folders")
        here_found, here_missing = 0, []
        for root, subdirs, files in os.walk(d):
            here = Path(root)
            if SWEEP_SUMMARY in files:
                for m in _sweep_failures(here / SWEEP_SUMMARY):
                    missing.setdefault(m.job.resolve(), m)
            if RESULTS_JSON in files:
                path = here / RESULTS_JSON
            elif RUN_DIR_TXT in files:
                path = _run_dir_target(here / RUN_DIR_TXT)
                if isinstance(path, Missing):
                    here_missing.append(path)
                    subdirs.clear()
                    continue
            else:
                subdirs.sort()
                continue
            found.setdefault(path.resolve(), path)
            here_found += 1
            subdirs.clear()  # a run's or a job's folders hold no other run
        for m in here_missing:  # a summary's entry (with its error and log) wins
            missing.setdefault(m.job.resolve(), m)
        if not here_found:
            if here_missing:
                raise _fail(
                    [m.job / RUN_DIR_TXT for m in here_missing],
                    f"no job finished ({here_missing[0].reason})",
                    "re-run those jobs, or pass the folders of finished ones",
                )
            raise _fail(
                [d],
                f"holds no {RESULTS_JSON} and no {RUN_DIR_TXT}",
                "pass a run folder (outputs/<experiment>/seed_<s>) or a sweep folder "
                "(outputs/multirun/<name>) whose jobs have finished",
            )
    return list(found.values()), list(missing.values())


def find_results(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """The results.json of every finished run under `dirs` (see `find_runs`)."""
    return find_runs(dirs)[0]


# ----------------------------------------------------------------------------- checking runs


def _metric(value: Any, src: Source, where: str) -> float | None:
    if value is None:
        return None
    if not conforms(value, float) or not math.isfinite(value) or not 0 <= value <= 1:
        src.fail(f"{where} is {describe(value)}, expected a fraction in [0, 1]")
    return float(value)


def _crf_share(row: dict, src: Source, where: str) -> float | None:
    """The share of the val images the CRF column was scored on (segmenter.crf_images), if the
    run says."""
    n, of = row.get("seg_crf_images"), row.get("seg_crf_split_images")
    if n is None or of is None:
        return None
    if not conforms(n, int) or not conforms(of, int) or not 0 < n <= of:
        src.fail(f"{where} seg_crf_images / seg_crf_split_images are {n!r} / {of!r}")
    return n / of


def read_run(path: str | os.PathLike) -> Run | None:
    """A results.json checked as untrusted input: a JSON object with 'rounds' (round number ->
    row), 'method' and 'data' (names), 'conta' (bool), 'seed' (int); the table's metrics, where
    present, plain fractions. Only those fields are read; anything else in the file is ignored.
    None for a run that names no method (`method: null`: a supervised bound, a `_cam` run),
    which has no row of its own: bounds enter through `upper_bound`."""
    path = Path(path)
    src = Source(path, _FIX_RERUN, Table2Error)
    try:
        obj = parse_json(read_text(src), src, "the file")
    except RecursionError as err:
        src.fail(f"unreadable ({type(err).__name__}: {err})", err)
    if type(obj) is not dict or type(obj.get("rounds")) is not dict:
        src.fail(f"not a {RESULTS_JSON} of this project (no 'rounds' object)")
    missing = [k for k in ("method", "conta", "data", "seed") if k not in obj]
    if missing:
        Source(path, _FIX_OLD, Table2Error).fail(f"lacks {missing}")
    if obj["method"] is None:
        return None
    for key, kind in (("method", str), ("data", str), ("conta", bool), ("seed", int)):
        if not conforms(obj[key], kind):
            src.fail(f"[{key!r}] is {describe(obj[key])}, expected {kind.__name__}")
    for key in ("method", "data"):
        if not _NAME.match(obj[key]):
            src.fail(f"[{key!r}] = {obj[key][:64]!r} is not a config name")
    context = obj.get("context")
    if context is not None and not (type(context) is str and _NAME.match(context)):
        src.fail(f"['context'] is {describe(context)}, expected a config name or null")
    rounds: dict[int, dict[str, float | None]] = {}
    for r, row in obj["rounds"].items():
        if not re.fullmatch(r"\d{1,4}", r) or type(row) is not dict:
            src.fail(f"round {r[:16]!r} is not a round number with an object of metrics")
        rounds[int(r)] = {
            key: _metric(row.get(key), src, f"round {r} {key!r}") for _, key in COLUMNS
        }
        rounds[int(r)][CRF_SHARE] = _crf_share(row, src, f"round {r}")
    if 0 not in rounds:
        src.fail("has no round 0 (the baseline)")
    if obj["conta"] and max(rounds) == 0:
        src.fail("is a conta=on run with round 0 only (no CONTA round finished)")
    return Run(path, obj["data"], obj["method"], obj["conta"], obj["seed"], rounds, context)


def gather_runs(dirs: Sequence[str | os.PathLike]) -> list[Run]:
    """Every run under `dirs`, checked (see `gather_sweep`)."""
    return gather_sweep(dirs)[0]


def gather_sweep(dirs: Sequence[str | os.PathLike]) -> tuple[list[Run], list[Missing]]:
    """Every finished run under `dirs`, checked, and the sweep jobs that did not finish; two
    files for one (data, method, conta, seed) are an error: the table would silently average
    or drop one of them."""
    paths, missing = find_runs(dirs)
    runs = [run for run in map(read_run, paths) if run is not None]
    by_id: dict[tuple, list[Path]] = {}
    for run in runs:
        by_id.setdefault((run.data, run.method, run.conta, run.seed), []).append(run.path)
    for (data, method, conta, seed), paths in by_id.items():
        if len(paths) > 1:
            raise _fail(
                paths,
                f"{len(paths)} runs of data={data} method={method} "
                f"conta={'on' if conta else 'off'} seed={seed}",
                "pass only the folders of one sweep, or remove the stale run",
            )
    return runs, missing


# ----------------------------------------------------------------------------- the table


def _arm(label: str, source: str, runs: list[Run], round_of: dict[Path, int]) -> Arm:
    values = {
        run.seed: {
            k: None if v is None else 100 * v for k, v in run.rounds[round_of[run.path]].items()
        }
        for run in sorted(runs, key=lambda run: run.seed)
    }
    return Arm(label, source, values)


# What each context module is called in a row label: no number is called CONTA that is not.
CONTEXT_LABELS = {"paper": "Eq. 3", "calibrated": "calibrated variant"}
# Deviations from a method's reference that hold at every scale, marked on its rows
# (docs/deviations.md lists them all).
METHOD_MARKS = {"sec": "saliency-free cues", "dsrg": "saliency-free cues"}


def _context_label(context: str | None) -> str:
    return "" if context is None else f" ({CONTEXT_LABELS.get(context, context)})"


def _block(data: str, method: str, runs: list[Run]) -> Block:
    off = [run for run in runs if not run.conta]
    on = [run for run in runs if run.conta]
    lasts = {run.last_round for run in on}
    if len(lasts) > 1:
        raise _fail(
            [run.path for run in on],
            f"the conta=on runs of {data}/{method} end at different rounds "
            f"({', '.join(str(run.last_round) for run in on)})",
            "finish every run to the same round T, or leave the shorter ones out",
        )
    round_of = {run.path: 0 for run in off + on}
    base_runs = off or on
    name = f"{method} ({METHOD_MARKS[method]})" if method in METHOD_MARKS else method
    baseline = _arm(
        name,
        "conta=off runs, round 0" if off else "round 0 of the conta=on runs (no conta=off run)",
        base_runs,
        round_of,
    )
    conta = None
    if on:
        (last,) = lasts
        contexts = {run.context for run in on}
        if len(contexts) > 1:
            raise _fail(
                [run.path for run in on],
                f"the conta=on runs of {data}/{method} ran different context modules "
                f"({', '.join(sorted(str(c) for c in contexts))})",
                "tabulate one module at a time (pass the folders of one sweep)",
            )
        round_of.update({run.path: last for run in on})
        label = f"{name} + CONTA{_context_label(contexts.pop())}"
        conta = _arm(label, f"conta=on runs, round {last}", on, round_of)
    # The metrics of every (run, round) the rows use: a gap in some but not all is an
    # unfinished run; a gap in all is a column this method does not have.
    used = [(run, 0) for run in base_runs] + [(run, round_of[run.path]) for run in on]
    keys = []
    for _, key in COLUMNS:
        lacking = [run.path for run, r in used if run.rounds[r][key] is None]
        if lacking and (len(lacking) < len(used) or key in REQUIRED):
            raise _fail(
                lacking,
                f"no {key!r} in the round the table reports, while "
                f"{'it is needed' if key in REQUIRED else 'other runs of ' + method + ' have it'}",
                _FIX_RERUN,
            )
        if not lacking:
            keys.append(key)
    return Block(data, method, tuple(keys), baseline, conta)


def build_table(runs: Sequence[Run]) -> list[Block]:
    """One block per (data set, method), sorted by name."""
    if not runs:
        raise Table2Error("no runs to tabulate. Fix: pass run folders or sweep folders")
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.data, run.method), []).append(run)
    return [_block(data, method, groups[data, method]) for data, method in sorted(groups)]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample std (ddof=1, as the bench); no std for one value."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None


def t_interval(
    diffs: Sequence[float], level: float = CONFIDENCE
) -> tuple[float, float, float] | None:
    """(mean, low, high): the t-interval of the mean of paired differences, n - 1 degrees of
    freedom (as the bench's paired_gain); None for n = 1, whose spread is unknown."""
    d = np.asarray(diffs, dtype=np.float64)
    if d.size < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
    return float(d.mean()), float(d.mean() - half), float(d.mean() + half)


def paired_diffs(block: Block, key: str) -> list[float]:
    """+ CONTA minus baseline (points), for each seed both rows have."""
    if block.conta is None:
        return []
    base, on = block.baseline.values, block.conta.values
    return [on[s][key] - base[s][key] for s in sorted(base.keys() & on.keys())]


def _mean_std_cell(arm: Arm, key: str, block: Block) -> str:
    if key not in block.keys:
        return MISSING
    mean, std = mean_std([v[key] for v in arm.values.values()])
    cell = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"
    return cell + (SUBSET_MARK if key == "seg_crf_miou" and _crf_subset(arm) else "")


def _crf_subset(arm: Arm) -> bool:
    return any((v.get(CRF_SHARE) or 100) < 100 for v in arm.values.values())


def _gain_cell(block: Block, key: str) -> str:
    diffs = paired_diffs(block, key) if key in block.keys else []
    if not diffs:
        return MISSING
    ci = t_interval(diffs)
    if ci is None:
        return f"{diffs[0]:+.1f} (n = 1: no CI)"
    mean, low, high = ci
    return f"{mean:+.1f} [{low:+.1f}, {high:+.1f}]"


def table_rows(blocks: Sequence[Block]) -> list[list[str]]:
    """The table as strings under HEADERS: two rows per method, and a gain row with + CONTA."""
    rows = []
    for b in blocks:
        arms = [b.baseline] + ([b.conta] if b.conta else [])
        for arm in arms:
            cells = [_mean_std_cell(arm, key, b) for _, key in COLUMNS]
            rows.append([b.data, arm.label, arm.source, str(len(arm.values)), *cells])
        if b.conta:
            n = len(b.baseline.values.keys() & b.conta.values.keys())
            source = f"paired by seed, mean [{100 * CONFIDENCE:.0f} % CI]"
            cells = [_gain_cell(b, key) for _, key in COLUMNS]
            rows.append([b.data, f"gain of {b.conta.label}", source, str(n), *cells])
    return rows


_LEGEND = (
    "mIoU in %, mean ± std (sample std) over n seeds; Mask = pseudo-masks. `<method>` is "
    "round 0 (the plain baseline), `<method> + CONTA` the last round T. Gain: the per-seed "
    "difference (same seed, + CONTA minus baseline) in points, its mean and a "
    f"{100 * CONFIDENCE:.0f} % t-interval with n - 1 degrees of freedom (none for n = 1). "
    f"{MISSING}: the method does not report that stage."
)


_SUBSET_LEGEND = (
    f"{SUBSET_MARK}: Seg+CRF scored on a fixed subset of the val images (segmenter.crf_images); "
    "each run's results.md gives the count and the segmenter without CRF on the same images."
)


def render_missing(missing: Sequence[Missing]) -> list[str]:
    """The section under the table naming the sweep jobs it lacks (their seeds are not in n)."""
    if not missing:
        return []
    lines = ["", f"## Not in the table: {len(missing)} sweep job(s) without a finished run", ""]
    for m in sorted(missing, key=lambda m: str(m.job)):
        lines.append(f"- {m.job}: {m.reason}" + (f" (log: {m.log})" if m.log else ""))
    return lines


def render_markdown(blocks: Sequence[Block], missing: Sequence[Missing] = ()) -> str:
    lines = ["# Table 2: baselines with and without CONTA", ""]
    lines += ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(blocks)]
    arms = [a for b in blocks for a in (b.baseline, b.conta) if a is not None]
    legend = [_LEGEND] + ([_SUBSET_LEGEND] if any(map(_crf_subset, arms)) else [])
    return "\n".join([*lines, "", *legend, *render_missing(missing)]) + "\n"


# ----------------------------------------------------------------------------- figure, W&B


def plot_table(blocks: Sequence[Block], out_path: str | os.PathLike) -> Path:
    """Grouped bars, one panel per column: per method the baseline and + CONTA mean, error bars
    ± std (none for one seed). A baseline taken from round 0 of CONTA runs is marked †."""
    from matplotlib.figure import Figure  # Figure + savefig renders with Agg; no pyplot state

    from src.evaluation.figures import _save_atomic

    many_sets = len({b.data for b in blocks}) > 1
    labels = [
        (f"{b.data}/{b.method}" if many_sets else b.method)
        + ("" if b.baseline.source.startswith("conta=off") else "†")
        for b in blocks
    ]
    fig = Figure(figsize=(3.2 * len(COLUMNS), 3.6), layout="constrained")
    axes = fig.subplots(1, len(COLUMNS), squeeze=False)[0]
    x = np.arange(len(blocks))
    width = 0.38
    legend: dict[str, Any] = {}  # arm name -> a bar, whichever panel drew one
    for ax, (name, key) in zip(axes, COLUMNS, strict=True):
        for i, b in enumerate(blocks):
            if key not in b.keys:
                ax.text(x[i], 2, MISSING, ha="center")
                continue
            for j, (arm_name, arm) in enumerate((("baseline", b.baseline), ("+ CONTA", b.conta))):
                if arm is None:
                    continue
                mean, std = mean_std([v[key] for v in arm.values.values()])
                bars = ax.bar(x[i] + (j - 0.5) * width, mean, width, yerr=std, capsize=3)
                bars.patches[0].set_facecolor(f"C{j}")
                legend.setdefault(arm_name, bars)
        ax.set_title(name)
        ax.set_xticks(x, labels, rotation=30 if len(blocks) > 3 else 0)
        ax.set_xlim(-0.6, len(blocks) - 0.4)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mIoU (%), mean ± std over seeds")
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside upper right", ncol=2)
    title = "Table 2: baselines with and without CONTA"
    if any(lab.endswith("†") for lab in labels):
        title += "  († baseline = round 0 of the CONTA runs)"
    fig.suptitle(title)
    return _save_atomic(fig, out_path, dpi=100)


def log_wandb(blocks: Sequence[Block], out_dir: Path, figure: Path | None = None) -> None:
    """The table (and figure) as one W&B run; offline unless credentials exist. wandb is
    imported here so that the table never needs it."""
    import wandb

    from src.utils.loggers import wandb_logged_in

    mode = "online" if wandb_logged_in() else "offline"
    run = wandb.init(
        project="conta-wsss", job_type="table2", name="table2", mode=mode, dir=str(out_dir)
    )
    try:
        payload: dict[str, Any] = {"table2": wandb.Table(columns=HEADERS, data=table_rows(blocks))}
        if figure is not None:
            payload["table2_figure"] = wandb.Image(str(figure))
        run.log(payload)
    finally:
        run.finish()


def write_report(
    dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, wandb: bool = False
) -> tuple[str, dict[str, Path]]:
    """Gather, check and tabulate the runs under `dirs`; write table2.md and table2.png to
    `out_dir`. Returns the markdown and the written files."""
    runs, missing = gather_sweep(dirs)
    blocks = build_table(runs)
    text = render_markdown(blocks, missing)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / TABLE_MD, text)
    files = {"markdown": out_dir / TABLE_MD, "figure": plot_table(blocks, out_dir / TABLE_PNG)}
    if wandb:
        log_wandb(blocks, out_dir, files["figure"])
    return text, files
