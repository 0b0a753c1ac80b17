"""The experiment that shows the method: synth_conta over several seeds, per round, plus variants.

    python bench/conta_vs_baseline.py [--data synth] [--confounder layout|texture|both|twins]
                                      [--seeds 0 1 2 3 4] [--rounds 1] [--ablation-rounds 1]
                                      [--ablations paper gt_c shuffled_m ...] [--jobs 2]
                                      [--name RUN] [key=value ...]

Every run is `python train.py experiment=synth_conta data=D seed=S round=T` (plus
`data.generator.confounder=C` for a generated set; finished stages are skipped, so re-running the
script only computes what is missing). Runs are named conta_bench_<data>[_<confounder>], or
--name. Any data config works, e.g. your own VOC-layout folder:

    python bench/conta_vs_baseline.py --data voc --name mine data.root=/path/to/VOCdevkit/VOC2012

(the CPU recipes of synth_conta on your images; context-leakage rows appear only where the
split configs name context maps, `data.splits.<split>.context`). Variants are separate runs
(experiment_name=<run>_<variant>) that start from a copy of the seed's round 0: its stages carry
the same config hashes (every stage's seed is the same in every round), so the driver reuses
them and redoes only what the variant changes (the confounders for source / prior / encoding
variants, rounds >= 1 for all).

Prints, per round, mean ± std over seeds of CAM, pseudo-mask, seg and seg+CRF mIoU, context
leakage, the error decomposition of the pseudo-masks and the context diagnostics (is M alive?);
the CONTA gain (round T - round 0) paired across seeds with its 95 % CI, a paired t-test and the
minimum detectable effect (MDE: the smallest true gain this many seeds would detect with 80 %
power at the 5 % level, given the measured spread); and each variant's round-`--ablation-rounds`
numbers and gain next to the default's, and the default − variant difference (paired by seed,
with its CI: which part of CONTA a gain comes from). Primary endpoints: pseudo-mask mIoU and
context leakage on train; secondary: seg and seg+CRF on val. Writes the same tables to
outputs/bench/conta_vs_baseline_<run>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
EXPERIMENT = "synth_conta"
PRIMARY = ("pseudo_miou", "pseudo_context_leakage")
POWER = 0.8
ABLATIONS = {
    # The paper-literal module where the author puts it: the ablation of our calibration.
    "paper": ["conta.context=paper", "conta.inject_at=layer4_out"],
    "gt_c": ["conta.c_source=gt"],  # C and m from the ground truth: the ceiling
    "shuffled_m": ["conta.m_source=shuffled"],  # another image's m: must not help
    # C without class information: every c_i = the mean of C (alpha uniform, one M for all)
    "mean_c": ["conta.c_source=mean"],
    # No per-image attention: alpha = P(c) whatever m (one M for every image, C kept)
    "prior_attention": ["conta.attention=prior"],
    "zero_m": ["conta.ablate=zero_m"],  # M forced to zero: must equal round 0
    "inject_layer4_out": ["conta.inject_at=layer4_out"],
    "post_conv_3x3": ["conta.inject_at=layer4_out", "conta.post_concat_conv=3x3"],
    "encoding_class_id": ["conta.mask_encoding=class_id"],
    "prior_empirical": ["conta.prior=empirical"],
    "init_finetune": ["conta.init=finetune"],
}
METRICS = [
    ("CAM", "cam_miou"),
    ("CAM best", "cam_best_miou"),
    ("Pseudo", "pseudo_miou"),
    ("Seg", "seg_miou"),
    ("Seg+CRF", "seg_crf_miou"),
    ("Leak CAM", "cam_context_leakage"),
    ("Leak pseudo", "pseudo_context_leakage"),
    ("Leak seg", "seg_context_leakage"),
]
CONTEXT = [
    ("alpha_max", "context.alpha_max"),
    ("alpha_entropy", "context.alpha_entropy"),
    ("m_spread", "context.m_spread"),
    ("m_logit_share", "context.m_logit_share"),
]
ERRORS = [
    ("IF", "incomplete_foreground"),
    ("OA", "object_ambiguity"),
    ("IB", "incomplete_background"),
]


def run_train(args: list[str], threads: int, log: Path) -> None:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(ROOT / "train.py"), *args, "callbacks.rich_progress_bar=null"]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode}); see {log}")


def run_name(data: str, confounder: str | None) -> str:
    """The bench's own runs, never `make train`'s (synth_conta): CPU results are bit-exact only
    at one thread count (OMP_NUM_THREADS), and a variant compared with a round 0 computed at
    another one differs by float rounding amplified through training, not by M alone."""
    return f"conta_bench_{data}" + (f"_{confounder}" if confounder else "")


def generated(data: str) -> bool:
    """Whether data config `data` is a generated set (composes with a `generator`, so it has a
    confounder to choose)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        try:
            cfg = compose("train", overrides=[f"experiment={EXPERIMENT}", f"data={data}"])
        except ConfigCompositionException as err:
            raise SystemExit(f"--data {data}: {err}. Use one of conf/data/*.yaml") from None
    return "generator" in cfg.data


def rounds_of(name: str, seed: int) -> dict:
    path = OUTPUTS / name / f"seed_{seed}" / "results.json"
    return json.loads(path.read_text())["rounds"]


def value(row: dict, key: str) -> float | None:
    if key.startswith("pseudo_err_"):
        return (row.get("pseudo_errors") or {}).get(key[len("pseudo_err_") :])
    if key.startswith("context."):
        return (row.get("context") or {}).get(key[len("context.") :])
    return row.get(key)


def paired_gain(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
    """(mean, std, 95 % CI half-width, t-test p) of b - a in points, paired across seeds."""
    diff = 100 * (np.array(b) - np.array(a))
    if len(diff) < 2:
        return float(diff.mean()), 0.0, float("nan"), float("nan")
    sd = float(diff.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(diff) - 1) * sd / np.sqrt(len(diff)))
    p = float(stats.ttest_rel(b, a).pvalue) if sd > 0 else float("nan")
    return float(diff.mean()), sd, half, p


def min_detectable_effect(sd: float, n: int, power: float = POWER) -> float:
    """Smallest true paired gain (points) a two-sided 5 % t-test on n seeds detects with
    probability `power`, for a per-seed difference spread `sd` (normal approximation of the
    noncentral t: (t_0.975 + t_power) * sd / sqrt(n))."""
    if n < 2:
        return float("nan")
    df = n - 1
    return float((stats.t.ppf(0.975, df) + stats.t.ppf(power, df)) * sd / np.sqrt(n))


def mean_std(values: list[float | None], scale: float = 100, digits: int = 1) -> str:
    """mean ± std over seeds (the value alone for one seed); fractions as % by default."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:  # one seed: no spread to show
        return f"{vals[0]:.{digits}f}"
    return f"{np.mean(vals):.{digits}f} ± {np.std(vals, ddof=1):.{digits}f}"


def ctx_mean_std(values: list[float | None]) -> str:
    """The context diagnostics are ratios, shown as they are."""
    return mean_std(values, scale=1, digits=3)


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def keys(results: dict[int, dict] | None = None) -> list[tuple[str, str]]:
    """The metric columns; with `results`, only those some run reports (no leakage columns on a
    data set without context maps)."""
    every = METRICS + [(f"{a} pseudo", f"pseudo_err_{k}") for a, k in ERRORS]
    if results is None:
        return every
    rows = [row for res in results.values() for row in res.values()]
    return [(n, k) for n, k in every if any(value(row, k) is not None for row in rows)]


def per_round_table(results: dict[int, dict], n_rounds: int) -> str:
    headers = ["Round", *[name for name, _ in keys(results)]]
    rows = []
    for r in range(n_rounds + 1):
        rows.append(
            [str(r)]
            + [
                mean_std([value(res[str(r)], k) for res in results.values()])
                for _, k in keys(results)
            ]
        )
    return table(headers, rows)


def context_table(results: dict[int, dict], n_rounds: int) -> str:
    headers = ["Round", *[name for name, _ in CONTEXT]]
    rows = [
        [str(r)]
        + [ctx_mean_std([value(res[str(r)], k) for res in results.values()]) for _, k in CONTEXT]
        for r in range(1, n_rounds + 1)
    ]
    return table(headers, rows)


def gain_table(results: dict[int, dict], last: int) -> str:
    headers = ["Metric", "round 0", f"round {last}", "gain (pts)", "95 % CI", "p", "MDE (80 %)"]
    rows = []
    for name, key in keys(results):
        a = [value(res["0"], key) for res in results.values()]
        b = [value(res[str(last)], key) for res in results.values()]
        if any(v is None for v in a + b):
            continue
        mean, sd, half, p = paired_gain(a, b)
        rows.append(
            [
                f"**{name}**" if key in PRIMARY else name,
                mean_std(a),
                mean_std(b),
                f"{mean:+.1f} ± {sd:.1f}",
                f"[{mean - half:+.1f}, {mean + half:+.1f}]",
                f"{p:.3f}",
                f"{min_detectable_effect(sd, len(a)):.1f}",
            ]
        )
    return table(headers, rows)


def ablation_table(base: dict[int, dict], ablations: dict[str, dict[int, dict]], r: int) -> str:
    cols = [
        ("CAM", "cam_miou"),
        ("Pseudo", "pseudo_miou"),
        ("Seg", "seg_miou"),
        ("Seg+CRF", "seg_crf_miou"),
        ("Leak pseudo", "pseudo_context_leakage"),
    ]
    gains = [
        ("Pseudo", "pseudo_miou"),
        ("Leak pseudo", "pseudo_context_leakage"),
        ("Seg+CRF", "seg_crf_miou"),
    ]
    reported = set(keys(base))
    cols, gains = [c for c in cols if c in reported], [g for g in gains if g in reported]
    headers = [
        f"Variant (round {r})",
        *[n for n, _ in cols],
        *[f"{n} gain vs r0 [95 % CI]" for n, _ in gains],
        # Which part of CONTA a gain comes from: the default against each control, same seeds.
        *[f"{n}: default − variant [95 % CI]" for n, _ in gains],
        "alpha_max",
        "m_logit_share",
    ]
    rows = []
    for name, res in [("default (calibrated, layer4_in)", base), *ablations.items()]:
        cells = [mean_std([value(x[str(r)], k) for x in res.values()]) for _, k in cols]
        seeds = list(res)
        for _, key in gains:  # the variant's round r against round 0 of the same seed
            a = [value(base[s]["0"], key) for s in seeds]
            cells.append(ci_cell(a, [value(res[s][str(r)], key) for s in seeds]))
        for _, key in gains:  # the default against the variant, both at round r
            a = [value(res[s][str(r)], key) for s in seeds]
            b = [value(base[s][str(r)], key) for s in seeds]
            cells.append("–" if res is base else ci_cell(a, b))
        for key in ("context.alpha_max", "context.m_logit_share"):
            cells.append(ctx_mean_std([value(x[str(r)], key) for x in res.values()]))
        rows.append([name, *cells])
    return table(headers, rows)


def ci_cell(a: list[float | None], b: list[float | None]) -> str:
    """b − a paired across seeds as "gain [95 % CI]" in points; "–" where a value is missing."""
    if any(v is None for v in a + b):
        return "–"
    mean, _, half, _ = paired_gain(a, b)
    return f"{mean:+.1f} [{mean - half:+.1f}, {mean + half:+.1f}]"


def seed_round0_copy(base: str, name: str, seed: int) -> None:
    """Start a variant from the default run's round 0 (reused where the hashes match)."""
    src = OUTPUTS / base / f"seed_{seed}" / "round_0"
    dst = OUTPUTS / name / f"seed_{seed}" / "round_0"
    if not dst.exists():
        shutil.copytree(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="synth", help="a conf/data config (synth, voc, ...)")
    parser.add_argument(
        "--confounder",
        default="layout",
        choices=["layout", "texture", "both", "twins", "twins_same_hue"],
        help="generated sets only (data configs with a generator)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--rounds", type=int, default=1, help="T of the main runs")
    parser.add_argument("--ablation-rounds", type=int, default=1)
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=["paper", "gt_c", "shuffled_m"],
        choices=list(ABLATIONS),
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads split)")
    parser.add_argument("--name", help="run name (default conta_bench_<data>[_<confounder>])")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    logs = OUTPUTS / "bench" / "logs"
    confounder = args.confounder if generated(args.data) else None
    base = args.name or run_name(args.data, confounder)
    common = [
        f"experiment={EXPERIMENT}",
        f"data={args.data}",
        f"experiment_name={base}",
        *([f"data.generator.confounder={confounder}"] if confounder else []),
        "upper_bound=null",
        *args.overrides,
    ]

    def main_run(seed: int) -> None:
        run_train(
            [*common, f"seed={seed}", f"round={args.rounds}"],
            threads,
            logs / f"{base}_{seed}.log",
        )

    def ablation_run(job: tuple[str, int]) -> None:
        name, seed = job
        variant = f"{base}_{name}"
        seed_round0_copy(base, variant, seed)
        run_train(
            [
                *common,
                f"experiment_name={variant}",
                f"seed={seed}",
                f"round={args.ablation_rounds}",
                *ABLATIONS[name],
            ],
            threads,
            logs / f"{variant}_{seed}.log",
        )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(main_run, args.seeds))
        list(pool.map(ablation_run, [(a, s) for a in args.ablations for s in args.seeds]))

    results = {s: rounds_of(base, s) for s in args.seeds}
    ablations = {a: {s: rounds_of(f"{base}_{a}", s) for s in args.seeds} for a in args.ablations}
    on = f"data={args.data}" + (f", confounder={confounder}" if confounder else "")
    parts = [
        f"# CONTA vs the IRNet baseline, {on} (seeds {args.seeds}, mean ± std, %)",
        "",
        "## Per round",
        per_round_table(results, args.rounds),
        "",
        "## Context diagnostics (is M alive, does it reach the logits?)",
        context_table(results, args.rounds),
        "",
        f"## Gain of round {args.rounds} over round 0 (paired across seeds, t-based 95 % CI)",
        gain_table(results, args.rounds),
    ]
    if ablations:
        parts += ["", "## Variants", ablation_table(results, ablations, args.ablation_rounds)]
    text = "\n".join(parts) + "\n"
    print(text)
    out = OUTPUTS / "bench" / f"conta_vs_baseline_{base}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
