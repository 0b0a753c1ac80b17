"""Does the CPU segmenter recipe hold up on data it was not tuned on? (prints a table only).

    python bench/off_home_sets.py [--sets synth synth_small synth_many synth_voc21]
                                  [--seeds 0] [--weak] [--jobs 2] [key=value ...]

For each generated data config (the home set `synth` and three that differ from it: small objects,
12 classes, 8 classes written into the 21-class VOC label space; see conf/data/) it runs the
fully supervised bound, `python train.py experiment=synth_supervised data=<set>` (DeepLab-v2 with
`segmenter=synth`: backbone from the image-label classifier, class-balanced CE), and with
--weak also round 0 of the weakly supervised pipeline (`experiment=synth_conta round=0`: CAM,
IRNet pseudo-masks, the same segmenter trained on them). Runs are named off_home_<set>_{bound,weak}
and resume like any run. Prints, per set, the object sizes and classes of the generated data, the
val mIoU of the segmenter and with the CRF, its incomplete-foreground share (IF: foreground
predicted as background, the symptom of a collapsed segmenter) and the all-background mIoU (what a
segmenter that predicts background everywhere scores). Writes outputs/bench/off_home_sets.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from conta_vs_baseline import OUTPUTS, ROOT, mean_std, run_train, table

sys.path.insert(0, str(ROOT))

from src.datamodules.palette import read_label_png  # noqa: E402
from src.evaluation.metrics import SegmentationMetric  # noqa: E402

SETS = ("synth", "synth_small", "synth_many", "synth_voc21")


def run_dir(name: str, seed: int):
    return OUTPUTS / name / f"seed_{seed}"


def round0(name: str, seed: int) -> dict:
    path = run_dir(name, seed) / "results.json"
    return json.loads(path.read_text())["rounds"]["0"]


def all_background_miou(data_root: Path, num_classes: int) -> float:
    """mIoU of predicting background everywhere on the val masks, with the project's metric."""
    metric = SegmentationMetric(num_classes)
    ids = (data_root / "ImageSets" / "Segmentation" / "val.txt").read_text().split()
    for image_id in ids:
        label = read_label_png(data_root / "SegmentationClass" / f"{image_id}.png")
        metric.update(np.zeros_like(label), label)
    return float(metric.compute()["miou"])


def data_facts(name: str, seed: int) -> dict:
    """Classes, object sizes and all-background mIoU of the data set a run used."""
    cfg = yaml.safe_load((run_dir(name, seed) / "config.yaml").read_text())
    root = Path(cfg["data"]["root"])
    stats = json.loads((root / "meta.json").read_text())["stats"]["train"]
    return {
        "classes": cfg["data"]["generator"].get("num_classes", 6),
        "label_space": cfg["data"]["num_classes"],
        "area": stats["object_area"]["mean"],
        "visible": stats["visible_area_mean"],
        "bg_miou": all_background_miou(root, cfg["data"]["num_classes"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sets", nargs="+", default=list(SETS), help="conf/data configs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--weak", action="store_true", help="also round 0 of synth_conta")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (threads split)")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    logs = OUTPUTS / "bench" / "logs"
    kinds = {"bound": ["experiment=synth_supervised"]}
    if args.weak:
        kinds["weak"] = ["experiment=synth_conta", "round=0", "upper_bound=null"]

    def job(spec: tuple[str, str, int]) -> None:
        data, kind, seed = spec
        name = f"off_home_{data}_{kind}"
        run_train(
            [
                *kinds[kind],
                f"data={data}",
                f"experiment_name={name}",
                f"seed={seed}",
                *args.overrides,
            ],
            threads,
            logs / f"{name}_{seed}.log",
        )

    specs = [(d, k, s) for d in args.sets for k in kinds for s in args.seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(job, specs))

    headers = ["Data", "Classes (label space)", "Object area (visible)", "All-background"]
    for kind in kinds:
        headers += [f"{kind} seg", f"{kind} seg+CRF", f"{kind} IF"]
    if args.weak:
        headers += ["weak pseudo"]
    rows = []
    for data in args.sets:
        facts = data_facts(f"off_home_{data}_bound", args.seeds[0])
        row = [
            data,
            f"{facts['classes']} ({facts['label_space']})",
            f"{100 * facts['area']:.1f} % ({100 * facts['visible']:.1f} %)",
            f"{100 * facts['bg_miou']:.1f}",
        ]
        for kind in kinds:
            res = [round0(f"off_home_{data}_{kind}", s) for s in args.seeds]
            row += [
                mean_std([r.get("seg_miou") for r in res]),
                mean_std([r.get("seg_crf_miou") for r in res]),
                mean_std([(r.get("seg_errors") or {}).get("incomplete_foreground") for r in res]),
            ]
        if args.weak:
            weak = [round0(f"off_home_{data}_weak", s) for s in args.seeds]
            row.append(mean_std([r.get("pseudo_miou") for r in weak]))
        rows.append(row)
    text = (
        f"# The CPU segmenter off its home set (seeds {args.seeds}; val mIoU %, mean ± std)\n\n"
        + table(headers, rows)
        + "\n"
    )
    print(text)
    out = OUTPUTS / "bench" / "off_home_sets.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
