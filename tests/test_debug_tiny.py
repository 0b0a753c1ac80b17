"""`debug=tiny` (conf/debug/tiny.yaml + conf/debug_method/<method>_tiny.yaml): the settings every
pipeline test runs with, and a user's smoke run. It only shrinks settings that exist, for every
method, and keeps its runs apart from real ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, TINY, compose_cfg

CONF = Path(CONF_DIR)
METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
MISSING = object()


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out |= _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def _tiny_files(method: str) -> list[Path]:
    return [
        p
        for p in (CONF / "debug" / "tiny.yaml", CONF / "debug_method" / f"{method}_tiny.yaml")
        if p.is_file()
    ]


@pytest.mark.parametrize("method", METHODS)
def test_tiny_sets_only_settings_the_method_has(method):
    """A renamed setting would otherwise leave a dead key behind and the tests at full size."""
    base = compose_cfg(["experiment=synth", f"method={method}"])
    tiny = compose_cfg(["experiment=synth", f"method={method}", TINY])
    for path in _tiny_files(method):
        for key, value in _leaves(OmegaConf.to_container(OmegaConf.load(path))).items():
            assert OmegaConf.select(base, key, default=MISSING) is not MISSING, (
                f"{path.relative_to(CONF.parent)} sets {key}, which method={method} does not have"
            )
            if key != "paths.output_dir":
                assert OmegaConf.select(tiny, key) == value, (path, key)


@pytest.mark.parametrize("method", ["irnet", "seam", "sec", "dsrg"])
def test_every_method_with_networks_of_its_own_has_a_tiny_file(method):
    assert (CONF / "debug_method" / f"{method}_tiny.yaml").is_file()


def test_a_tiny_run_writes_apart_from_real_runs_and_reuses_only_tiny_runs():
    real = compose_cfg(["experiment=synth_conta"])
    tiny = compose_cfg(["experiment=synth_conta", TINY])
    assert tiny.paths.run_dir == f"{real.paths.output_dir}/tiny/synth_irnet_conta/seed_0"
    assert all(p.startswith(f"{real.paths.output_dir}/tiny/") for p in tiny.reuse_from)


def test_without_debug_no_method_file_applies():
    assert (
        compose_cfg(["experiment=synth"]).affinity.max_epochs
        == compose_cfg(["experiment=synth", "debug=preflight"]).affinity.max_epochs
        != 1
    )
