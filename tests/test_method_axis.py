"""The data x method x conta axes: composition, the role plan, and the bad inputs a sweep user
hits (an unknown method, a stage list that leaves a role unproduced, another method's weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import HydraException

from src.pipeline.driver import check_stages, run_identity
from src.pipeline.hashing import plan_digests
from src.pipeline.plan import PipelineError
from src.pipeline.stages.cam import WEIGHTS_FILE, build_cam_classifier, load_cam_classifier
from src.utils.errors import MissingArtifactError
from src.utils.weights import save_weights
from tests.conftest import CONF_DIR, compose_cfg

# Every method config: a new method is on every axis test without an edit here.
METHODS = sorted(p.stem for p in (Path(CONF_DIR) / "method").glob("*.yaml"))


def test_the_methods_are_the_method_configs():
    assert {"cam", "irnet", "seam", "sec", "dsrg"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("conta", ["off", "on"])
def test_each_point_of_the_sweep_composes_into_a_plan(method, conta):
    cfg = compose_cfg([f"method={method}", f"conta={conta}"])
    plan = check_stages(cfg)
    assert cfg.experiment_name == f"synth_{method}" + ("_conta" if conta == "on" else "")
    assert cfg.round == (2 if conta == "on" else 0)
    assert ("confounders" in plan.names) == (conta == "on")
    # Every role the shared stages read has exactly one producer of this method.
    assert {"classifier", "cams", "pseudo_masks", "segmenter"} <= set(plan.producers)
    on = conta == "on"  # the CONTA rounds name their context module (the CPU recipes' variant)
    context = "calibrated" if on else None
    assert run_identity(cfg) == {"data": "synth", "method": method, "conta": on, "context": context}


@pytest.mark.parametrize("conta, last", [("off", 0), ("on", 1)])
def test_one_sweep_sets_the_rounds_where_conta_is_on(conta, last):
    """`conta=off,on conta.rounds=1`: the baseline stays round 0 (CONTA's T is CONTA's)."""
    assert compose_cfg([f"conta={conta}", "conta.rounds=1"]).round == last


def test_a_run_of_part_of_a_method_names_no_method():
    assert run_identity(compose_cfg(["experiment=synth_cam"]))["method"] is None
    assert run_identity(compose_cfg(["experiment=synth_supervised"]))["method"] is None


@pytest.mark.parametrize("override", ["method=deeplab", "conta=maybe", "scale=gpu"])
def test_an_unknown_axis_value_names_the_group_and_its_options(override):
    group = override.split("=")[0]
    with pytest.raises(HydraException, match=f"(?s){group}.*Available options"):
        compose_cfg([override])


def test_a_role_no_stage_produces_is_refused_before_anything_runs():
    cfg = compose_cfg(["stages=[train_cam,make_cams,train_psa_affinity]", "conta=off"])
    with pytest.raises(PipelineError, match=r"train_psa_affinity reads \['affinity_labels'\]"):
        check_stages(cfg)


def test_two_producers_of_one_role_are_refused():
    cfg = compose_cfg(["stages=[train_cam,make_cams,make_ir_labels,make_psa_labels]", "conta=off"])
    with pytest.raises(PipelineError, match="make_ir_labels and make_psa_labels both produce"):
        check_stages(cfg)


def test_a_seam_classifier_given_to_the_irnet_stages_names_the_config_and_the_fix(tmp_path):
    seam = build_cam_classifier(compose_cfg(["method=seam"]))
    save_weights(tmp_path / WEIGHTS_FILE, seam.net.state_dict())
    cfg = compose_cfg(["method=irnet"])
    with pytest.raises(
        MissingArtifactError,
        match=r"(?s)cam.net=src.models.cam.CAMNet.*method=irnet.*force=\[train_cam\]",
    ):
        load_cam_classifier(cfg, tmp_path)


@pytest.mark.parametrize("method", METHODS)
def test_round_0_of_a_conta_run_is_the_conta_off_run(method):
    """Every round-0 stage has the same hash with conta on and off: the baseline row of
    report.py may come from round 0 of the conta=on runs (what `make table2` measured)."""
    off, on = (compose_cfg([f"method={method}", f"conta={c}"]) for c in ("off", "on"))
    digests_off = plan_digests(off, check_stages(off))
    digests_on = plan_digests(on, check_stages(on))
    shared = [k for k in digests_off if k[0] == 0]
    assert shared and all(digests_off[k] == digests_on[k] for k in shared)
