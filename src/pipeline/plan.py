"""Which stage produces each role in a run, checked before anything runs.

Stages name the roles they read (`Stage.inputs`; the roles: src/pipeline/registry.py ROLES),
never another stage. `build_plan` resolves every role to the one stage of `cfg.stages` that produces it, so a
method brings its own producers (SEAM's classifier, PSA's affinity) and the readers (evaluation,
segmenter, CONTA) stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from src.pipeline.stage import Stage
from src.utils.errors import UserError


class PipelineError(UserError, RuntimeError):
    pass


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    producers: Mapping[str, str]  # role -> name of the stage that produces it

    def __iter__(self):
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]

    def inputs(self, stage: Stage) -> dict[str, str]:
        """{role: producing stage} of this round that `stage` reads (optional ones if made)."""
        roles = stage.inputs + tuple(r for r in stage.optional_inputs if r in self.producers)
        return {role: self.producers[role] for role in roles}

    def previous(self, stage: Stage) -> dict[str, str]:
        """{role: producing stage} of the previous round that `stage` reads (from round 1)."""
        return {role: self.producers[role] for role in stage.previous_inputs}


def build_plan(
    names: Sequence[str], registry: Mapping[str, Stage], rounds: int, roles: Mapping[str, str]
) -> Plan:
    """The stages `names` of `registry` in order, every role they read (one of `roles`) resolved;
    a clear error otherwise."""
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise PipelineError(f"stages={unknown} unknown; available: {sorted(registry)}")
    if len(set(names)) != len(names):
        raise PipelineError(f"stages={list(names)} lists a stage twice")
    stages = tuple(registry[n] for n in names)
    producers: dict[str, str] = {}
    for stage in stages:
        needed = stage.inputs + stage.optional_inputs + stage.previous_inputs
        bad = [r for r in (*needed, stage.produces) if r is not None and r not in roles]
        if bad:
            raise PipelineError(
                f"stage {stage.name} names unknown roles {bad}; roles: {sorted(roles)}"
            )
        missing = [r for r in stage.inputs if r not in producers]
        if missing:
            raise PipelineError(
                f"stage {stage.name} reads {missing}, which no earlier stage of `stages` "
                f"produces (stages={list(names)}). Producers so far: {producers or 'none'}. "
                "Fix: check the method config's stage list (conf/method/)."
            )
        if stage.produces is not None:
            if stage.produces in producers:
                raise PipelineError(
                    f"stages {producers[stage.produces]} and {stage.name} both produce "
                    f"{stage.produces!r}: a run has one producer per role (stages={list(names)})"
                )
            producers[stage.produces] = stage.name
    if rounds > 0:
        for stage in stages:
            missing = [r for r in stage.previous_inputs if r not in producers]
            if missing:
                raise PipelineError(
                    f"round={rounds}: from round 1 on, {stage.name} reads the previous round's "
                    f"{missing}, which no stage of `stages` produces. Rounds > 0 are CONTA "
                    "rounds: use conta=on (e.g. experiment=synth_conta) or round=0."
                )
    return Plan(stages, producers)
