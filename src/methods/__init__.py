"""The methods: one module per method (or family of methods sharing its stages), found here.

A method module declares
  STAGES  its own stages (src/pipeline/stage.py Stage: name, function, hashed config keys, the
          roles it reads and produces); the shared stages (src/pipeline/stages/) do the rest
  ROLES   {role: what its folder holds} for the roles only its stages use ({} if none)
and conf/method/<name>.yaml lists the stages of a run in order. Nothing else names the method:
src/pipeline/registry.py joins every module found here with the shared stages.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def method_modules() -> list[ModuleType]:
    """Every module of this package, by name: the methods the registry lists."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"{__name__}.{name}") for name in names]
