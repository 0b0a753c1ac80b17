"""The types of the settings the stages read, checked before the first stage runs.

One typed schema (dataclasses, OmegaConf's structured configs) for the leaves of the stage
groups that stages cast or size things with: a `null` where a pair is needed or a string where
a count is needed is found at start-up, named with its key, instead of as a TypeError inside a
stage an hour in. Only the keys declared here are checked, and only their types (plus the
shape of a pair): what the values mean (a known method name, a positive lr) stays with the code
that uses them. Sub-configs that are instantiated (`net`, `module`, `optimizer`, ...) carry
their own signatures and are left to `hydra.utils.instantiate`.
"""

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional, get_type_hints

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from src.pipeline.plan import PipelineError

PAIR = {"length": 2, "ordered": True, "what": "a pair [min, max] with min <= max"}
SIZE = {"length": 2, "what": "a size [h, w]"}
JITTER = {"length": 4, "what": "[brightness, contrast, saturation, hue]"}


class ConfigTypeError(PipelineError):
    """A stage setting of the wrong type (a user error: the message names the key and fix)."""


@dataclass
class CamInference:
    scales: list[float] = field(default_factory=list)
    flip: bool = True
    batch_size: int = 1


@dataclass
class CamEval:
    bg_threshold: float = 0.15
    sweep: list[float] = field(default_factory=list)


@dataclass
class CropTraining:
    """A stage trained on random crops (the classifier, the affinity net)."""

    batch_size: int = 1
    max_epochs: int = 1
    crop_size: int = 1
    resize_long: Optional[list[int]] = field(default=None, metadata=PAIR)  # noqa: UP045
    scale_range: Optional[list[float]] = field(default=None, metadata=PAIR)  # noqa: UP045
    color_jitter: Optional[list[float]] = field(default=None, metadata=JITTER)  # noqa: UP045


@dataclass
class Cam(CropTraining):
    inference: CamInference = field(default_factory=CamInference)
    eval: CamEval = field(default_factory=CamEval)


@dataclass
class Affinity(CropTraining):
    inference_batch_size: int = 1


@dataclass
class Seeded:
    input_size: int = 1
    batch_size: int = 1
    max_steps: int = 1
    inference_batch_size: int = 1


@dataclass
class SegmenterInference:
    batch_size: int = 1
    logits_min_prob: float = 0.0


@dataclass
class Segmenter:
    batch_size: int = 1
    accumulate_grad_batches: int = 1
    max_steps: int = 1
    val_every_n_epochs: int = 1
    crop_size: int = 1
    rates: list[int] = field(default_factory=list)
    scale_choices: Optional[list[float]] = None  # noqa: UP045
    crf_images: Optional[int] = None  # noqa: UP045
    inference: SegmenterInference = field(default_factory=SegmenterInference)


@dataclass
class Conta:
    rounds: int = 0
    size: list[int] = field(default_factory=list, metadata=SIZE)
    diagnostic_images: int = 0


SCHEMA: dict[str, type] = {
    "cam": Cam,
    "affinity": Affinity,
    "seeded": Seeded,
    "segmenter": Segmenter,
    "conta": Conta,
}


def config_type_problems(cfg: DictConfig) -> list[str]:
    """One line per declared key whose value does not fit its type (empty: all fit)."""
    problems: list[str] = []
    for group, schema in SCHEMA.items():
        node = OmegaConf.select(cfg, group)
        if node is not None:
            _check(node, schema, group, problems)
    return problems


def check_config_types(cfg: DictConfig) -> None:
    """ConfigTypeError listing every stage setting of the wrong type."""
    problems = config_type_problems(cfg)
    if problems:
        raise ConfigTypeError(
            "settings of the wrong type:\n  " + "\n  ".join(problems) + "\nFix: override each "
            "key with a value of that type (key=value on the command line or in the recipe)."
        )


def _check(node: Any, schema: type, prefix: str, problems: list[str]) -> None:
    typed = OmegaConf.structured(schema)
    hints = get_type_hints(schema)
    for f in fields(schema):
        if f.name not in node:
            continue  # a recipe without the key: the stage that needs it says so
        key, value = f"{prefix}.{f.name}", OmegaConf.select(node, f.name)
        if is_dataclass(hints[f.name]) and OmegaConf.is_dict(value):
            _check(value, hints[f.name], key, problems)
            continue
        shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        try:
            typed[f.name] = value
        except ValidationError:
            problems.append(f"{key}={shown!r}: expected {_type_name(hints[f.name])}")
            continue
        if "length" in f.metadata and value is not None and not _fits(shown, f.metadata):
            problems.append(f"{key}={shown!r}: expected {f.metadata['what']}")


def _fits(value: Any, shape: dict) -> bool:
    """A list of `shape["length"]` numbers, in order where `shape["ordered"]`."""
    return (
        isinstance(value, list)
        and len(value) == shape["length"]
        and all(isinstance(v, int | float) for v in value)
        and (not shape.get("ordered") or value == sorted(value))
    )


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = text.replace("typing.", "")
    if text.startswith("Optional["):
        return f"{text[len('Optional[') : -1]} or null"
    return text
