"""Run a WSSS experiment: `python train.py experiment=synth_cam [key=value ...]`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Registers the configs' resolvers (with_conta, ...) before Hydra snapshots its state: the joblib
# launcher restores that snapshot before every job, so a later registration would be lost.
import src  # noqa: F401
from src.utils.errors import exit_on_user_error

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from src.train import record_run_dir, train

    record_run_dir(cfg)
    train(cfg)


if __name__ == "__main__":
    main()
