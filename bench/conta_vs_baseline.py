"""The experiment that shows the method: synth_conta over several seeds, per round, plus ablations.

    python bench/conta_vs_baseline.py [--seeds 0 1 2] [--rounds 2] [--ablation-rounds 1]
                                      [--ablations inject_layer4_in ...] [--jobs 2] [key=value ...]

Every run is `python train.py experiment=synth_conta seed=S round=T` (finished stages are
skipped, so re-running the script only computes what is missing). Ablations are separate runs
(experiment_name=synth_conta_<ablation>) that start from a copy of the seed's round 0: its stages
carry the same config hashes, so the driver reuses them and redoes only what the ablation
changes (the confounders for prior / encoding ablations, rounds >= 1 for all).

Prints, per round, mean ± std over seeds of CAM, pseudo-mask, seg and seg+CRF mIoU, context
leakage and the error decomposition of the pseudo-masks; the CONTA gain (round T - round 0) with
a paired t-test across seeds; and each ablation's round-`--ablation-rounds` numbers next to the
default's. Writes the same tables to outputs/bench/conta_vs_baseline.md.
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
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = ROOT / "outputs"
EXPERIMENT = "synth_conta"
ABLATIONS = {
    "inject_layer4_in": ["conta.inject_at=layer4_in"],
    "post_conv_3x3": ["conta.post_concat_conv=3x3"],
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


def rounds_of(name: str, seed: int) -> dict:
    path = OUTPUTS / name / f"seed_{seed}" / "results.json"
    return json.loads(path.read_text())["rounds"]


def value(row: dict, key: str) -> float | None:
    if key.startswith("pseudo_err_"):
        return (row.get("pseudo_errors") or {}).get(key[len("pseudo_err_") :])
    return row.get(key)


def mean_std(values: list[float | None]) -> str:
    vals = [100 * v for v in values if v is not None]
    if not vals:
        return "–"
    return f"{np.mean(vals):.1f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.1f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def keys() -> list[tuple[str, str]]:
    return METRICS + [(f"{a} pseudo", f"pseudo_err_{k}") for a, k in ERRORS]


def per_round_table(results: dict[int, dict], n_rounds: int) -> str:
    headers = ["Round", *[name for name, _ in keys()]]
    rows = []
    for r in range(n_rounds + 1):
        rows.append(
            [str(r)]
            + [mean_std([value(res[str(r)], k) for res in results.values()]) for _, k in keys()]
        )
    return table(headers, rows)


def gain_table(results: dict[int, dict], last: int) -> str:
    headers = ["Metric", "round 0", f"round {last}", "gain (pts)", "paired t", "p"]
    rows = []
    for name, key in keys():
        a = [value(res["0"], key) for res in results.values()]
        b = [value(res[str(last)], key) for res in results.values()]
        if any(v is None for v in a + b):
            continue
        diff = 100 * (np.array(b) - np.array(a))
        t, p = stats.ttest_rel(b, a) if len(a) > 1 else (float("nan"), float("nan"))
        rows.append(
            [
                name,
                mean_std(a),
                mean_std(b),
                f"{diff.mean():+.1f} ± {diff.std(ddof=1) if len(diff) > 1 else 0:.1f}",
                f"{t:.2f}",
                f"{p:.3f}",
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
    headers = [f"Variant (round {r})", *[n for n, _ in cols], "Seg gain vs r0"]
    rows = []
    for name, res in [
        ("default (layer4_out, foreground, uniform, reinit)", base),
        *ablations.items(),
    ]:
        cells = [mean_std([value(x[str(r)], k) for x in res.values()]) for _, k in cols]
        gain = [
            None
            if value(x[str(r)], "seg_miou") is None
            else value(x[str(r)], "seg_miou") - value(base[s]["0"], "seg_miou")
            for s, x in res.items()
        ]
        rows.append([name, *cells, mean_std(gain)])
    return table(headers, rows)


def seed_round0_copy(name: str, seed: int) -> None:
    """Start an ablation from the default run's round 0 (reused where the hashes match)."""
    src = OUTPUTS / EXPERIMENT / f"seed_{seed}" / "round_0"
    dst = OUTPUTS / name / f"seed_{seed}" / "round_0"
    if not dst.exists():
        shutil.copytree(src, dst)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2, help="T of the main runs")
    parser.add_argument("--ablation-rounds", type=int, default=1)
    parser.add_argument(
        "--ablations",
        nargs="*",
        default=["inject_layer4_in", "encoding_class_id", "prior_empirical"],  # the paper's
        choices=list(ABLATIONS),
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads split)")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    logs = OUTPUTS / "bench" / "logs"

    def main_run(seed: int) -> None:
        run_train(
            [f"experiment={EXPERIMENT}", f"seed={seed}", f"round={args.rounds}", *args.overrides],
            threads,
            logs / f"{EXPERIMENT}_{seed}.log",
        )

    def ablation_run(job: tuple[str, int]) -> None:
        name, seed = job
        run_name = f"{EXPERIMENT}_{name}"
        seed_round0_copy(run_name, seed)
        run_train(
            [
                f"experiment={EXPERIMENT}",
                f"experiment_name={run_name}",
                f"seed={seed}",
                f"round={args.ablation_rounds}",
                *ABLATIONS[name],
                *args.overrides,
            ],
            threads,
            logs / f"{run_name}_{seed}.log",
        )

    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(main_run, args.seeds))
        list(pool.map(ablation_run, [(a, s) for a in args.ablations for s in args.seeds]))

    base = {s: rounds_of(EXPERIMENT, s) for s in args.seeds}
    ablations = {
        a: {s: rounds_of(f"{EXPERIMENT}_{a}", s) for s in args.seeds} for a in args.ablations
    }
    parts = [
        f"# CONTA vs the IRNet baseline on the synthetic set (seeds {args.seeds}, mean ± std, %)",
        "",
        "## Per round",
        per_round_table(base, args.rounds),
        "",
        f"## Gain of round {args.rounds} over round 0 (paired across seeds)",
        gain_table(base, args.rounds),
    ]
    if ablations:
        parts += ["", "## Ablations", ablation_table(base, ablations, args.ablation_rounds)]
    text = "\n".join(parts) + "\n"
    print(text)
    out = OUTPUTS / "bench" / "conta_vs_baseline.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
