"""Stage hashes: what a stage's output depends on, and nothing else.

A stage's digest chains the resolved config keys it declares (`Stage.config_keys`, plus
`round_keys` from round 1 on) with the digests of the stages it reads. Two kinds of key stand
for content rather than for the value written in the config:

* ``data:<split key>`` (e.g. ``data:train_split``): the content fingerprint of the split that
  ``data.<split key>`` names (src/pipeline/fingerprint.py), so a moved data folder keeps its
  hashes and an edited val mask redoes only what reads val;
* ``file:<key>`` (e.g. ``file:backbone.weights_path``): the content digest of the file the key
  points at (pretrained weights), so the same weights at another path are the same run.

`plan_digests` computes every (round, stage) digest without running anything: the driver runs
what it says, and tests/pipeline/test_hashes.py checks it leaf by leaf against a hand-written
table.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from src.pipeline.plan import Plan
from src.pipeline.stage import Stage

DATA_PREFIX = "data:"
FILE_PREFIX = "file:"
# How stage seeds are drawn (see stage_seed); part of every hash, so runs finished under an
# earlier scheme (a seed per round) are redone rather than mixed with this one's.
SEEDING = "per-stage"
# v2: content fingerprints instead of data paths, exact key lists.
HASH_SCHEME = "v2"

FileDigest = Callable[[str | None], str | None]


def picked_config(
    cfg: DictConfig,
    keys: Sequence[str],
    fingerprints: Mapping[str, str] | None = None,
    file_digest: FileDigest | None = None,
) -> dict:
    """The resolved values a stage depends on; `data:`/`file:` keys give content digests."""
    picked = {}
    for key in keys:
        if key.startswith(DATA_PREFIX):
            split = OmegaConf.select(cfg, f"data.{key[len(DATA_PREFIX) :]}")
            picked[key] = (fingerprints or {}).get(split, f"unfingerprinted:{split}")
        elif key.startswith(FILE_PREFIX):
            path = OmegaConf.select(cfg, key[len(FILE_PREFIX) :])
            picked[key] = file_digest(path) if file_digest is not None else path
        else:
            picked[key] = _resolved(OmegaConf.select(cfg, key))
    return picked


def config_hash(picked: dict, upstream: Sequence[str]) -> str:
    blob = json.dumps(
        {"cfg": picked, "upstream": list(upstream), "seeding": SEEDING, "scheme": HASH_SCHEME},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def stage_keys(stage: Stage, round_idx: int) -> list[str]:
    # Every stage draws from stage_seed(seed, name).
    return ["seed", *stage.config_keys, *(stage.round_keys if round_idx > 0 else ())]


def stage_digest(
    cfg: DictConfig,
    plan: Plan,
    stage: Stage,
    round_idx: int,
    hashes: Mapping[str, str],
    previous: Mapping[str, str],
    fingerprints: Mapping[str, str] | None = None,
    file_digest: FileDigest | None = None,
) -> str:
    """The digest of `stage` in `round_idx`, given this round's and the last round's digests."""
    # Producers' digests in the order of the roles read: the same chain as before roles existed.
    upstream = [hashes[name] for name in plan.inputs(stage).values()]
    if round_idx > 0:
        upstream += [f"r{round_idx - 1}:{previous[name]}" for name in plan.previous(stage).values()]
    picked = picked_config(cfg, stage_keys(stage, round_idx), fingerprints, file_digest)
    return config_hash(picked, upstream)


def plan_digests(
    cfg: DictConfig,
    plan: Plan,
    fingerprints: Mapping[str, str] | None = None,
    file_digest: FileDigest | None = None,
) -> dict[tuple[int, str], str]:
    """{(round, stage): digest} for rounds 0..cfg.round."""
    digests: dict[tuple[int, str], str] = {}
    previous: dict[str, str] = {}
    for round_idx in range(cfg.round + 1):
        hashes: dict[str, str] = {}
        for stage in plan:
            hashes[stage.name] = stage_digest(
                cfg, plan, stage, round_idx, hashes, previous, fingerprints, file_digest
            )
            digests[(round_idx, stage.name)] = hashes[stage.name]
        previous = hashes
    return digests


def stage_seed(base_seed: int, stage: str) -> int:
    """A distinct, reproducible seed per (seed, stage), the same in every round: rounds then
    share their random numbers (init, data order, augmentation) and differ by M alone."""
    digest = hashlib.sha1(f"{base_seed}/{stage}".encode()).hexdigest()
    return int(digest[:8], 16) % (2**31 - 1)


def _resolved(node):
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
