"""`python train.py ...` with every file of a reuse copy delayed (bench/faults.py --reuse).

    FAULTS_COPY_PAUSE=0.05 python bench/slow_reuse_train.py [train.py overrides ...]

A copy from a `reuse_from` donor hard-links its files into a hidden `round_<t>/.reuse-*` folder
in milliseconds; the fault campaign needs that window wide enough to kill a run inside it. This
wrapper sleeps FAULTS_COPY_PAUSE seconds before each file of the copy (src/pipeline/reuse.py's
`_link_or_copy`) and then runs train.py unchanged. Nothing else differs, and the project's own
code carries no hook for it.
"""

from __future__ import annotations

import os
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from src.pipeline import reuse  # noqa: E402

PAUSE = float(os.environ.get("FAULTS_COPY_PAUSE", "0.05"))
_link_or_copy = reuse._link_or_copy


def _slow_link_or_copy(src: str, dst: str) -> None:
    time.sleep(PAUSE)
    _link_or_copy(src, dst)


reuse._link_or_copy = _slow_link_or_copy

if __name__ == "__main__":
    sys.argv[0] = str(ROOT / "train.py")
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
