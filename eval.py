"""Re-evaluate a finished run without retraining:
`python eval.py experiment=synth_conta [seed=0] [round=1] [split=val] [crf=true]`."""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Registers the configs' resolvers (with_conta, ...) before Hydra snapshots its state: the joblib
# launcher restores that snapshot before every job, so a later registration would be lost.
import src  # noqa: F401
from src.utils.errors import exit_on_user_error

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from src.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    main()
