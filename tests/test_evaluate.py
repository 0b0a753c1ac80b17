"""eval.py's checks of its own arguments (src/evaluate.py); the re-scoring itself is tested on a
finished run in tests/pipeline/test_conta.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from src.evaluate import EvaluationError, evaluate
from src.utils.errors import UserError
from tests.conftest import compose_cfg

# Runs a pipeline, a CLI or several processes: `make test-integration` (CI runs it too).
pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "split",
    ["train/../../../../victim", "../../victim", "nosuch", "train/"],
)
def test_a_bad_split_is_refused_before_anything_is_removed(tmp_path, split):
    cfg = compose_cfg(["experiment=synth_conta", "round=1"], tmp_path)
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text('{"rounds": {}}')
    # What `split=train/../../../../victim` reached before: a folder outside the run.
    victim = run_dir.parents[1] / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    for target in (run_dir / "eval" / "victim", run_dir / "victim"):
        target.mkdir(parents=True, exist_ok=True)
        (target / "keep.txt").write_text("mine")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with open_dict(cfg):
        cfg.split, cfg.crf = split, False
    with pytest.raises(EvaluationError, match="split=.*Fix: pass") as err:
        evaluate(cfg)
    assert isinstance(err.value, UserError)  # eval.py: one line, exit 2
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
