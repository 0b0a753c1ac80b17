"""The registry the driver runs: the shared stages (src/pipeline/stages/) and every method's
(src/methods/), with the roles they exchange. It lists the methods, it does not define them: a
method module's STAGES and ROLES are taken as they are, and a clash is an error at import."""

from __future__ import annotations

from types import ModuleType

from src.methods import method_modules
from src.pipeline.stage import ROLES as SHARED_ROLES
from src.pipeline.stage import Stage
from src.pipeline.stages import SHARED_STAGES


def _joined(methods: list[ModuleType]) -> tuple[dict[str, Stage], dict[str, str]]:
    stages = {s.name: s for s in SHARED_STAGES}
    owner = dict.fromkeys(stages, "the shared stages")
    roles, role_owner = dict(SHARED_ROLES), dict.fromkeys(SHARED_ROLES, "the shared roles")
    for module in methods:
        for stage in module.STAGES:
            if stage.name in stages:
                raise ValueError(
                    f"{module.__name__} declares stage {stage.name!r}, already declared by "
                    f"{owner[stage.name]}: give it another name"
                )
            stages[stage.name], owner[stage.name] = stage, module.__name__
        for role, meaning in module.ROLES.items():
            # A family's role (e.g. `affinity`) is declared alike by each of its methods.
            if roles.get(role, meaning) != meaning:
                raise ValueError(
                    f"{module.__name__} declares role {role!r} as {meaning!r}; "
                    f"{role_owner[role]} as {roles[role]!r}: give it another name"
                )
            roles.setdefault(role, meaning)
            role_owner.setdefault(role, module.__name__)
    return stages, roles


STAGES, ROLES = _joined(method_modules())
