"""A Hydra app on the project's configs for tests/test_cluster_launchers.py: its task writes
`<job folder>/ran.txt`, except for seed=1, whose process kills itself with SIGKILL (as the
kernel's OOM killer or a lost node ends a job: no result, no Python cleanup)."""

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: src, hydra_plugins
import src  # noqa: E402, F401  (the configs' resolvers)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg) -> None:
    if cfg.seed == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    (Path(HydraConfig.get().runtime.output_dir) / "ran.txt").write_text(f"{cfg.seed}\n")


if __name__ == "__main__":
    main()
