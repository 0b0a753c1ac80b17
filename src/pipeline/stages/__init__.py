"""The registry of stages the driver can run, in the order of one round."""

from src.pipeline.stage import Stage
from src.pipeline.stages.cam import eval_cams, make_cams, train_cam

# config_keys: what each stage's output depends on (besides its inputs, whose hashes chain in).
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage("train_cam", train_cam, ("seed", "data", "backbone", "cam.batch_size", "cam.max_epochs",
                                        "cam.crop_size", "cam.scale_range", "cam.resize_long",
                                        "cam.optimizer")),
        Stage("make_cams", make_cams, ("cam.inference",), inputs=("train_cam",)),
        Stage("eval_cams", eval_cams, ("cam.eval", "data.eval_split"), inputs=("make_cams",),
              rank_zero_only=True),
    ]
}
