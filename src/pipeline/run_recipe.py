"""A run folder belongs to the recipe that created it.

The folder's name says what makes its work differ along the sweep's axes (data, method, conta,
seed); the recipe says the rest: the scale and the backbone the method's recipe picks
(conf/recipe/). Two commands that pick different recipes under one name would invalidate each
other's stages turn by turn, so the first run records its recipe in the folder and a run with
another one stops before any work, naming both and the fix.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.utils.errors import UserError
from src.utils.io import atomic_write_json
from src.utils.untrusted import read_json_object

RECIPE_FILE = "recipe.json"


class RecipeMismatchError(UserError, RuntimeError):
    pass


def run_recipe(cfg: DictConfig) -> dict:
    """What the folder's work is: data, scale, method and the classifier's backbone."""
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True)
    backbone.pop("weights_path", None)  # where this machine keeps the weights, not which
    return {
        "data": cfg.data.name,
        "scale": OmegaConf.select(cfg, "scale.name"),
        "method": cfg.method.name,
        "backbone": backbone,
    }


def check_run_recipe(cfg: DictConfig, run_dir: Path) -> None:
    """Raise RecipeMismatchError when `run_dir` was created by a different recipe; a folder
    that records none (new, or made before recipes were recorded) is this run's."""
    recorded = read_json_object(run_dir / RECIPE_FILE)
    if recorded is None:
        return
    wanted = run_recipe(cfg)
    differ = _differences(recorded, wanted)
    if differ:
        lines = "; ".join(f"{key}: {old!r} there, {new!r} now" for key, old, new in differ)
        raise RecipeMismatchError(
            f"{run_dir} was created by another recipe ({lines}). Its stages would be redone and "
            "the other command's results lost. Fix: give this run its own folder, e.g. "
            f"experiment_name={cfg.experiment_name}_{_suffix(differ)} (or paths.run_dir=...), "
            f"or delete {run_dir / RECIPE_FILE} to let this recipe take the folder over."
        )


def record_run_recipe(cfg: DictConfig, run_dir: Path) -> None:
    atomic_write_json(run_dir / RECIPE_FILE, run_recipe(cfg))


def _differences(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    found = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", a, b))
    return found


def _suffix(differ: list[tuple[str, object, object]]) -> str:
    """A folder-name hint from the first differing setting's new value."""
    key, _, new = differ[0]
    value = "".join(ch for ch in str(new) if ch.isalnum()) or "other"
    return f"{key.split('.')[-1]}{value}"[:40]
