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


def _device_count(devices, key: str = "trainer.devices") -> int:
    """A trainer's device count as a number SLURM can reserve: an int > 0, a list of ids or a
    comma string of them; `-1` / `auto` (all devices of the node) are refused, since SLURM must
    be told how many."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices > 0:
        return devices
    if isinstance(devices, (list, ListConfig)) and len(devices) > 0:
        return len(devices)
    if isinstance(devices, str) and devices.strip() not in ("", "-1", "auto"):
        parts = [p for p in devices.split(",") if p.strip()]
        return int(devices) if len(parts) == 1 and devices.strip().isdigit() else len(parts)
    raise ValueError(
        f"{key}={devices!r} leaves the device count to the node, but hydra/launcher=slurm must "
        f"reserve it: set {key}=N (the GPUs per node each job uses)"
    )


def slurm_tasks_per_node(devices) -> int:
    """hydra/launcher=slurm: one SLURM task per device, as Lightning's SLURMEnvironment expects
    (it checks that --ntasks-per-node equals the trainer's devices)."""
    return _device_count(devices)


def slurm_gpus_per_node(accelerator, devices) -> int | None:
    """hydra/launcher=slurm: GPUs to reserve on each node (None for a CPU trainer)."""
    if str(accelerator) not in ("gpu", "cuda", "auto"):
        return None
    return _device_count(devices)


def slurm_cpus_per_task(num_workers) -> int:
    """hydra/launcher=slurm: one CPU for the rank's own process plus its DataLoader workers.
    The CPU stages' pools (CRF, IR labels: `workers: null`) use the cores the job is given;
    reserve more with hydra.launcher.cpus_per_task=N (docs/cluster.md)."""
    return 1 + int(num_workers)


def register() -> None:
    resolvers = (
        ("with_conta", with_conta),
        ("last_round", last_round),
        ("pretrained", pretrained),
        ("slurm_tasks_per_node", slurm_tasks_per_node),
        ("slurm_gpus_per_node", slurm_gpus_per_node),
        ("slurm_cpus_per_task", slurm_cpus_per_task),
    )
    for name, fn in resolvers:
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
