"""The one segmentation metric of the project: a dataset-level confusion matrix (VOC protocol).

Every stage (CAMs, pseudo-masks, segmenter validation) scores through this module, so numbers
are comparable across stages and rounds. Counts are int64 torchmetrics states reduced by sum,
so DDP ranks that each score a shard agree after ``compute()``.

Conventions
-----------
* Confusion rows are ground truth, columns prediction.
* Ground-truth pixels equal to ``ignore_index`` are skipped.
* A *prediction* equal to ``ignore_index`` ("void", e.g. an unlabelled pseudo-mask pixel) is kept
  in an extra internal column: it is a miss for its ground-truth class and a hit for no class.
  Any other out-of-range value is an error, never a silent wrong count.
* Context maps (synthetic set): 0 = no context region, k = the home-context region of class k.
  Context pixels are counted only where the ground truth is background, because an object may
  sit on its own context and predicting it there is correct, not leakage.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric

ERROR_KEYS = ("incomplete_foreground", "object_ambiguity", "incomplete_background")


def to_label_tensor(x: Any, name: str) -> torch.Tensor:
    """Integer label map (numpy or torch, any shape) -> int64 tensor, with a clear error otherwise."""
    if not isinstance(x, torch.Tensor):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biu":
            raise TypeError(
                f"{name} must be an integer label map, got {arr.dtype}; "
                "take the argmax over class scores before scoring"
            )
        # int64 up front: torch lacks full uint16/32 support and warns on read-only buffers
        # (np.asarray of a PIL image); bincount needs int64 anyway.
        return torch.from_numpy(arr.astype(np.int64))
    if x.is_floating_point() or x.is_complex():
        raise TypeError(
            f"{name} must be an integer label map, got {x.dtype}; "
            "take the argmax over class scores before scoring"
        )
    return x.detach().long()


def check_label_range(values: torch.Tensor, upper: int, name: str, hint: str) -> None:
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} has values in [{lo}, {hi}], expected [0, {upper - 1}]; {hint}")


def resolve_class_names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [f"class_{i}" for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"got {len(names)} class_names for num_classes={num_classes}")
    return names


def resolve_context_names(
    class_names: list[str], context_names: Sequence[str] | Mapping[int, str] | None
) -> dict[int, str]:
    """Context id -> name for ids >= 1. Default: region k is named after class k."""
    if context_names is None:
        return {k: class_names[k] for k in range(1, len(class_names))}
    if isinstance(context_names, Mapping):
        names = {int(k): str(v) for k, v in context_names.items() if int(k) != 0}
    else:  # indexed by context id like class_names; entry 0 names "no context" and is unused
        names = {k: str(v) for k, v in enumerate(context_names) if k != 0}
    if not names or min(names) < 1:
        raise ValueError(f"context_names must name context ids >= 1, got {context_names!r}")
    return names


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den > 0 else None


def metrics_from_counts(
    confmat: np.ndarray,
    class_names: Sequence[str],
    context: np.ndarray | None = None,
    context_pred_obj: int = 0,
    context_names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """All reported numbers from accumulated counts (shared by SegmentationMetric and the sweep).

    ``confmat`` is (C, C+1): column C counts void predictions. ``context`` is (R, 2): per context
    id, [background GT pixels, of which predicted as an object]; ``context_pred_obj`` is the number
    of object predictions (valid GT) in the images that came with a context map.
    """
    confmat = np.asarray(confmat, dtype=np.int64)
    num_classes = confmat.shape[0]
    cm = confmat[:, :num_classes]
    tp = np.diag(cm)
    gt = confmat.sum(1)  # includes void predictions: they are misses
    union = gt + cm.sum(0) - tp
    iou = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(num_classes)]
    present = [v for v in iou if v is not None]
    total = int(gt.sum())
    obj_gt = int(gt[1:].sum())
    bg_gt = int(gt[0])

    # Error decomposition: the three CONTA failure modes, as rates of their own GT population.
    missed_fg = int(cm[1:, 0].sum())
    confused = int(cm[1:, 1:].sum() - tp[1:].sum())
    false_fg = int(cm[0, 1:].sum())
    void = int(confmat[:, num_classes].sum())
    n_errors = total - int(tp.sum())  # = missed_fg + confused + false_fg + void

    out: dict[str, Any] = {
        "miou": float(np.mean(present)) if present else None,
        "per_class_iou": dict(zip(class_names, iou, strict=True)),
        "pixel_accuracy": _ratio(tp.sum(), total),
        "incomplete_foreground": _ratio(missed_fg, obj_gt),
        "object_ambiguity": _ratio(confused, obj_gt),
        "incomplete_background": _ratio(false_fg, bg_gt),
        "errors": {  # the same three rates, grouped (the form results.json stores)
            "incomplete_foreground": _ratio(missed_fg, obj_gt),
            "object_ambiguity": _ratio(confused, obj_gt),
            "incomplete_background": _ratio(false_fg, bg_gt),
        },
        # Shares of all misclassified valid pixels; they sum to 1 unless there are void predictions.
        "error_shares": {
            "incomplete_foreground": _ratio(missed_fg, n_errors),
            "object_ambiguity": _ratio(confused, n_errors),
            "incomplete_background": _ratio(false_fg, n_errors),
        },
        "void_prediction_rate": _ratio(void, total),
        "num_pixels": total,
        "context_leakage": None,
        "context_leakage_per_region": None,
        "context_fp_rate": None,
        "context_fp_rate_per_region": None,
        "non_context_fp_rate": None,
    }
    if context is not None and int(np.asarray(context)[:, 0].sum()) + context_pred_obj > 0:
        context = np.asarray(context, dtype=np.int64)
        names = context_names or {k: str(k) for k in range(1, context.shape[0])}
        on_ctx = context[1:]
        out["context_leakage"] = _ratio(on_ctx[:, 1].sum(), context_pred_obj)
        out["context_leakage_per_region"] = {
            n: _ratio(context[k, 1], context_pred_obj) for k, n in names.items()
        }
        out["context_fp_rate"] = _ratio(on_ctx[:, 1].sum(), on_ctx[:, 0].sum())
        out["context_fp_rate_per_region"] = {
            n: _ratio(context[k, 1], context[k, 0]) for k, n in names.items()
        }
        out["non_context_fp_rate"] = _ratio(context[0, 1], context[0, 0])
    return out


class SegmentationMetric(Metric):
    """Dataset-level confusion matrix with VOC mIoU, error decomposition and context leakage.

    ``update(pred, target, context=None)`` takes int label maps (H, W) or batches (N, H, W), numpy
    or torch. ``compute()`` returns the dict of :func:`metrics_from_counts`. Under DDP, states are
    summed across ranks on ``compute()`` (torchmetrics default); pass ``sync_on_compute=False`` when
    only one rank scores while a process group is up, or the other ranks would be waited for.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        ignore_index: int = 255,
        context_names: Sequence[str] | Mapping[int, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + objects), got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} collides with a class id")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = resolve_class_names(num_classes, class_names)
        self.context_names = resolve_context_names(self.class_names, context_names)
        self.num_contexts = max(self.context_names) + 1
        c, r = num_classes, self.num_contexts
        self.add_state("confmat", torch.zeros(c, c + 1, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("context", torch.zeros(r, 2, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("context_pred_obj", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Any, target: Any, context: Any = None) -> None:
        pred = to_label_tensor(pred, "pred")
        target = to_label_tensor(target, "target").to(pred.device)
        if pred.shape != target.shape:
            raise ValueError(
                f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}"
            )
        c = self.num_classes
        valid = target != self.ignore_index
        g = target[valid]
        p = pred[valid]
        check_label_range(g, c, "target", f"use {self.ignore_index} for unlabelled pixels")
        p = torch.where(p == self.ignore_index, c, p)  # void prediction -> extra column
        check_label_range(p, c + 1, "pred", f"predictions must be class ids or {self.ignore_index}")
        counts = torch.bincount(g * (c + 1) + p, minlength=c * (c + 1))
        self.confmat += counts.view(c, c + 1).to(self.confmat.device)
        if context is not None:
            self._update_context(to_label_tensor(context, "context").to(pred.device), valid, g, p)

    def _update_context(
        self, context: torch.Tensor, valid: torch.Tensor, g: torch.Tensor, p: torch.Tensor
    ) -> None:
        if context.shape != valid.shape:
            raise ValueError(
                f"context shape {tuple(context.shape)} != target shape {tuple(valid.shape)}"
            )
        r = self.num_contexts
        ctx = context[valid]
        check_label_range(ctx, r, "context", "context ids must be 0 (none) or a named region id")
        is_obj = (p >= 1) & (p < self.num_classes)
        bg = g == 0
        counts = torch.stack(
            [
                torch.bincount(ctx[bg], minlength=r),
                torch.bincount(ctx[bg & is_obj], minlength=r),
            ],
            dim=1,
        )
        self.context += counts.to(self.context.device)
        self.context_pred_obj += is_obj.sum().to(self.context_pred_obj.device)

    def compute(self) -> dict[str, Any]:
        return metrics_from_counts(
            self.confmat.cpu().numpy(),
            self.class_names,
            self.context.cpu().numpy(),
            int(self.context_pred_obj),
            self.context_names,
        )

    @property
    def confusion(self) -> np.ndarray:
        """(C, C) int64 confusion matrix, rows GT, cols prediction (void predictions left out)."""
        return self.confmat[:, : self.num_classes].cpu().numpy().astype(np.int64)

    @property
    def void_predictions(self) -> np.ndarray:
        """(C,) int64: per GT class, pixels whose prediction was ``ignore_index``."""
        return self.confmat[:, self.num_classes].cpu().numpy().astype(np.int64)
