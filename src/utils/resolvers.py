"""OmegaConf resolvers the configs use; registered when the `src` package is imported."""

from __future__ import annotations

from omegaconf import ListConfig, OmegaConf

CONTA_STAGE = "confounders"


def with_conta(stages: list[str], enabled: bool) -> ListConfig:
    """A method's stage list, plus the stage that builds round t's confounders under conta=on
    (a ListConfig: OmegaConf.resolve keeps only config nodes)."""
    stages = list(stages)
    if bool(enabled) and CONTA_STAGE not in stages:
        stages.append(CONTA_STAGE)
    return ListConfig(stages)


def register() -> None:
    if not OmegaConf.has_resolver("with_conta"):
        OmegaConf.register_new_resolver("with_conta", with_conta)
