"""OmegaConf resolvers the configs use; registered when the `src` package is imported."""

from __future__ import annotations

from omegaconf import ListConfig, OmegaConf

CONFOUNDER_STAGE = "confounders"


def with_conta(stages: list[str], enabled: bool) -> ListConfig:
    """A method's stage list, plus the stage that builds round t's confounders under conta=on
    (a ListConfig: OmegaConf.resolve keeps only config nodes)."""
    stages = list(stages)
    if bool(enabled) and CONFOUNDER_STAGE not in stages:
        stages.append(CONFOUNDER_STAGE)
    return ListConfig(stages)


def last_round(rounds: int, enabled: bool) -> int:
    """The run's last round: conta.rounds under conta=on, 0 under conta=off whatever
    conta.rounds says, so one sweep `conta=off,on conta.rounds=T` runs T rounds where CONTA is."""
    return int(rounds) if bool(enabled) else 0


def pretrained(with_weights, without=None, *, _root_):
    """`with_weights` unless the root switch says `pretrained=false`, then `without`: one
    override turns every network of a recipe to random init, nothing downloaded. Used for the
    weight names (without: null) and for BatchNorm modes that keep ImageNet's statistics
    (frozen / fixed; without: train, since a random net has no statistics worth keeping and
    its activations overflow through 100 frozen layers: DeepLab's loss was NaN in 2 steps)."""
    return with_weights if bool(_root_.get("pretrained", True)) else without


def register() -> None:
    resolvers = (("with_conta", with_conta), ("last_round", last_round), ("pretrained", pretrained))
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
