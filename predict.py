"""Segment an image or a folder with a trained segmenter:
`python predict.py checkpoint=PATH input=IMAGE_OR_FOLDER output=DIR [device=auto|cpu|cuda]
[crf=false] [overlay=true]`.

Exit status: 0 all images written; 1 some images failed (logged, the rest written, summary
`N images, K written, F failed` at the end); 2 nothing done (bad checkpoint, input, device or
output folder; the message says why). Details in src/predict.py.
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

# Registers the configs' resolvers (with_conta, ...) before Hydra snapshots its state: the joblib
# launcher restores that snapshot before every job, so a later registration would be lost.
import src  # noqa: F401

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from src.models.deeplab import CheckpointError
    from src.predict import PredictError, predict

    try:
        result = predict(cfg)
    except (CheckpointError, PredictError) as err:
        logging.getLogger("predict").error("%s", err)
        sys.exit(2)
    if result["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
