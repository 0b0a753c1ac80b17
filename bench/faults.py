"""Fault campaign: SIGKILL a run again and again, finish it, compare with an uninterrupted run.

    python bench/faults.py [--kills 20] [--seed 0] [--fast] [--experiment NAME]
                           [--reuse [--copy-pause S]] [--workdir DIR] [--keep] [key=value ...]

Runs `python train.py` (the default experiment unless --experiment; --fast adds
`debug=tiny`, a tiny set that runs in seconds) once uninterrupted in its own PROJECT_ROOT (the
reference), then in a second PROJECT_ROOT starts the same command, SIGKILLs its process group
(DataLoader workers and CRF pools included), starts it again, ... --kills times, and lets the last
attempt finish. Both roots get a copy of one data folder generated beforehand, so the campaign
exercises the pipeline, not the generator.

Kill moments: each kill targets one (round, stage) of the reference's timeline. Targets are a
seeded shuffle of every stage of every round (cycled when --kills exceeds their number), taken in
pipeline order; an attempt is killed u * (the reference stage's DONE.json `seconds`) after its log
says the target stage started (u uniform in [0, 1)), so kills spread over all stages and rounds. A
target the campaign already finished moves to the first unfinished stage. Where a kill landed is
read after it from the attempt's log and the DONE markers: mid-stage (the last stage the attempt
started has no DONE.json), between stages (it had finished: results/DONE bookkeeping, the next
stage's folder, the final report) or startup (no stage started yet: imports, config, data check,
skipping finished stages).

--reuse: reuse in the loop. Each run names the other as its donor (`reuse_from=[<the other
run's dir>]`; the reference runs first, so it has none), so the campaign copies every stage that
may be copied from the finished reference (src/pipeline/reuse.py) and computes or rescores the
rest, and every kill lands DURING a reuse copy: each targets one copied (round, stage); the
attempt runs through bench/slow_reuse_train.py, which sleeps --copy-pause seconds before each
file of a copy so that the copy's hidden `round_<t>/.reuse-*` folder stays long enough to be
seen, and is SIGKILLed u * (its files x --copy-pause) seconds after that folder appears. A kill
counts as landed during the copy when the folder, with the copy in it, is still there after the
kill. The resumed run must equal the reference and leave no `.reuse-*` folder (one left is a
difference). DONE.json's `reused_from` (which donor a copied stage came from) is dropped from the
comparison and counted instead; both runs' roots are replaced by the placeholder in both runs'
text (each one's config names the other's folder).

Compared, reference vs campaign, every file under the run dir (each DONE.json's artifacts are
among them and counted apart), except these, which record the attempts rather than the results:
  .hydra/, train.log   Hydra's record of each invocation and its job log (timestamps, appended
                       by every attempt).
  */logs/              the per-stage loggers (CSV metrics.csv, hparams.yaml): written per attempt
                       (a resumed training logs from its checkpoint on); no stage reads them, and
                       the metrics that matter are in DONE.json and results.json.
  */RUNNING.json       the driver's in-progress marker: a kill between a stage's DONE.json and the
                       marker's removal leaves it in a finished stage, where DONE.json wins.
  results.md           rendered from results.json (compared) plus the wall-time columns.
Wall-time fields (`seconds`, at any depth) are dropped from DONE.json and results.json, and so are
DONE.json's `metrics.resume` (what the last attempt of a stage reused or resumed from: it differs
by design after a kill, and is reported instead: items reused, trainings resumed) and its
`resources` (the peak memory of the process that ran the stage, a measurement of the attempt like
its seconds: the children's peak is a lifetime maximum over whatever that process ran before). The
PROJECT_ROOT path is replaced by a placeholder in text and in checkpoint strings (config.yaml and
DONE.json configs hold resolved paths). How files are compared: .npz arrays and .pt/.ckpt tensors
equal (numpy/torch, dtype and shape included; other values of a checkpoint compared as values),
.png pixel-equal (mode and palette too), .json as parsed values, anything else byte-equal. A file
in one run only is a difference; a leftover temp file of an interrupted atomic write
(`.name.XXXX.tmp`) is one too. Each run gets a TMPDIR of its own, where Lightning (fsspec) writes a
checkpoint before moving it into place: what kills leave there is counted, outside the comparison.

Prints kills delivered, where they landed (histogram by stage), files compared, differences (each
listed), reference and campaign wall time and the extra time the kills cost; writes the same to
outputs/bench/faults.md. Exits 1 when a difference is found (the work folder is then kept).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
sys.path.insert(0, str(ROOT))

PLACEHOLDER = "<PROJECT_ROOT>"
RUNNING_RE = re.compile(r"round (\d+): running (\w+) \(")
EXCLUDED_NAMES = {"train.log", "results.md", "RUNNING.json"}
EXCLUDED_DIRS = {".hydra", "logs"}
TIME_KEYS = {"seconds"}
ATTEMPT_KEY = "resume"  # DONE.json metrics: what this attempt reused (per-image) or resumed from
DONOR_KEY = "reused_from"  # DONE.json of a stage copied from a reuse_from donor: its folder
RESOURCES_KEY = "resources"  # DONE.json: the attempt's peak memory (src/pipeline/resources.py)
REUSE_GLOB = ".reuse-*"  # a copy in progress (src/pipeline/reuse.py REUSE_PREFIX)


def fast_overrides() -> list[str]:
    return ["debug=tiny"]  # the tests' tiny set (conf/debug/tiny.yaml)


def compose(overrides: list[str], root: Path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = hydra_compose("train", overrides=[*overrides, f"paths.root_dir={root}"])
    GlobalHydra.instance().clear()
    return cfg


def start(
    root: Path, args: list[str], log: Path, copy_pause: float | None = None
) -> subprocess.Popen:
    """train.py in `root`; `copy_pause`: through bench/slow_reuse_train.py (reuse copies slowed)."""
    # TMPDIR of its own (next to the root): Lightning stages checkpoints there (fsspec).
    env = {**os.environ, "PROJECT_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    env["TMPDIR"] = str(tmp_dir(root))
    entry = ROOT / "train.py"
    if copy_pause is not None:
        entry = ROOT / "bench" / "slow_reuse_train.py"
        env["FAULTS_COPY_PAUSE"] = str(copy_pause)
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, str(entry), *args],
        cwd=ROOT,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the kill takes its children too
    )
    out.close()
    return proc


def tmp_dir(root: Path) -> Path:
    return root.parent / f"{root.name}_tmp"


def check_exit(proc: subprocess.Popen, log: Path) -> None:
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        sys.exit(f"train.py failed (exit {proc.returncode}), log {log}:\n{tail}")


def run_to_end(root: Path, args: list[str], log: Path, copy_pause: float | None = None) -> float:
    start_t = time.perf_counter()
    proc = start(root, args, log, copy_pause)
    proc.wait()
    check_exit(proc, log)
    return time.perf_counter() - start_t


# ----------------------------------------------------------------------------- kill campaign


@dataclass
class Kill:
    target: tuple[int, str]
    fraction: float
    delay: float = 0.0
    # "mid-stage", "between stages", "startup", "not delivered"; --reuse: "during reuse copy"
    # (the copy's hidden folder, the copy in it, was left by the kill) or "after reuse copy"
    landed: str = ""
    stage: tuple[int, str] | None = None
    attempt_s: float = 0.0


@dataclass
class Campaign:
    kills: list[Kill] = field(default_factory=list)
    attempts: int = 0
    wall_s: float = 0.0


class StageLog:
    """The (round, stage)s an attempt's log says it started, read incrementally (polled often)."""

    def __init__(self, log: Path):
        self.log, self.offset, self.partial = log, 0, ""
        self.started: list[tuple[int, str]] = []

    def poll(self, final: bool = False) -> list[tuple[int, str]]:
        """`final`: the attempt has ended, take its last line even without a newline."""
        with self.log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        self.offset += len(chunk)
        lines = (self.partial + chunk.decode(errors="replace")).split("\n")
        self.partial = "" if final else lines.pop()
        self.started += [(int(r), s) for r, s in RUNNING_RE.findall("\n".join(lines))]
        return self.started


def is_done(run_dir: Path, inst: tuple[int, str]) -> bool:
    return (run_dir / f"round_{inst[0]}" / inst[1] / "DONE.json").is_file()


def copy_folders(run_dir: Path, inst: tuple[int, str]) -> list[Path]:
    """The hidden folders of copies of this (round, stage) in progress (or killed)."""
    return sorted((run_dir / f"round_{inst[0]}").glob(f".reuse-{inst[1]}-*"))


def copied_files(stage_dir: Path) -> int:
    """The files a reuse copy of this finished stage folder links (its markers are not)."""
    markers = {"DONE.json", "RUNNING.json", "REUSED.json"}
    return sum(1 for p in stage_dir.rglob("*") if p.is_file() and p.name not in markers)


def plan_kills(timeline: list[tuple[int, str]], kills: int, seed: int) -> list[Kill]:
    """A seeded shuffle of every (round, stage), cycled to `kills` targets, in pipeline order."""
    rng = random.Random(seed)
    targets: list[tuple[int, str]] = []
    while len(targets) < kills:
        batch = list(timeline)
        rng.shuffle(batch)
        targets += batch
    order = {inst: i for i, inst in enumerate(timeline)}
    chosen = sorted(targets[:kills], key=order.__getitem__)
    return [Kill(target=t, fraction=rng.random()) for t in chosen]


def run_campaign(
    root: Path,
    args: list[str],
    run_dir: Path,
    timeline: list[tuple[int, str]],
    ref_seconds: dict[tuple[int, str], float],
    plan: list[Kill],
    logs: Path,
    copy_pause: float | None = None,
) -> Campaign:
    """`copy_pause` (--reuse): `ref_seconds` are the copy windows of the copied stages, each kill
    is timed from the moment its target's copy folder appears."""
    campaign = Campaign()
    begin = time.perf_counter()
    for kill in plan:
        target = kill.target
        if is_done(run_dir, target):  # an earlier kill landed past it
            target = next((i for i in timeline if not is_done(run_dir, i)), None)
            if target is None:
                kill.landed = "not delivered"
                continue
            kill.target = target
        kill.delay = kill.fraction * ref_seconds[target]
        campaign.attempts += 1
        log = logs / f"attempt_{campaign.attempts:02d}.log"
        t0 = time.perf_counter()
        # A copy folder an earlier kill left (removed when the attempt starts) is not this one's.
        stale = set(copy_folders(run_dir, target))

        def copying(target=target, stale=stale) -> list[Path]:
            return [f for f in copy_folders(run_dir, target) if f not in stale]

        proc = start(root, args, log, copy_pause)
        stage_log, kill_at = StageLog(log), None
        while proc.poll() is None:
            now = time.perf_counter()
            if kill_at is None and (
                copying() if copy_pause is not None else target in stage_log.poll()
            ):
                kill_at = now + kill.delay
            if kill_at is not None and now >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait()
        kill.attempt_s = time.perf_counter() - t0
        if proc.returncode != -signal.SIGKILL:
            check_exit(proc, log)
            kill.landed = "not delivered"  # the run finished before the moment came
            break
        started = stage_log.poll(final=True)
        if copy_pause is not None:
            kill.stage = target
            in_copy = any((f / "stage").is_dir() for f in copying())
            kill.landed = "during reuse copy" if in_copy else "after reuse copy"
        elif not started:
            kill.landed = "startup"
        else:
            kill.stage = started[-1]
            kill.landed = "between stages" if is_done(run_dir, started[-1]) else "mid-stage"
    for kill in plan:
        kill.landed = kill.landed or "not delivered"
    campaign.attempts += 1
    proc_log = logs / f"attempt_{campaign.attempts:02d}.log"
    run_to_end(root, args, proc_log, copy_pause)
    campaign.wall_s = time.perf_counter() - begin
    return campaign


# ----------------------------------------------------------------------------- comparison


def excluded(rel: Path) -> bool:
    return rel.name in EXCLUDED_NAMES or any(p in EXCLUDED_DIRS for p in rel.parts[:-1])


def run_files(run_dir: Path) -> set[Path]:
    return {p.relative_to(run_dir) for p in run_dir.rglob("*") if p.is_file()}


def artifact_files(run_dir: Path) -> set[Path]:
    """Every file under the artifacts each DONE.json lists."""
    out: set[Path] = set()
    for done in run_dir.rglob("DONE.json"):
        for artifact in json.loads(done.read_text())["artifacts"]:
            path = done.parent / artifact
            paths = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
            out |= {p.relative_to(run_dir) for p in paths}
    return out


def _drop_times(obj):
    if isinstance(obj, dict):
        return {k: _drop_times(v) for k, v in obj.items() if k not in TIME_KEYS}
    if isinstance(obj, list):
        return [_drop_times(v) for v in obj]
    return obj


def _norm_text(text: str, roots: tuple[Path, ...]) -> str:
    """Both runs' roots replaced by the placeholder (--reuse: each run's config names the
    other's folder)."""
    for root in roots:
        text = text.replace(str(root.resolve()), PLACEHOLDER).replace(str(root), PLACEHOLDER)
    return text


def _values_diff(a, b, where: str, roots: tuple[Path, Path]) -> str | None:
    """First difference between two loaded values (tensors/arrays equal in dtype, shape, values)."""
    import numpy as np
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return f"{where}: tensor vs {type(b).__name__}"
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a, b) and not (
            a.is_floating_point() and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
        ):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "-"
            return f"{where}: tensors differ (max |diff| {diff})"
        return None
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{where}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        equal_nan = a.dtype.kind in "fc"
        if not np.array_equal(a, b, equal_nan=equal_nan):
            diff = np.abs(a.astype(float) - b.astype(float)).max() if a.dtype.kind in "fciu" else ""
            return f"{where}: arrays differ (max |diff| {diff})"
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f"{where}: keys {sorted(map(str, set(a) ^ set(b)))} in one only"
        for k in a:
            d = _values_diff(a[k], b[k], f"{where}/{k}", roots)
            if d:
                return d
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _values_diff(x, y, f"{where}[{i}]", roots)
            if d:
                return d
        return None
    if isinstance(a, str) and isinstance(b, str):
        a, b = _norm_text(a, roots), _norm_text(b, roots)
    if type(a) is not type(b) or a != b:
        if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
            return None  # both NaN
        return f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}"
    return None


def _load_png(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return {"mode": img.mode, "palette": img.getpalette(), "pixels": np.asarray(img)}


def compare_file(rel: Path, ref_dir: Path, camp_dir: Path, roots: tuple[Path, Path]) -> str | None:
    a, b = ref_dir / rel, camp_dir / rel
    suffix = rel.suffix
    if suffix == ".npz":
        import numpy as np

        with np.load(a) as za, np.load(b) as zb:
            return _values_diff(dict(za), dict(zb), str(rel), roots)
    if suffix in (".pt", ".ckpt", ".pth"):
        import torch

        load = dict(map_location="cpu", weights_only=False)
        return _values_diff(torch.load(a, **load), torch.load(b, **load), str(rel), roots)
    if suffix == ".png":
        return _values_diff(_load_png(a), _load_png(b), str(rel), roots)
    if suffix == ".json":
        ja = json.loads(_norm_text(a.read_text(), roots))
        jb = json.loads(_norm_text(b.read_text(), roots))
        if rel.name == "DONE.json":
            for done in (ja, jb):
                done.get("metrics", {}).pop(ATTEMPT_KEY, None)
                done.pop(DONOR_KEY, None)
                done.pop(RESOURCES_KEY, None)
        return _values_diff(_drop_times(ja), _drop_times(jb), str(rel), roots)
    if suffix in (".yaml", ".yml", ".txt", ".csv", ".md"):
        ta, tb = _norm_text(a.read_text(), roots), _norm_text(b.read_text(), roots)
        if ta == tb:
            return None
        la, lb = ta.splitlines(), tb.splitlines()
        pairs = zip(la, lb, strict=False)
        i = next((i for i, (x, y) in enumerate(pairs) if x != y), min(len(la), len(lb)))
        shown = [repr(lines[i][:60]) if i < len(lines) else "end of file" for lines in (la, lb)]
        return f"{rel}: text differs from line {i + 1}: {shown[0]} vs {shown[1]}"
    return None if a.read_bytes() == b.read_bytes() else f"{rel}: bytes differ"


@dataclass
class Comparison:
    files: int = 0
    artifacts: int = 0
    excluded: int = 0
    differences: list[str] = field(default_factory=list)
    reused: int = 0  # per-image items an attempt found on disk and kept
    resumed: list[str] = field(default_factory=list)  # trainings that went on from last.ckpt
    tmp_left: list[Path] = field(default_factory=list)  # in the campaign's TMPDIR at the end
    copied: int = 0  # stages the campaign copied from its donor (DONE.json reused_from)
    copies_left: int = 0  # hidden .reuse-* folders left in the campaign's run (each a difference)


def resumption(run_dir: Path, result: Comparison) -> None:
    """What the campaign's stages reused after the kills, from DONE.json's metrics.resume."""
    for done_file in sorted(run_dir.glob("round_*/*/DONE.json")):
        done = json.loads(done_file.read_text())
        result.copied += DONOR_KEY in done
        resume = done.get("metrics", {}).get(ATTEMPT_KEY) or {}
        result.reused += int(resume.get("reused", 0))
        if resume.get("resumed_from_step", 0) > 0:
            where = f"{done_file.parent.parent.name} {done_file.parent.name}"
            result.resumed.append(f"{where} (step {resume['resumed_from_step']})")


def compare_runs(ref_dir: Path, camp_dir: Path, roots: tuple[Path, Path]) -> Comparison:
    result = Comparison()
    ref_files, camp_files = run_files(ref_dir), run_files(camp_dir)
    artifacts = artifact_files(ref_dir) | artifact_files(camp_dir)
    for rel in sorted(ref_files | camp_files):
        if rel.name.endswith(".tmp"):
            result.differences.append(f"{rel}: leftover temp file of an interrupted write")
            continue
        if excluded(rel):
            result.excluded += 1
            continue
        if rel not in camp_files or rel not in ref_files:
            where = "reference" if rel in ref_files else "campaign"
            result.differences.append(f"{rel}: only in the {where} run")
            continue
        result.files += 1
        result.artifacts += rel in artifacts
        diff = compare_file(rel, ref_dir, camp_dir, roots)
        if diff:
            result.differences.append(diff)
    resumption(camp_dir, result)
    for left in sorted(camp_dir.glob(f"round_*/{REUSE_GLOB}")):  # empty ones included
        result.copies_left += 1
        result.differences.append(f"{left.relative_to(camp_dir)}: a reuse copy left behind")
    return result


# ----------------------------------------------------------------------------- report


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(
    args: argparse.Namespace,
    command: list[str],
    timeline: list[tuple[int, str]],
    campaign: Campaign,
    comparison: Comparison,
    ref_wall: float,
) -> str:
    kills = campaign.kills
    delivered = [k for k in kills if k.landed != "not delivered"]
    mid = [k for k in delivered if k.landed == "mid-stage"]
    stage_names = list(dict.fromkeys(s for _, s in timeline))
    in_copy = [k for k in delivered if k.landed == "during reuse copy"]
    hist = Counter(k.stage[1] for k in mid + in_copy)
    rounds_of = {s: sorted({k.stage[0] for k in mid + in_copy if k.stage[1] == s}) for s in hist}
    left = comparison.tmp_left
    mb = sum(p.stat().st_size for p in left) / 1e6
    summary = [
        ["command", f"`python train.py {' '.join(command)}`"],
        ["stages x rounds", f"{len(stage_names)} x {len(timeline) // max(1, len(stage_names))}"],
        ["kills planned / delivered", f"{len(kills)} / {len(delivered)}"],
        ["landed mid-stage", str(len(mid))],
        ["landed between stages", str(sum(k.landed == "between stages" for k in delivered))],
        ["landed during startup", str(sum(k.landed == "startup" for k in delivered))],
        [
            "landed during a reuse copy",
            str(sum(k.landed == "during reuse copy" for k in delivered)),
        ],
        ["landed after a reuse copy", str(sum(k.landed == "after reuse copy" for k in delivered))],
        ["attempts (kills + the finishing run)", str(campaign.attempts)],
        ["per-image outputs reused by a resumed stage", str(comparison.reused)],
        ["trainings resumed from last.ckpt", ", ".join(comparison.resumed) or "none"],
        ["stages copied from the donor (reuse_from)", str(comparison.copied)],
        [".reuse-* folders left in the campaign's run", str(comparison.copies_left)],
        [
            "files compared (DONE.json artifacts among them)",
            f"{comparison.files} ({comparison.artifacts})",
        ],
        ["files excluded (logs, Hydra record, RUNNING.json, results.md)", str(comparison.excluded)],
        ["files left in the campaign's TMPDIR (not a difference)", f"{len(left)} ({mb:.1f} MB)"],
        ["differences", str(len(comparison.differences))],
        ["reference wall time", f"{ref_wall:.1f} s"],
        ["campaign wall time", f"{campaign.wall_s:.1f} s"],
        ["extra time the kills cost", f"{campaign.wall_s - ref_wall:+.1f} s"],
    ]
    hist_rows = [
        [s, str(hist.get(s, 0)), ", ".join(map(str, rounds_of.get(s, []))) or "-"]
        for s in stage_names
    ]
    kill_rows = [
        [
            str(i + 1),
            f"r{k.target[0]} {k.target[1]}",
            f"{k.delay:.2f}",
            k.landed if k.stage is None else f"{k.landed}: r{k.stage[0]} {k.stage[1]}",
            f"{k.attempt_s:.1f}",
        ]
        for i, k in enumerate(kills)
    ]
    text = (
        f"# Fault campaign (--kills {args.kills}, --seed {args.seed}"
        f"{', --fast' if args.fast else ''}"
        f"{f', --reuse --copy-pause {args.copy_pause}' if args.reuse else ''})\n\n"
        + table(["", ""], summary)
        + "\n\nKills that landed mid-stage or during a reuse copy, by stage (and the rounds they "
        "hit):\n\n"
        + table(["stage", "kills", "rounds"], hist_rows)
        + "\n\nEvery kill:\n\n"
        + table(["#", "target", "delay s", "landed", "attempt s"], kill_rows)
        + "\n\nDifferences:\n\n"
        + ("\n".join(f"- {d}" for d in comparison.differences) or "none")
        + "\n"
    )
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs to deliver (>= 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill plan")
    parser.add_argument("--experiment", help="conf/experiment config (default: train.yaml's)")
    parser.add_argument("--fast", action="store_true", help="debug=tiny: the tests' tiny set")
    parser.add_argument("--workdir", type=Path, help="folder for both roots (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse in the loop: the campaign copies stages from the reference (reuse_from), "
        "every kill lands during a copy",
    )
    parser.add_argument(
        "--copy-pause",
        type=float,
        default=0.05,
        help="--reuse: seconds slept before each file of a copy (widens the copy window)",
    )
    parser.add_argument("overrides", nargs="*", help="extra key=value for train.py")
    args = parser.parse_args()
    if args.kills < 1:
        parser.error("--kills must be >= 1")

    command = [f"experiment={args.experiment}"] if args.experiment else []
    command += fast_overrides() if args.fast else []
    command += args.overrides
    if not any(o.startswith("callbacks.rich_progress_bar=") for o in command):
        command.append("callbacks.rich_progress_bar=null")  # no progress bars in the logs
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="faults_"))).resolve()
    ref_root, camp_root, logs = work / "reference", work / "campaign", work / "logs"
    ours = [ref_root, camp_root, logs, tmp_dir(ref_root), tmp_dir(camp_root), work / "shared"]
    for p in ours:
        if p.exists():
            shutil.rmtree(p)
    for p in ours[:-1]:
        p.mkdir(parents=True)

    # One data folder for both runs, generated here (deterministic), copied into each root.
    from src.datamodules import prepare_data

    data_cfg = compose(command, work / "shared")
    prepare_data(data_cfg.data)
    for root in (ref_root, camp_root):
        shutil.copytree(work / "shared" / "data", root / "data", symlinks=True)

    ref_cfg, camp_cfg = compose(command, ref_root), compose(command, camp_root)
    ref_dir, camp_dir = Path(ref_cfg.paths.run_dir), Path(camp_cfg.paths.run_dir)
    ref_command, camp_command = command, command
    if args.reuse:  # each names the other as donor: config.yaml differs by the roots only
        ref_command = [*command, f"reuse_from=['{camp_dir}']"]
        camp_command = [*command, f"reuse_from=['{ref_dir}']"]
    print(f"work folder {work}; reference run ...", flush=True)
    ref_wall = run_to_end(ref_root, ref_command, logs / "reference.log")
    timeline = [(r, s) for r in range(ref_cfg.round + 1) for s in ref_cfg.stages]
    ref_seconds = {
        inst: json.loads((ref_dir / f"round_{inst[0]}" / inst[1] / "DONE.json").read_text())[
            "seconds"
        ]
        for inst in timeline
    }
    print(
        f"reference {ref_wall:.1f} s ({sum(ref_seconds.values()):.1f} s in "
        f"{len(timeline)} stages); campaign of {args.kills} kills ...",
        flush=True,
    )
    copy_pause = args.copy_pause if args.reuse else None
    targets, windows = timeline, ref_seconds
    if args.reuse:  # the copied stages; each kill within its copy's window
        from src.pipeline.stages import STAGES

        targets = [inst for inst in timeline if STAGES[inst[1]].reuse]
        windows = {
            inst: args.copy_pause * copied_files(ref_dir / f"round_{inst[0]}" / inst[1])
            for inst in targets
        }
    plan = plan_kills(targets, args.kills, args.seed)
    campaign = run_campaign(
        camp_root, camp_command, camp_dir, targets, windows, plan, logs, copy_pause
    )
    campaign.kills = plan
    comparison = compare_runs(ref_dir, camp_dir, (ref_root, camp_root))
    comparison.tmp_left = [p for p in tmp_dir(camp_root).rglob("*") if p.is_file()]

    text = report(args, camp_command, timeline, campaign, comparison, ref_wall)
    print(text)
    out = OUTPUTS / "bench" / "faults.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")
    if comparison.differences or args.keep:
        print(f"work folder kept: {work}")
    else:
        for p in ours:
            shutil.rmtree(p)
        if args.workdir is None:
            work.rmdir()
    sys.exit(1 if comparison.differences else 0)


if __name__ == "__main__":
    main()
