"""The study's analysis: groups, the table over seeds, paired intervals, the verdict and the diagnostics.

Pure functions on predictions and per-class numbers; nothing here reads or writes a run folder. The rules:

- Groups never come from the images they are scored on, unless asked: ``validation`` (the default) ranks the classes
  by ERM's per-class accuracy on validation data; ``crossfit`` ranks them on one half of each class's test images and
  scores the other half, then swaps; ``test`` (the paper's protocol) ranks them on the scored test images and is
  labelled as subject to selection bias wherever it appears.
- Intervals pair methods by seed: each bootstrap replicate resamples the test images within each class and the seed
  indices, the same ones for every method (:func:`mr2ft.metrics.paired_bootstrap`).
- The verdict reads the whole picture: "helps" needs the hard group's interval above 0 *and* overall accuracy not
  worse beyond :data:`TOLERANCE` points (the lower end of its interval above ``-TOLERANCE``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from mr2ft import metrics
from mr2ft.report.kit import json_safe

METHODS = ("ce", "uniform", "mr2")
LABELS = {"ce": "ERM", "uniform": "matched control", "mr2": "MR2"}
GROUP_RULES = ("validation", "crossfit", "test")
TABLE_FIGURES = ("top1", "easy", "medium", "hard", "worst_class", "std")
CI = 0.95
# "Helps" needs overall accuracy not worse beyond this many points: the lower end of its interval above -TOLERANCE.
TOLERANCE = 0.5
# Below this share of the logit margin's gradient, the representation margin is called inactive.
REP_SHARE_FLOOR = 0.01
SELECTION_BIAS = (
    "Groups were chosen on the scored test images (--groups test, the paper's protocol): subject to selection bias. "
    "Classes hard for ERM partly by chance on these images look better for any other method (regression to the "
    "mean), so a method with no effect can gain on 'hard'."
)


def comparison_key(a: str, b: str) -> str:
    """``"mr2_vs_uniform"`` for the change from ``a`` to ``b``."""
    return f"{b}_vs_{a}"


def methods_of(mode: str, margin_mode: str) -> tuple[str, ...]:
    """The methods a study runs. In a probe with ``scale`` margins one shared margin c_bar is exactly ERM at
    temperature c_bar, and ERM tunes its temperature over the same grid: the control would repeat ERM, so it is left
    out and the temperature-tuned ERM is the matched control."""
    return ("ce", "mr2") if (mode == "probe" and margin_mode == "scale") else METHODS


def control_of(methods: Sequence[str]) -> str:
    """The matched control MR2 is judged against: ``uniform`` when the study runs it, else the tuned ERM."""
    return "uniform" if "uniform" in methods else "ce"


def comparisons_of(methods: Sequence[str]) -> list[tuple[str, str]]:
    """(a, b) pairs, each the change b - a; the last one is the attribution (MR2 vs its matched control)."""
    if "uniform" in methods:
        return [("ce", "uniform"), ("ce", "mr2"), ("uniform", "mr2")]
    return [("ce", "mr2")]


def _array(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x).reshape(-1)


def _fixed(accuracy: np.ndarray, source: str, n_images: int, note: str) -> tuple[metrics.Grouping, str]:
    groups = metrics.assign_groups(accuracy)
    sizes = [int((groups == g).sum()) for g in range(3)]
    text = metrics.grouping_rule(sizes, source, int((groups < 0).sum())) + " " + note
    return metrics.Grouping.fixed(groups, n_images, text), text


def build_grouping(
    rule: str, correct_ce: np.ndarray, t: np.ndarray, num_classes: int, group_accuracy: Any, seed: int
) -> tuple[metrics.Grouping, str]:
    """The :class:`mr2ft.metrics.Grouping` a rule gives, and the rule in words."""
    n_seeds = correct_ce.shape[0]
    seeds = f"mean over {n_seeds} seed{'s' if n_seeds > 1 else ''}"
    if rule == "validation":
        if group_accuracy is None:
            raise ValueError("groups from validation need ERM's per-class validation accuracy (group_accuracy)")
        acc = np.asarray(group_accuracy, dtype=np.float64).reshape(-1)
        note = "The validation images are never scored, so the groups carry no selection bias from the test set."
        return _fixed(acc, f"ERM's validation ({seeds})", t.shape[0], note)
    if rule == "crossfit":
        g = metrics.crossfit_grouping(correct_ce, t, num_classes, seed)
        text = metrics.crossfit_rule(seed, f"ERM's ({seeds})")
        return metrics.Grouping(g.part, g.parts, text), text
    if rule == "test":
        acc = metrics.class_accuracy(correct_ce, t, num_classes, np.ones(t.shape[0], dtype=bool))
        return _fixed(acc, f"ERM's test ({seeds})", t.shape[0], SELECTION_BIAS)
    raise ValueError(f"unknown grouping rule {rule!r}; use one of {', '.join(GROUP_RULES)}")


def _per_seed_table(correct: np.ndarray, t: np.ndarray, num_classes: int, grouping: metrics.Grouping) -> dict:
    by_seed = metrics.figures_by_seed(correct, t, num_classes, grouping)
    n = correct.shape[0]
    return {
        "seeds": n,
        "values": {k: float(np.mean(v)) for k, v in by_seed.items()},
        "seed_std": {k: float(np.std(v, ddof=1)) if n > 1 else None for k, v in by_seed.items()},
        "per_seed": [{k: float(v[i]) for k, v in by_seed.items()} for i in range(n)],
    }


def analyze(
    targets: Sequence[int] | np.ndarray | torch.Tensor,
    preds: Mapping[str, Sequence[Any]],
    num_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = CI,
    groups: str = "validation",
    group_accuracy: Sequence[float] | np.ndarray | None = None,
    tolerance: float = TOLERANCE,
) -> dict:
    """Groups, the table over seeds, every paired comparison and the verdict, from test predictions alone.

    Args:
        targets: (N,) test labels shared by every run.
        preds: for ``ce``, ``mr2`` and optionally ``uniform``, a list of (N,) top-1 predictions, one per seed; seed i
            of every method is a pair (same data order and split), so every method needs the same number of seeds.
        num_classes: K.
        n_boot: bootstrap replicates per comparison.
        seed: seed of the bootstrap resampling (and of the cross-fit halves).
        ci: coverage of the intervals.
        groups: ``validation`` (needs ``group_accuracy``), ``crossfit`` or ``test`` (see the module docstring).
        group_accuracy: (K,) ERM's per-class validation accuracy (mean over its seeds), for ``validation``.
        tolerance: how far (points) overall accuracy may be worse at the lower end of its interval for "helps".

    Returns:
        JSON-safe dict with ``methods``, ``control``, ``attribution``, ``grouping``, ``table`` (per method: mean over
        seeds of each figure, the seeds' standard deviation, each seed's figures), ``per_class_accuracy`` (mean over
        seeds, every test image), ``comparisons``, ``bootstrap`` and ``verdict`` (:func:`verdict`).
    """
    t = _array(targets).astype(np.int64)
    methods = tuple(m for m in METHODS if preds.get(m))
    if "ce" not in methods or "mr2" not in methods:
        raise ValueError("a study needs predictions of ce (ERM) and mr2")
    correct = {m: np.stack([_array(x) == t for x in preds[m]]).astype(np.float64) for m in methods}
    if len({c.shape[0] for c in correct.values()}) > 1:
        raise ValueError("every method needs the same number of seeds (seed i of each method is a pair)")
    grouping, rule = build_grouping(groups, correct["ce"], t, num_classes, group_accuracy, seed)
    table = {m: {"label": LABELS[m], **_per_seed_table(correct[m], t, num_classes, grouping)} for m in methods}
    comparisons = {}
    for a, b in comparisons_of(methods):
        boot = metrics.paired_bootstrap(t, correct[a], correct[b], grouping, num_classes, n_boot, seed, ci, paired=True)
        comparisons[comparison_key(a, b)] = {"a": a, "b": b, "label": f"{LABELS[b]} vs {LABELS[a]}", **boot}
    control = control_of(methods)
    attribution = comparison_key(control, "mr2")
    n_seeds = correct["ce"].shape[0]
    class_groups = [p.tolist() for p in grouping.parts]
    out = {
        "methods": list(methods),
        "control": control,
        "attribution": attribution,
        "num_classes": int(num_classes),
        "num_images": int(t.shape[0]),
        "grouping": {
            "rule_name": groups,
            "rule": rule,
            "selection_bias": groups == "test",
            "sizes": _sizes(grouping),
            "class_groups": class_groups[0],
            "class_groups_other_half": class_groups[1] if len(class_groups) > 1 else None,
        },
        "table": table,
        "per_class_accuracy": {
            m: np.mean([metrics.per_class_accuracy(metrics.confusion_matrix(x, t, num_classes)) for x in preds[m]], 0)
            for m in methods
        },
        "comparisons": comparisons,
        "bootstrap": bootstrap_info(n_boot, seed, ci, n_seeds),
    }
    out = json_safe(out)
    out["verdict"] = verdict(out["comparisons"], attribution, ci, tolerance, n_seeds, groups == "test")
    return out


def _sizes(grouping: metrics.Grouping) -> dict[str, float]:
    """Classes per group (the mean over the halves for a cross-fitted grouping)."""
    return {
        name: float(np.mean([(p == gi).sum() for p in grouping.parts])) for gi, name in enumerate(metrics.GROUP_NAMES)
    }


def bootstrap_info(n_boot: int, seed: int, ci: float, n_seeds: int) -> dict:
    """How the intervals were made, in fields and words."""
    method = (
        "paired by seed: each replicate resamples the test images within each class (within each class and half when "
        "cross-fitted) and the seed indices with replacement, the same indices for every method; the interval is that "
        "of the mean-over-seeds difference"
    )
    if n_seeds == 1:
        method += ". One training seed: seed-to-seed variance is NOT included (the interval covers test images only)"
    return {"n_boot": int(n_boot), "seed": int(seed), "ci": float(ci), "seeds": int(n_seeds), "method": method}


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def direction(figure: Mapping[str, Any]) -> str:
    """``"up"`` when the whole interval is above 0, ``"down"`` when below, ``"none"`` when it holds 0, else
    ``"unknown"`` (no interval)."""
    low, high = _num(figure.get("low")), _num(figure.get("high"))
    if low is None or high is None or _num(figure.get("delta")) is None:
        return "unknown"
    return "up" if low > 0 else "down" if high < 0 else "none"


def points(name: str, figure: Mapping[str, Any]) -> str:
    """``"hard +1.2 [+0.3, +2.1]"``."""
    return f"{name} {figure['delta']:+.1f} [{figure['low']:+.1f}, {figure['high']:+.1f}]"


# Per figure: is an interval above 0 good? (std: lower is more even, so a rise is a cost.)
_HIGHER_IS_BETTER = {"top1": True, "easy": True, "medium": True, "hard": True, "worst_class": True, "std": False}
_WORDS = {"top1": "overall", "worst_class": "worst class", "std": "std of per-class accuracy"}


def trade_offs(figures: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(gains, costs): every table figure whose interval excludes 0, in words, split by whether it is good news."""
    gains, costs = [], []
    for key, better_up in _HIGHER_IS_BETTER.items():
        d = direction(figures[key])
        if d in ("up", "down"):
            (gains if (d == "up") == better_up else costs).append(points(_WORDS.get(key, key), figures[key]))
    return gains, costs


def _against(control: str) -> str:
    return (
        "the matched control" if control == "uniform" else "ERM (temperature tuned on validation: the matched control)"
    )


def _first_sentence(kind: str, attr: Mapping[str, Any], control: str, tolerance: float) -> str:
    hard, top1 = points("hard", attr["hard"]), points("overall", attr["top1"])
    against = _against(control)
    return {
        "unknown": "The hard group's accuracy could not be measured (no hard class with test images): no verdict.",
        "helps": f"MR2 helps the hard classes: against {against}, {hard}, and overall accuracy is not worse beyond "
        f"the {tolerance:g}-point tolerance ({top1}).",
        "mixed": f"Mixed: against {against} the hard classes gained ({hard}), but overall accuracy may be worse by "
        f"more than the {tolerance:g}-point tolerance ({top1}), so this is not called a help.",
        "hurts": f"MR2 hurt the hard classes: against {against}, {hard}.",
        "no distinguishable effect": f"No distinguishable effect on the hard classes: against {against}, {hard}; "
        "the interval holds 0.",
    }[kind]


def verdict(
    comparisons: Mapping[str, Any],
    attribution: str,
    ci: float = CI,
    tolerance: float = TOLERANCE,
    n_seeds: int = 1,
    selection_bias: bool = False,
) -> dict:
    """The study's answer in words, from MR2 vs its matched control (``attribution``) on the whole picture.

    ``kind``: ``helps`` (hard-group interval above 0 and the overall interval's lower end above ``-tolerance``),
    ``mixed`` (hard classes up, but overall may have fallen beyond the tolerance), ``hurts`` (hard-group interval
    below 0), ``no distinguishable effect`` or ``unknown``. ``gains`` and ``costs`` name every table figure whose
    interval excludes 0. With a separate control, ``vs_erm`` and ``control_vs_erm`` say how MR2 and the control did
    against ERM on the hard classes.
    """
    comp = comparisons[attribution]
    attr, control = comp["figures"], comp["a"]
    d_hard, low_top1 = direction(attr["hard"]), _num(attr["top1"].get("low"))
    if d_hard == "up":
        kind = "helps" if low_top1 is not None and low_top1 > -tolerance else "mixed"
    else:
        kind = {"down": "hurts", "none": "no distinguishable effect", "unknown": "unknown"}[d_hard]
    text = _first_sentence(kind, attr, control, tolerance)
    gains, costs = trade_offs(attr) if kind != "unknown" else ([], [])
    if gains or costs:
        listed = f"gains {', '.join(gains) or 'none'}; costs {', '.join(costs) or 'none'}"
        text += f" Changes whose interval excludes 0: {listed}."
    words = {"up": "better", "down": "worse", "none": "no distinguishable difference"}
    vs_erm = control_vs_erm = None
    if control == "uniform":
        erm, ctrl = (
            comparisons[comparison_key("ce", "mr2")]["figures"],
            comparisons[comparison_key("ce", "uniform")]["figures"],
        )
        vs_erm, control_vs_erm = (
            words.get(direction(erm["hard"]), "unknown"),
            words.get(direction(ctrl["hard"]), "unknown"),
        )
        if vs_erm != "unknown":
            text += f" Against ERM, MR2 changed {points('hard', erm['hard'])} ({vs_erm})."
        if kind == "no distinguishable effect" and vs_erm == "better" and control_vs_erm == "better":
            text += (
                f" The matched control gained too ({points('hard', ctrl['hard'])}): the gain comes from having a "
                "margin (one global logit temperature), not from making it depend on the class."
            )
    if n_seeds == 1:
        text += " One training seed: seed-to-seed variance is not included in the intervals."
    if selection_bias:
        text += " " + SELECTION_BIAS
    return {
        "kind": kind,
        "against": control,
        "vs_erm": vs_erm,
        "control_vs_erm": control_vs_erm,
        "gains": gains,
        "costs": costs,
        "tolerance": tolerance,
        "rule": f"helps = the hard group's {round(100 * ci)}% interval above 0 and overall accuracy not worse beyond "
        f"{tolerance:g} points (the lower end of its interval above -{tolerance:g})",
        "text": text,
        "interval": f"{round(100 * ci)}% bootstrap interval paired by seed, over test images and seeds",
    }


# ---- diagnostics ---------------------------------------------------------------------------------------------------


def diagnostics(
    accuracy: Sequence[float] | np.ndarray,
    spread: Sequence[float] | np.ndarray | None,
    gamma: Sequence[float] | np.ndarray | None,
) -> dict:
    """Spearman correlations the paper's argument rests on, against ERM's per-class accuracy, with warnings.

    Hard classes should be more spread out (spread vs accuracy negative) and MR2 should give them larger margins
    (gamma vs accuracy negative). A positive (or unmeasurable) correlation gets a warning in words.
    """
    acc = np.asarray(accuracy, dtype=np.float64)

    def rho(values: Any) -> float | None:
        if values is None:
            return None
        return _num(metrics.spearman(np.asarray(values, dtype=np.float64), acc))

    r_s, r_g = rho(spread), rho(gamma)
    warnings = []
    if spread is None or r_s is None:
        warnings.append("The spread-accuracy correlation could not be measured (no class statistics, or constant).")
    elif r_s > 0:
        warnings.append(
            f"The premise fails here: more accurate classes have MORE spread-out features (Spearman {r_s:+.2f}); "
            "MR2 assumes hard classes are the spread-out ones."
        )
    if gamma is None or r_g is None:
        warnings.append(
            "MR2's margins are equal for every class (or were not saved): it cannot act differently from the control."
        )
    elif r_g > 0:
        warnings.append(
            f"MR2's margins point the wrong way: the largest margins went to the most accurate classes (Spearman "
            f"{r_g:+.2f}); on L2-normalised features (CLIP) the Lp statistics can do this: compare --p values."
        )
    return {
        "spread_vs_accuracy": r_s,
        "gamma_vs_accuracy": r_g,
        "expected": "negative: hard (less accurate) classes are more spread out and get larger margins",
        "method": "Spearman rank correlation (average ranks for ties) with ERM's per-class test accuracy",
        "warnings": warnings,
    }


def representation_check(share: float | None, source: str, applied: bool = True) -> dict:
    """The representation margin's gradient share (``||grad lambda L_RM|| / ||grad L_LM||`` on the features) and
    a plain warning when it is under :data:`REP_SHARE_FLOOR` (e.g. on L2-normalised CLIP features).

    ``applied``: whether the runs trained with it (a fine-tune) or only measured what it would add (a probe, whose
    features are fixed)."""
    share = _num(share)
    warning = None
    if share is not None and share < REP_SHARE_FLOOR:
        verb = "is" if applied else "would be"
        warning = (
            f"MR2's representation margin {'is' if applied else 'would be'} inactive on these features: its gradient "
            f"{verb} {100 * share:.2g}% of the logit margin's, under {100 * REP_SHARE_FLOOR:g}%, so MR2 "
            f"{'acts' if applied else 'would act'} through its logit margins alone (raising lambda_rep or lowering "
            "temperature_factor changes that)."
        )
    return {"rep_grad_share": share, "source": source, "applied": applied, "floor": REP_SHARE_FLOOR, "warning": warning}


def mean_inverse_margin(gamma: Sequence[float] | np.ndarray, class_counts: Sequence[float] | np.ndarray) -> float:
    """``sum_k w_k / gamma_k`` with ``w_k`` each class's share of the training images: in scale mode a sample's
    logits are divided by gamma of its class, and the loss averages over samples, so this is the mean factor that
    acts. (Its inverse, the weighted harmonic mean of gamma, is the one shared margin with the same mean.)"""
    g = np.asarray(gamma, dtype=np.float64).reshape(-1)
    w = np.asarray(class_counts, dtype=np.float64).reshape(-1)
    keep = np.isfinite(g) & (g > 0) & (w > 0)
    if not keep.any():
        raise ValueError("no class with a positive margin and training images")
    return float((w[keep] / g[keep]).sum() / w[keep].sum())


def matched_c_bar(gamma: Sequence[float] | np.ndarray, class_counts: Sequence[float] | np.ndarray) -> float:
    """The control's one shared margin matched on MR2's mean inverse margin (weighted harmonic mean of gamma)."""
    return 1.0 / mean_inverse_margin(gamma, class_counts)
