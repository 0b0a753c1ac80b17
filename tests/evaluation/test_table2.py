"""Table 2 from a fabricated sweep: numbers, the baseline fallback, bad input, outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.evaluation.table2 import (
    Table2Error,
    build_table,
    find_results,
    gather_runs,
    mean_std,
    paired_diffs,
    render_markdown,
    t_interval,
    write_report,
)

ROOT = Path(__file__).resolve().parents[2]
T_975_DF2 = 4.302652729911275  # the 97.5 % quantile of Student's t with 2 dof (tables)

# Per seed 0, 1, 2, in %. irnet has every stage; seam has no segmenter (no seg keys).
IRNET_OFF = {"cam_miou": [50, 52, 54], "pseudo_miou": [60, 62, 64], "seg_miou": [55, 57, 59]}
IRNET_OFF["seg_crf_miou"] = [58, 60, 62]
IRNET_GAIN = {"cam_miou": [1, 2, 6], "pseudo_miou": [4, 4, 4], "seg_miou": [0, 1, 2]}
IRNET_GAIN["seg_crf_miou"] = [2, 3, 1]
SEAM_OFF = {"cam_miou": [40, 41, 45], "pseudo_miou": [50, 50, 53]}
SEAM_GAIN = {"cam_miou": [3, 0, 0], "pseudo_miou": [2, 2, 5]}


def _row(values: dict[str, list[float]], seed: int, plus: dict | None = None) -> dict:
    plus = plus or {}
    row = {k: (v[seed] + (plus[k][seed] if k in plus else 0)) / 100 for k, v in values.items()}
    return {**row, "cam_best_miou": 0.9, "seconds": {"train_cam": 1.0}}


def write_run(folder: Path, method: str, conta: bool, seed: int, rounds: dict, **top) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    results = {"experiment": f"{method}_{conta}", "seed": seed, "rounds": rounds}
    results.update({"method": method, "conta": conta, "data": "synth", **top})
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def on_rounds(off: dict, gain: dict, seed: int) -> dict:
    """Round 0 and 1 deliberately differ from the off run and from round 2 (the one reported)."""
    decoy = {k: [v - 10 for v in vals] for k, vals in off.items()}
    return {
        "0": _row(decoy, seed),
        "1": _row(decoy, seed, gain),
        "2": _row(off, seed, gain),
    }


def make_sweep(tmp_path: Path, methods=("irnet", "seam"), arms=(False, True)) -> Path:
    """Run folders under runs/, and a Hydra-like sweep folder whose jobs hold run_dir.txt."""
    sweep = tmp_path / "multirun" / "table2"
    job = 0
    for method in methods:
        off, gain = (IRNET_OFF, IRNET_GAIN) if method == "irnet" else (SEAM_OFF, SEAM_GAIN)
        for conta in arms:
            for seed in range(3):
                rounds = on_rounds(off, gain, seed) if conta else {"0": _row(off, seed)}
                run = tmp_path / "runs" / f"{method}_{conta}" / f"seed_{seed}"
                write_run(run, method, conta, seed, rounds)
                (sweep / str(job)).mkdir(parents=True)
                (sweep / str(job) / "run_dir.txt").write_text(str(run.resolve()) + "\n")
                job += 1
    return sweep


def _blocks(tmp_path, **kw):
    return {b.method: b for b in build_table(gather_runs([make_sweep(tmp_path, **kw)]))}


def test_means_stds_and_gains_equal_hand_computed_values(tmp_path):
    blocks = _blocks(tmp_path)
    irnet, seam = blocks["irnet"], blocks["seam"]
    cam = [v["cam_miou"] for v in irnet.baseline.values.values()]
    assert mean_std(cam) == pytest.approx((52.0, 2.0))
    crf_on = [v["seg_crf_miou"] for v in irnet.conta.values.values()]  # 60, 63, 63
    assert mean_std(crf_on) == pytest.approx((62.0, math.sqrt(3)))
    assert paired_diffs(irnet, "cam_miou") == pytest.approx([1, 2, 6])  # round 2, not 0 or 1
    assert paired_diffs(seam, "pseudo_miou") == pytest.approx([2, 2, 5])
    assert seam.keys == ("cam_miou", "pseudo_miou")  # no segmenter: Seg columns show "–"


def test_gain_ci_is_the_hand_computed_t_interval():
    diffs = [1, 2, 6]  # mean 3, sample std sqrt(7)
    half = T_975_DF2 * math.sqrt(7) / math.sqrt(3)
    assert t_interval(diffs) == pytest.approx((3.0, 3.0 - half, 3.0 + half))
    assert t_interval([2.5]) is None  # n = 1: no spread, no interval


def test_markdown_has_the_expected_rows(tmp_path):
    text = render_markdown(build_table(gather_runs([make_sweep(tmp_path)])))
    half = T_975_DF2 * math.sqrt(7) / math.sqrt(3)
    rows = [
        "| synth | irnet | conta=off runs, round 0 | 3 | 52.0 ± 2.0 | 62.0 ± 2.0 | 57.0 ± 2.0 "
        "| 60.0 ± 2.0 |",
        "| synth | irnet + CONTA | conta=on runs, round 2 | 3 | 55.0 ± 4.6 | 66.0 ± 2.0 "
        "| 58.0 ± 3.0 | 62.0 ± 1.7 |",
        f"| synth | gain of irnet + CONTA | paired by seed, mean [95 % CI] | 3 "
        f"| +3.0 [{3 - half:+.1f}, {3 + half:+.1f}] | +4.0 [+4.0, +4.0] |",
        "| synth | seam | conta=off runs, round 0 | 3 | 42.0 ± 2.6 | 51.0 ± 1.7 | – | – |",
    ]
    for row in rows:
        assert row in text


def test_baseline_falls_back_to_round_0_of_the_conta_runs(tmp_path):
    irnet = _blocks(tmp_path, methods=("irnet",), arms=(True,))["irnet"]
    assert "round 0 of the conta=on runs" in irnet.baseline.source
    # the decoy round 0 (10 points below the off numbers), paired with round 2 of the same runs
    assert [v["cam_miou"] for v in irnet.baseline.values.values()] == pytest.approx([40, 42, 44])
    assert paired_diffs(irnet, "cam_miou") == pytest.approx([11, 12, 16])


def test_one_seed_gives_a_gain_without_ci(tmp_path):
    write_run(tmp_path / "off", "irnet", False, 0, {"0": _row(IRNET_OFF, 0)})
    write_run(tmp_path / "on", "irnet", True, 0, on_rounds(IRNET_OFF, IRNET_GAIN, 0))
    text = render_markdown(build_table(gather_runs([tmp_path])))
    assert "| +1.0 (n = 1: no CI) |" in text
    assert "| 50.0 |" in text  # one seed: no ± std


def test_a_sweep_and_its_run_folders_count_each_run_once(tmp_path):
    sweep = make_sweep(tmp_path)
    assert len(find_results([sweep, tmp_path / "runs", tmp_path])) == 12


def test_duplicate_runs_are_an_error_naming_both_files(tmp_path):
    make_sweep(tmp_path)
    copy = write_run(
        tmp_path / "stale" / "seed_1", "seam", True, 1, on_rounds(SEAM_OFF, SEAM_GAIN, 1)
    )
    with pytest.raises(
        Table2Error, match="2 runs of data=synth method=seam conta=on seed=1"
    ) as err:
        gather_runs([tmp_path])
    assert str(copy / "results.json") in str(err.value)
    assert str(tmp_path / "runs" / "seam_True" / "seed_1" / "results.json") in str(err.value)


def test_a_run_missing_a_metric_is_an_error_naming_it(tmp_path):
    make_sweep(tmp_path)
    path = tmp_path / "runs" / "irnet_True" / "seed_2" / "results.json"
    results = json.loads(path.read_text())
    del results["rounds"]["2"]["seg_miou"]  # the last round's segmenter never finished
    path.write_text(json.dumps(results))
    with pytest.raises(Table2Error, match="no 'seg_miou'") as err:
        build_table(gather_runs([tmp_path]))
    assert str(path) in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a results.json of this project"),
        (
            '{"rounds": {"0": {"cam_miou": 0.5}}, "seed": 0}',
            "lacks \\['method', 'conta', 'data'\\]",
        ),
        (
            '{"rounds": {"0": {"cam_miou": "0.5"}}, "seed": 0, "method": "irnet", '
            '"conta": false, "data": "synth"}',
            "expected a fraction",
        ),
        (
            '{"rounds": {"0": {"cam_miou": 52.0}}, "seed": 0, "method": "irnet", '
            '"conta": false, "data": "synth"}',
            "expected a fraction",
        ),
        (
            '{"rounds": {"0": {"cam_miou": NaN}}, "seed": 0, "method": "irnet", '
            '"conta": false, "data": "synth"}',
            "expected a fraction",
        ),
        (
            '{"rounds": {"0": {"cam_miou": 0.5}}, "seed": 0, "method": "irnet", '
            '"conta": "yes", "data": "synth"}',
            "expected bool",
        ),
        (
            '{"rounds": {"0": {"cam_miou": 0.5}}, "seed": true, "method": "irnet", '
            '"conta": false, "data": "synth"}',
            "expected int",
        ),
        (
            '{"rounds": {"0": {"cam_miou": 0.5}}, "seed": 0, "method": "a | b", '
            '"conta": false, "data": "synth"}',
            "not a config name",
        ),
        (
            '{"rounds": {"0": {"cam_miou": 0.5}}, "seed": 0, "method": "irnet", '
            '"conta": true, "data": "synth"}',
            "round 0 only",
        ),
    ],
)
def test_a_malformed_file_is_an_error_naming_it(tmp_path, content, problem):
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(Table2Error, match=problem) as err:
        gather_runs([tmp_path])
    assert str(err.value).startswith(str(tmp_path / "results.json"))


def test_an_empty_folder_and_a_dangling_run_dir_txt_are_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(Table2Error, match="holds no results.json and no run_dir.txt"):
        gather_runs([tmp_path / "empty"])
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "run_dir.txt").write_text(str(tmp_path / "gone"))
    with pytest.raises(Table2Error, match="the job did not finish"):
        gather_runs([tmp_path / "job"])


def test_runs_ending_at_different_rounds_are_an_error(tmp_path):
    make_sweep(tmp_path, methods=("irnet",))
    path = tmp_path / "runs" / "irnet_True" / "seed_0" / "results.json"
    results = json.loads(path.read_text())
    del results["rounds"]["2"]
    path.write_text(json.dumps(results))
    with pytest.raises(Table2Error, match=r"end at different rounds \(1, 2, 2\)"):
        build_table(gather_runs([tmp_path]))


def test_write_report_writes_the_markdown_and_the_figure(tmp_path):
    text, files = write_report([make_sweep(tmp_path)], tmp_path / "out")
    assert files["markdown"].read_text() == text
    png = files["figure"].read_bytes()
    assert files["figure"].name == "table2.png" and png.startswith(b"\x89PNG") and len(png) > 5000


def test_cli_exits_2_with_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    done = subprocess.run(
        [sys.executable, str(ROOT / "report.py"), str(tmp_path / "empty")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "holds no results.json" in lines[0] and "Fix:" in lines[0]


def test_runs_that_name_no_method_are_left_out(tmp_path):
    """A supervised bound or a `_cam` run in the sweep folder (method null) has no row."""
    make_sweep(tmp_path)
    write_run(tmp_path / "bound" / "seed_0", None, False, 0, {"0": {"seg_miou": 0.9}})
    blocks = build_table(gather_runs([tmp_path]))
    assert [b.method for b in blocks] == ["irnet", "seam"]


def test_a_crf_scored_on_a_subset_is_marked_and_explained(tmp_path):
    """A run whose Seg+CRF came from `segmenter.crf_images` marks that cell; runs that scored
    every image leave the table as it was."""
    sweep = make_sweep(tmp_path, methods=("irnet",), arms=(False,))
    assert "‡" not in render_markdown(build_table(gather_runs([sweep])))
    run = tmp_path / "runs" / "irnet_False" / "seed_1" / "results.json"
    results = json.loads(run.read_text())
    results["rounds"]["0"] |= {"seg_crf_images": 5000, "seg_crf_split_images": 40504}
    run.write_text(json.dumps(results))
    text = render_markdown(build_table(gather_runs([sweep])))
    assert "| 60.0 ± 2.0‡ |" in text
    assert "‡: Seg+CRF scored on a fixed subset of the val images" in text
    results["rounds"]["0"]["seg_crf_images"] = 50000  # more than the split holds
    run.write_text(json.dumps(results))
    with pytest.raises(Table2Error, match="seg_crf_images / seg_crf_split_images are 50000"):
        gather_runs([sweep])


def test_a_conta_row_names_the_context_module_it_ran(tmp_path):
    """No number is called CONTA that is not: Eq. 3 as printed and this project's variant are
    labelled apart, and one table never mixes them."""
    for context, label in (("paper", "Eq. 3"), ("calibrated", "calibrated variant")):
        folder = tmp_path / context
        for seed in range(2):
            write_run(folder / f"off_{seed}", "irnet", False, seed, {"0": _row(IRNET_OFF, seed)})
            rounds = on_rounds(IRNET_OFF, IRNET_GAIN, seed)
            write_run(folder / f"on_{seed}", "irnet", True, seed, rounds, context=context)
        (block,) = build_table(gather_runs([folder]))
        assert block.conta.label == f"irnet + CONTA ({label})"
        assert f"gain of irnet + CONTA ({label})" in render_markdown([block])
    mixed = gather_runs([tmp_path / "paper" / "off_0", tmp_path / "paper" / "on_0"])
    mixed += gather_runs([tmp_path / "calibrated" / "on_1"])
    with pytest.raises(Table2Error, match="different context modules"):
        build_table(mixed)


def _limit_memory():
    """Before the fix a /dev/zero results.json was read until memory ran out: cap the child."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


@pytest.mark.parametrize("name", ["results.json", "run_dir.txt"])
@pytest.mark.parametrize("kind", ["/dev/zero", "fifo"])
def test_a_device_or_fifo_named_as_a_run_file_is_a_one_line_error(tmp_path, name, kind):
    folder = tmp_path / "sweep" / "0"
    folder.mkdir(parents=True)
    path = folder / name
    if kind == "fifo":
        os.mkfifo(path)  # no writer ever comes: reading it would block forever
    else:
        path.symlink_to(kind)
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "report.py"), str(tmp_path / "sweep")],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            preexec_fn=_limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"report.py hung on a {kind} named {name}")
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0], lines
    assert "is not a regular file" in lines[0] and "Fix:" in lines[0]


def test_an_oversized_or_non_utf8_results_json_names_the_file(tmp_path, monkeypatch):
    from src.utils import untrusted

    path = tmp_path / "results.json"
    path.write_bytes(b'{"rounds": {}, "x": "\xff"}')
    with pytest.raises(Table2Error, match="is not UTF-8"):
        gather_runs([tmp_path])
    monkeypatch.setattr(untrusted, "MAX_TEXT_BYTES", 8)
    path.write_text('{"rounds": {}}')
    with pytest.raises(Table2Error, match=r"results.json: is 14 bytes, more than the 8"):
        gather_runs([tmp_path])


def test_unfinished_and_failed_jobs_are_listed_under_the_table(tmp_path):
    """The finished runs are tabulated; a job whose run folder has no results.json and a job
    the sweep summary lists as failed (with its error and log) are named under the table."""
    sweep = make_sweep(tmp_path, methods=("irnet",), arms=(False,))
    (sweep / "9").mkdir()
    (sweep / "9" / "run_dir.txt").write_text(str(tmp_path / "runs" / "never") + "\n")
    summary = {
        "jobs": [
            {
                "num": 10,
                "overrides": ["seed=3"],
                "status": "failed",
                "job_dir": str(sweep / "10"),
                "error": "FileExistsError: seed_3",
                "log": str(sweep / "10" / "train.log"),
            },
            {
                "num": 0,
                "overrides": ["seed=0"],
                "status": "completed",
                "job_dir": str(sweep / "0"),
                "error": None,
                "log": None,
            },
        ]
    }
    (sweep / "sweep_summary.json").write_text(json.dumps(summary))
    text, _ = write_report([sweep], tmp_path / "out")
    assert "| synth | irnet | conta=off runs, round 0 | 3 |" in text
    assert "Not in the table: 2 sweep job(s)" in text
    assert f"- {sweep / '9'}: the job did not finish: " in text
    assert (
        f"- {sweep / '10'}: failed: FileExistsError: seed_3 (log: {sweep / '10'}/train.log)" in text
    )
    (sweep / "sweep_summary.json").write_text('{"jobs": [{"status": 1}]}')
    with pytest.raises(Table2Error, match="not a string"):
        write_report([sweep], tmp_path / "out")
