"""The CONTA benchmark's statistics, and the pipeline it drives on a plain VOC-layout folder."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import open_dict
from scipy import stats

from src.datamodules.synthetic import ensure_synthetic_voc
from src.train import train
from tests.conftest import TINY, compose_cfg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import conta_vs_baseline as bench  # noqa: E402

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


def test_paired_gain_is_the_t_interval_of_the_differences():
    a, b = [0.50, 0.52, 0.47, 0.55, 0.49], [0.53, 0.52, 0.50, 0.58, 0.50]
    mean, sd, half, p = bench.paired_gain(a, b)
    diff = 100 * (np.array(b) - np.array(a))
    lo, hi = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
    assert mean == pytest.approx(diff.mean())
    assert sd == pytest.approx(diff.std(ddof=1))
    assert (mean - half, mean + half) == pytest.approx((lo, hi))
    assert p == pytest.approx(stats.ttest_rel(b, a).pvalue)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_min_detectable_effect_has_the_stated_power(n):
    """A true gain of one MDE is detected by the paired t-test about 80 % of the time."""
    sd = 2.0
    mde = bench.min_detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    diffs = rng.normal(mde, sd, size=(20000, n))
    t = diffs.mean(1) / (diffs.std(1, ddof=1) / np.sqrt(n))
    power = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    # The t-quantile formula is a close approximation of the noncentral t's exact power.
    assert 0.76 <= power <= 0.84, power
    assert bench.min_detectable_effect(sd, 1) != bench.min_detectable_effect(sd, 1)  # NaN


def test_leakage_columns_only_where_a_run_reports_them():
    with_maps = {0: {"0": {"pseudo_miou": 0.5, "pseudo_context_leakage": 0.1}}}
    without = {0: {"0": {"pseudo_miou": 0.5, "pseudo_context_leakage": None}}}
    assert ("Leak pseudo", "pseudo_context_leakage") in bench.keys(with_maps)
    names = [k for _, k in bench.keys(without)]
    assert "pseudo_miou" in names and not any("leakage" in k for k in names)
    assert "Leak" not in bench.per_round_table(without, 0)


def test_variant_rows_pair_the_default_against_each_control():
    """A control's row gives its gain over round 0 and the default − control difference, both
    paired by seed; the default's own row has no difference with itself."""
    r0, default, control = [0.60, 0.62, 0.58], [0.63, 0.66, 0.60], [0.61, 0.62, 0.61]
    base = {s: {"0": {"pseudo_miou": r0[s]}, "1": {"pseudo_miou": default[s]}} for s in range(3)}
    shuffled = {s: {"1": {"pseudo_miou": control[s]}} for s in range(3)}
    rows = bench.ablation_table(base, {"shuffled_m": shuffled}, 1).splitlines()
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = {
        r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows[2:]
    }
    gain_col = header.index("Pseudo gain vs r0 [95 % CI]")
    diff_col = header.index("Pseudo: default − variant [95 % CI]")
    assert cells["shuffled_m"][diff_col] == bench.ci_cell(control, default) == "+1.7 [-4.6, +7.9]"
    assert cells["shuffled_m"][gain_col] == bench.ci_cell(r0, control) == "+1.3 [-2.5, +5.1]"
    assert cells["default (calibrated, layer4_in)"][diff_col] == "–"


@pytest.fixture(scope="module")
def voc_layout_folder(tmp_path_factory) -> Path:
    """A plain VOC-layout folder as a user would bring it: JPEGImages, SegmentationClass
    (8 classes written into the 21-class label space), ImageSets; ContextRegions kept so a run
    can opt in to them; no meta.json (not a generated set)."""
    root = tmp_path_factory.mktemp("mine") / "VOC2012"
    ensure_synthetic_voc(
        root,
        num_train=24,
        num_val=8,
        image_size=64,
        confounder="layout",
        num_classes=8,
        label_ids=(1, 3, 6, 8, 12, 14, 15, 19),
    )
    (root / "meta.json").unlink()
    shutil.rmtree(root / "annotations")
    return root


@pytest.mark.parametrize("context", [False, True])
def test_the_bench_pipeline_runs_on_a_voc_layout_folder(voc_layout_folder, tmp_path, context):
    """What `bench/conta_vs_baseline.py --data voc data.root=...` runs, up to the pseudo-masks:
    leakage is reported only when the split config names context maps."""
    overrides = [
        "experiment=synth_conta",
        "data=voc",
        f"data.root={voc_layout_folder}",
        "data.train_split=train",
        "round=0",
        "upper_bound=null",
        "stages=[train_cam,make_cams,eval_cams,make_ir_labels,train_affinity,"
        "make_pseudo_masks,eval_pseudo]",
        TINY,
    ]
    if context:
        overrides.append("+data.splits.train.context=ContextRegions")
    cfg = compose_cfg(overrides, tmp_path)
    with open_dict(cfg):
        cfg.data.cache_dir = str(tmp_path / "cache")
    train(cfg)
    rounds = json.loads((Path(cfg.paths.run_dir) / "results.json").read_text())["rounds"]
    row = rounds["0"]
    assert 0 < row["pseudo_miou"] <= 1 and 0 < row["cam_miou"] <= 1
    reported = {k for _, k in bench.keys({0: rounds})}
    assert ("pseudo_context_leakage" in reported) == context
    assert ("cam_context_leakage" in reported) == context
