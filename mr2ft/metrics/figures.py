"""One run's per-class figures: confusion matrix, per-class accuracy, easy/medium/hard groups, disparity figures.

Conventions, fixed for every figure this module returns:

- Accuracy figures are percentages (0-100). Per-class accuracy is recall: correct / support.
- A class without test images has no accuracy (NaN). It is left out of every mean, minimum and standard
  deviation, and of the easy/medium/hard grouping (group ``-1``): its difficulty cannot be measured.
- The standard deviation of per-class accuracy is the population one (``ddof=0``) over classes with support.
- "Worst 10%" is the mean accuracy of the ``ceil(0.1 * K_s)`` least accurate classes (at least one), where
  ``K_s`` is the number of classes with support.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

GROUP_NAMES = ("easy", "medium", "hard")
STD_KIND = "population standard deviation (ddof=0) of per-class accuracy over classes with test images"

# The headline figures, in the order the paper's table and our reports show them.
FIGURES = ("top1", "balanced_accuracy", "easy", "medium", "hard", "worst_class", "worst10", "std")

ArrayLike = torch.Tensor | np.ndarray | Sequence[int]


def _as_numpy(x: ArrayLike, dtype: type | None = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _check_labels(values: np.ndarray, num_classes: int, what: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"{what} must lie in [0, {num_classes}), got values in [{values.min()}, {values.max()}]")


def confusion_matrix(preds: ArrayLike, targets: ArrayLike, num_classes: int) -> torch.Tensor:
    """Count (true class, predicted class) pairs.

    Args:
        preds: (N,) predicted class indices.
        targets: (N,) true class indices.
        num_classes: K, the number of classes.

    Returns:
        LongTensor (K, K); row = true class, column = predicted class.

    Raises:
        ValueError: shapes differ or an index lies outside ``[0, K)``.
    """
    p = _as_numpy(preds, np.int64).reshape(-1)
    t = _as_numpy(targets, np.int64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"preds and targets differ in length: {p.shape[0]} vs {t.shape[0]}")
    _check_labels(p, num_classes, "preds")
    _check_labels(t, num_classes, "targets")
    counts = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return torch.from_numpy(counts.reshape(num_classes, num_classes).astype(np.int64))


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    ok = den > 0
    out[ok] = 100.0 * num[ok] / den[ok]
    return out


def per_class_accuracy(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-class accuracy (recall) in percent from a confusion matrix; NaN for a class with no test images."""
    c = _as_numpy(conf, np.float64)
    return _ratio(np.diag(c), c.sum(axis=1))


def per_class_precision(conf: torch.Tensor | np.ndarray) -> np.ndarray:
    """Per-class precision in percent from a confusion matrix; NaN for a class that was never predicted."""
    c = _as_numpy(conf, np.float64)
    return _ratio(np.diag(c), c.sum(axis=0))


def group_names(n_groups: int) -> tuple[str, ...]:
    """``("easy", "medium", "hard")`` for three groups, else ``("group1", "group2", ...)``, easiest first."""
    return GROUP_NAMES if n_groups == len(GROUP_NAMES) else tuple(f"group{i + 1}" for i in range(n_groups))


def group_sizes(num_ranked: int, n_groups: int = 3) -> list[int]:
    """How many classes each group gets: sizes differ by at most one.

    The leftover classes (``num_ranked mod n_groups``) go to the outer groups first, alternating from the easy
    end: easy, then hard, then medium (for three groups). So 10 classes split 4/3/3, 11 split 4/3/4, and 2
    classes split 1/0/1: a two-class report still has an easy and a hard class.
    """
    base, extra = divmod(num_ranked, n_groups)
    sizes = [base] * n_groups
    order = [i for pair in zip(range(n_groups), reversed(range(n_groups)), strict=True) for i in pair]
    seen: list[int] = []
    for i in order:
        if i not in seen:
            seen.append(i)
    for i in seen[:extra]:
        sizes[i] += 1
    return sizes


def assign_groups(accuracy: ArrayLike, n_groups: int = 3) -> np.ndarray:
    """Split classes into difficulty groups by accuracy.

    Rule: classes with an accuracy (not NaN) are ranked by accuracy, highest first, ties broken by class index
    (lower index ranks first), and cut in rank order into ``n_groups`` consecutive groups with the sizes of
    :func:`group_sizes`. Classes whose accuracy is NaN (no test images) get group ``-1``: they belong to no
    group, because their difficulty was not measured.

    Args:
        accuracy: (K,) per-class accuracy, e.g. from :func:`per_class_accuracy`.
        n_groups: number of groups; 3 gives easy (0), medium (1), hard (2).

    Returns:
        int64 ndarray (K,): group index per class, 0 = easiest, ``-1`` = no group.
    """
    acc = _as_numpy(accuracy, np.float64).reshape(-1)
    idx = np.arange(acc.shape[0])
    ranked = idx[~np.isnan(acc)]
    # lexsort uses its last key as the primary one: accuracy descending, then class index ascending.
    ranked = ranked[np.lexsort((ranked, -acc[ranked]))]
    groups = np.full(acc.shape[0], -1, dtype=np.int64)
    start = 0
    for g, size in enumerate(group_sizes(ranked.shape[0], n_groups)):
        groups[ranked[start : start + size]] = g
        start += size
    return groups


def grouping_rule(sizes: Sequence[int], source: str, ungrouped: int = 0) -> str:
    """The grouping rule in words, for reports."""
    names = group_names(len(sizes))
    text = (
        f"Classes are ranked by {source} per-class accuracy (highest first, ties by class index) and cut into "
        f"{'/'.join(names)} groups of {'/'.join(str(s) for s in sizes)} classes; sizes differ by at most one, "
        "and leftover classes go to the outer groups first (easy, then hard)."
    )
    if ungrouped:
        text += f" {ungrouped} class{'es' if ungrouped > 1 else ''} without test images belong to no group."
    return text


def _figures(class_correct: np.ndarray, support: np.ndarray, groups: np.ndarray, n_groups: int) -> dict:
    """Headline figures for R replicates at once from per-class correct counts (R, K) and support (K,)."""
    class_correct = np.atleast_2d(class_correct).astype(np.float64)
    has = support > 0
    acc = class_correct[:, has] * (100.0 / support[has])  # (R, K_s)
    g = groups[has]
    r = class_correct.shape[0]
    n_images = support.sum()
    out: dict[str, np.ndarray] = {
        "top1": class_correct.sum(axis=1) * 100.0 / n_images if n_images else np.full(r, np.nan),
    }
    if acc.shape[1] == 0:
        nan = np.full(r, np.nan)
        out.update(balanced_accuracy=nan, worst_class=nan, worst10=nan, std=nan, worst_index=np.full(r, -1))
        for name in group_names(n_groups):
            out[name] = nan
        return out
    out["balanced_accuracy"] = acc.mean(axis=1)
    for gi, name in enumerate(group_names(n_groups)):
        members = g == gi
        out[name] = acc[:, members].mean(axis=1) if members.any() else np.full(r, np.nan)
    # argmin returns the first minimum: the worst class's ties go to the lowest class index.
    out["worst_index"] = np.flatnonzero(has)[acc.argmin(axis=1)]
    out["worst_class"] = acc.min(axis=1)
    m = max(1, math.ceil(0.1 * acc.shape[1]))
    out["worst10"] = np.sort(acc, axis=1)[:, :m].mean(axis=1)
    out["std"] = acc.std(axis=1)
    return out


def _n_groups(groups: np.ndarray) -> int:
    return max(len(GROUP_NAMES), int(groups.max()) + 1 if groups.size else 0)


def summarize(
    preds: ArrayLike,
    targets: ArrayLike,
    num_classes: int,
    topk: ArrayLike | None = None,
    groups: ArrayLike | None = None,
) -> dict:
    """Every per-class disparity figure of one run on its test set (percentages, 0-100).

    Args:
        preds: (N,) top-1 predictions.
        targets: (N,) true labels.
        num_classes: K.
        topk: optional (N, k) ranked predictions; top-5 is reported when K >= 5 and k >= 5.
        groups: optional (K,) fixed grouping (e.g. from a baseline run, see :func:`assign_groups`). When None,
            the run is grouped by its own per-class accuracy and ``"grouping"`` says ``"self"``.

    Returns:
        dict with ``num_classes``, ``num_images``, ``top1``, ``top5`` (None when not defined),
        ``balanced_accuracy`` (mean per-class accuracy over classes with test images), ``groups``
        (``{name: {"size", "accuracy"}}``, accuracy = mean per-class accuracy of the group, NaN when empty),
        ``worst_class`` (``{"index", "accuracy"}``), ``worst10`` (``{"count", "accuracy"}``), ``std``,
        ``std_kind``, ``grouping`` (``"self"`` or ``"given"``), ``class_groups`` (list of K ints, -1 = none),
        ``classes_without_support``, ``per_class_accuracy`` and ``per_class_precision`` (lists of K floats,
        NaN where undefined).
    """
    t = _as_numpy(targets, np.int64).reshape(-1)
    conf = confusion_matrix(preds, t, num_classes).numpy()
    acc = per_class_accuracy(conf)
    if groups is None:
        g = assign_groups(acc)
        grouping = "self"
    else:
        g = _as_numpy(groups, np.int64).reshape(-1)
        if g.shape[0] != num_classes:
            raise ValueError(f"groups has {g.shape[0]} entries for {num_classes} classes")
        grouping = "given"
    n_groups = _n_groups(g)
    support = conf.sum(axis=1)
    fig = _figures(np.diag(conf)[None, :], support, g, n_groups)
    top5 = None
    if topk is not None and num_classes >= 5:
        k = _as_numpy(topk, np.int64)
        if k.ndim == 2 and k.shape[1] >= 5 and k.shape[0] == t.shape[0] and t.shape[0] > 0:
            top5 = 100.0 * float((k[:, :5] == t[:, None]).any(axis=1).mean())
    has = support > 0
    return {
        "num_classes": int(num_classes),
        "num_images": int(t.shape[0]),
        "top1": float(fig["top1"][0]),
        "top5": top5,
        "balanced_accuracy": float(fig["balanced_accuracy"][0]),
        "groups": {
            name: {"size": int((g == gi).sum()), "accuracy": float(fig[name][0])}
            for gi, name in enumerate(group_names(n_groups))
        },
        "worst_class": {"index": int(fig["worst_index"][0]), "accuracy": float(fig["worst_class"][0])},
        "worst10": {
            "count": max(1, math.ceil(0.1 * int(has.sum()))) if has.any() else 0,
            "accuracy": float(fig["worst10"][0]),
        },
        "std": float(fig["std"][0]),
        "std_kind": STD_KIND,
        "grouping": grouping,
        "class_groups": g.tolist(),
        "classes_without_support": int((~has).sum()),
        "per_class_accuracy": acc.tolist(),
        "per_class_precision": per_class_precision(conf).tolist(),
    }


def headline_figures(summary: dict) -> dict[str, float]:
    """The flat figures of :data:`FIGURES` (plus any extra groups) from a :func:`summarize` result."""
    out = {"top1": summary["top1"], "balanced_accuracy": summary["balanced_accuracy"]}
    out.update({name: g["accuracy"] for name, g in summary["groups"].items()})
    out["worst_class"] = summary["worst_class"]["accuracy"]
    out["worst10"] = summary["worst10"]["accuracy"]
    out["std"] = summary["std"]
    return out


def _stack_seeds(correct: ArrayLike | Sequence[ArrayLike], n: int, what: str) -> np.ndarray:
    if isinstance(correct, (list, tuple)) and len(correct) > 0 and np.ndim(_as_numpy(correct[0])) == 1:
        arr = np.stack([_as_numpy(c).reshape(-1) for c in correct])
    else:
        arr = np.atleast_2d(_as_numpy(correct))
    if arr.ndim != 2 or arr.shape[1] != n or arr.shape[0] == 0:
        raise ValueError(f"{what} must be (N,) or a list of (N,) arrays with N = {n}, got shape {arr.shape}")
    return arr.astype(np.float64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    # Runs of equal values share the mean of the ranks they span (1-based).
    boundaries = np.flatnonzero(np.diff(xs)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [xs.shape[0]]))
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(x.shape[0], dtype=np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(x: ArrayLike, y: ArrayLike) -> float:
    """Spearman rank correlation with average ranks for ties, over the pairs where neither value is NaN.

    Returns NaN when fewer than two pairs remain or either side is constant.
    """
    xa = _as_numpy(x, np.float64).reshape(-1)
    ya = _as_numpy(y, np.float64).reshape(-1)
    if xa.shape != ya.shape:
        raise ValueError(f"x and y differ in length: {xa.shape[0]} vs {ya.shape[0]}")
    keep = ~(np.isnan(xa) | np.isnan(ya))
    xa, ya = xa[keep], ya[keep]
    if xa.shape[0] < 2:
        return float("nan")
    rx, ry = _average_ranks(xa), _average_ranks(ya)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    return float((rx * ry).sum() / den) if den > 0 else float("nan")
