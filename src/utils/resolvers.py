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


def last_round(rounds: int, enabled: bool) -> int:
    """The run's last round: conta.rounds under conta=on, 0 under conta=off whatever
    conta.rounds says, so one sweep `conta=off,on conta.rounds=T` runs T rounds where CONTA is."""
    return int(rounds) if bool(enabled) else 0


def register() -> None:
    for name, fn in (("with_conta", with_conta), ("last_round", last_round)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
