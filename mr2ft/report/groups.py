"""Which images choose the easy/medium/hard groups of a comparison, and the changes with intervals under them.

A comparison (``report --baseline``, ``compare``) ranks classes by a reference run's per-class accuracy. If the
ranking came from the test images the runs are scored on, classes that were hard for the reference partly by
chance would look better for any other run (regression to the mean). So the groups never come from the scored
images unless asked (``--groups``):

- ``val``: the reference's per-class accuracy on its validation split (when the run saved validation
  predictions); every test image is scored.
- ``crossfit``: each class's test images are split into two fixed halves; groups from the reference's accuracy
  on one half score the other half, and back; the two are averaged (:func:`mr2ft.metrics.crossfit_grouping`).
- ``test``: the paper's protocol, groups from the reference's accuracy on the scored test images. Labelled as
  subject to selection bias wherever it is shown.

The default is ``val`` when the reference has validation predictions, else ``crossfit``. Figures that do not
depend on groups (top-1, balanced accuracy, worst class, worst 10%, std) are always those of all test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mr2ft import metrics
from mr2ft.errors import UserError

GROUP_RULES = ("val", "crossfit", "test")
CROSSFIT_SEED = 0
BOOT_SEED = 0
CI = 0.95
SELECTION_BIAS = (
    "Subject to selection bias: these groups were chosen on the same test images they are scored on, so classes "
    "that were hard for the reference partly by chance look better for any other run (regression to the mean). "
    "Use --groups crossfit (or val) for an unbiased comparison."
)
SELECTION_BIAS_OTHER_IMAGES = (
    "Subject to selection bias: the baseline was tested on other images than this run, and its groups were chosen "
    "on those same images, so the baseline's own group figures (and the changes against them) are biased: classes "
    "hard for it partly by chance look harder than they are."
)
RULE_NAMES = {
    "val": "groups from the reference's validation accuracy",
    "crossfit": "cross-fitted groups (chosen on one half of each class's test images, scored on the other)",
    "test": "groups from the reference's accuracy on the scored test images (paper's protocol; selection bias)",
    "self": "groups from this run's own test accuracy (no baseline)",
}


@dataclass(frozen=True)
class GroupChoice:
    """The grouping of one comparison.

    Attributes:
        method: ``val``, ``crossfit`` or ``test``.
        scoring: the :class:`mr2ft.metrics.Grouping` that scores the group figures.
        display: (K,) groups shown per class in tables and plots (for ``crossfit``: the reference's ranking on all
            test images, for orientation only).
        sizes: classes per group (of ``display``).
        rule: the rule in words.
        warning: the selection-bias warning (``test`` only).
    """

    method: str
    scoring: metrics.Grouping
    display: np.ndarray
    sizes: list[int]
    rule: str
    warning: str | None = None

    @property
    def biased(self) -> bool:
        return self.method == "test"

    def describe(self, source: str) -> dict:
        """The ``grouping`` entry of a report or compare result."""
        names = metrics.group_names(len(self.sizes))
        return {
            "source": source,
            "method": self.method,
            "method_name": RULE_NAMES[self.method],
            "selection_bias": self.biased,
            "warning": self.warning,
            "rule": self.rule,
            "sizes": dict(zip(names, self.sizes, strict=True)),
        }


def has_validation(run: dict) -> bool:
    """Whether a loaded run carries its validation predictions (``val_targets``, ``val_preds``)."""
    return run.get("val_targets") is not None and run.get("val_preds") is not None


def check_rule(rule: str | None) -> str | None:
    """A ``--groups`` value, checked (None = the default)."""
    if rule is None:
        return None
    rule = rule.strip().lower()
    if rule not in GROUP_RULES:
        raise UserError(f"unknown --groups {rule!r}; choose val, crossfit or test (default: val when available)")
    return rule


def _sizes(groups: np.ndarray) -> list[int]:
    n = max(len(metrics.GROUP_NAMES), int(groups.max()) + 1 if groups.size else 0)
    return [int((groups == g).sum()) for g in range(n)]


def choose_groups(ref: dict, k: int, rule: str | None, who: str, same_test_set: bool = True) -> GroupChoice:
    """Decide the grouping of a comparison whose reference run is ``ref`` (see the module docstring).

    Args:
        ref: the reference run (:func:`mr2ft.report.build.read_run`): the baseline, or compare's first run.
        k: number of classes.
        rule: ``val``, ``crossfit``, ``test`` or None (val when ``ref`` has validation predictions, else crossfit).
        who: the reference in words, e.g. "the baseline's (runs/ce)".
        same_test_set: whether the compared run was tested on the reference's test images (cross-fitting needs it).

    Raises:
        UserError: an unknown rule, ``val`` without validation predictions, ``crossfit`` across test sets.
    """
    rule = check_rule(rule)
    targets = ref["targets"].numpy()
    test_acc = metrics.per_class_accuracy(metrics.confusion_matrix(ref["preds"], targets, k).numpy())
    test_groups = metrics.assign_groups(test_acc)
    if rule is None:
        rule = "val" if has_validation(ref) else "crossfit" if same_test_set else "test"
    if rule == "val":
        if not has_validation(ref):
            raise UserError(
                f"--groups val needs validation predictions, and {ref['path']} saved none (it ran without a "
                "validation split); use --groups crossfit"
            )
        conf = metrics.confusion_matrix(ref["val_preds"], ref["val_targets"], k).numpy()
        val_acc = metrics.per_class_accuracy(conf)
        groups = metrics.assign_groups(val_acc)
        ungrouped = int(np.isnan(val_acc).sum())
        rule_text = metrics.grouping_rule(_sizes(groups), f"{who} validation", ungrouped)
        rule_text += " The validation images are not scored: no image both chooses a group and is scored in it."
        return GroupChoice("val", metrics.Grouping.fixed(groups, targets.shape[0]), groups, _sizes(groups), rule_text)
    ungrouped = int(np.isnan(test_acc).sum())
    if rule == "test":
        rule_text = metrics.grouping_rule(_sizes(test_groups), f"{who} test", ungrouped)
        rule_text += (
            " These are the images every run is scored on (the paper's protocol): subject to selection bias."
            if same_test_set
            else " The baseline is scored on these same images: its figures are subject to selection bias."
        )
        scoring = metrics.Grouping.fixed(test_groups, targets.shape[0])
        warning = SELECTION_BIAS if same_test_set else SELECTION_BIAS_OTHER_IMAGES
        return GroupChoice("test", scoring, test_groups, _sizes(test_groups), rule_text, warning)
    if not same_test_set:
        raise UserError("--groups crossfit needs runs tested on the same images; use --groups val or test")
    scoring = metrics.crossfit_grouping((ref["preds"] == ref["targets"]).numpy(), targets, k, CROSSFIT_SEED)
    sizes = _sizes(scoring.parts[0])
    rule_text = metrics.crossfit_rule(CROSSFIT_SEED, source=who)
    rule_text += f" Group sizes {'/'.join(str(s) for s in sizes)} classes."
    if ungrouped:
        rule_text += f" {ungrouped} class{'es' if ungrouped > 1 else ''} without test images: in no group."
    rule_text += (
        " The per-class table and plots show each class's group by the reference's accuracy on all test images,"
        " for orientation only."
    )
    return GroupChoice("crossfit", scoring, test_groups, sizes, rule_text)


def paired_changes(
    choice: GroupChoice,
    targets: np.ndarray,
    correct_ref: np.ndarray,
    correct: np.ndarray,
    k: int,
    n_boot: int = 1000,
    seed: int = BOOT_SEED,
) -> dict:
    """Every headline figure's change (run - reference) with a paired bootstrap interval.

    Group figures (easy, medium, hard) are scored with ``choice.scoring``; the others on all test images.

    Returns:
        ``{figure: {"a", "b", "delta", "low", "high"}}`` (a = reference, b = run), percentage points.
    """
    fixed = metrics.Grouping.fixed(choice.display, targets.shape[0])
    out = metrics.paired_bootstrap(targets, correct_ref, correct, fixed, k, n_boot, seed, CI)["figures"]
    if choice.method == "crossfit":
        cross = metrics.paired_bootstrap(targets, correct_ref, correct, choice.scoring, k, n_boot, seed, CI)
        for name in metrics.group_names(len(choice.sizes)):
            out[name] = cross["figures"][name]
    return out


def group_values(choice: GroupChoice, targets: np.ndarray, correct: np.ndarray, k: int) -> dict[str, float]:
    """One run's mean accuracy per group under ``choice.scoring`` (cross-fitted: the mean over the two halves)."""
    g = choice.scoring
    strata = g.strata(targets, k)
    size = k * len(g.parts)
    support = np.bincount(strata, minlength=size)
    counts = np.bincount(strata, weights=correct.astype(np.float64), minlength=size)[None, :]
    fig = g.score(counts, support, k)
    return {name: float(fig[name][0]) for name in metrics.group_names(len(choice.sizes))}
