"""Weight files the stages write (the classifier's cam_net.pt, the affinity nets', the SEC/DSRG
net's): the state dict plus a content digest, written atomically and checked on load, so that a
flipped byte is refused instead of training or predicting silently wrong.

    {"format": WEIGHTS_FORMAT, "state_dict": {name: tensor}, "digest": tensor_digest(state)}

`tensor_digest` is also the segmenter checkpoint's (src/models/deeplab.py, its spec as header).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Mapping
from pathlib import Path

import torch

from src.utils.io import atomic_torch_save
from src.utils.untrusted import Source, describe, read_torch, tensor_state_dict

log = logging.getLogger(__name__)
WEIGHTS_FORMAT = "conta-weights/1"
_ENTRIES = ("format", "state_dict", "digest")


def tensor_digest(state: Mapping[str, torch.Tensor], header: bytes = b"") -> str:
    """sha256 of `header` and every tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256(header)
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_weights(path: str | os.PathLike, state: Mapping[str, torch.Tensor]) -> None:
    """`state` with its digest, written to a temp file and renamed into place."""
    state = dict(state)
    atomic_torch_save(
        path, {"format": WEIGHTS_FORMAT, "state_dict": state, "digest": tensor_digest(state)}
    )


def load_weights(src: Source) -> dict[str, torch.Tensor]:
    """The state dict of a file save_weights wrote, its digest checked; else `src.fail`. A flat
    state dict (written before weight files carried a digest) loads with a warning, unchecked.
    Floating tensors must be finite (NaN or inf: a diverged training or a damaged file)."""
    path = Path(src.path)
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        src.fail(f"unreadable ({type(err).__name__}: {err})", err)
    if not stat.S_ISREG(mode):  # never opened: a FIFO would block, a device never ends
        src.fail("is not a regular file (a folder, FIFO, device or socket)")
    payload = read_torch(src)
    if isinstance(payload, dict) and "format" in payload:
        if payload["format"] != WEIGHTS_FORMAT:
            src.fail(f"its format is {describe(payload['format'])}, not {WEIGHTS_FORMAT!r}")
        unknown = sorted(map(str, set(payload) - set(_ENTRIES)))
        if unknown:
            src.fail(f"unknown entries {unknown} (known: {', '.join(_ENTRIES)})")
        state = tensor_state_dict(payload.get("state_dict"), src, "the 'state_dict'")
        recorded = payload.get("digest")
        if type(recorded) is not str:
            src.fail(f"its digest is {describe(recorded)}, expected the sha256 of its tensors")
        if recorded != tensor_digest(state):
            src.fail("its content does not match its digest (the file was damaged or altered)")
    else:
        state = tensor_state_dict(payload, src)
        log.warning("%s carries no content digest (an older weight file): not checked", path)
    broken = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
    if broken:
        src.fail(f"weights {broken[:3]} hold NaN or inf (a diverged training or a damaged file)")
    return state
