"""Per-class evaluation: confusion matrix, per-class accuracy, easy/medium/hard groups, disparity figures, and
the groupings and paired bootstrap the comparisons use.

Everything here is a pure function on tensors or arrays; probe, finetune, report and study all use it. Modules:
:mod:`~mr2ft.metrics.figures` (one run's figures) and :mod:`~mr2ft.metrics.resample` (cross-fitted groupings,
figures per seed, the bootstrap paired by seed); this package re-exports their public names.

The conventions every figure follows (percentages, classes without test images, the std, "worst 10%") are stated
in :mod:`~mr2ft.metrics.figures`.
"""

from __future__ import annotations

from mr2ft.metrics.figures import (
    FIGURES,
    GROUP_NAMES,
    STD_KIND,
    assign_groups,
    confusion_matrix,
    group_names,
    group_sizes,
    grouping_rule,
    headline_figures,
    per_class_accuracy,
    per_class_precision,
    spearman,
    summarize,
)
from mr2ft.metrics.resample import (
    Grouping,
    class_accuracy,
    crossfit_grouping,
    crossfit_halves,
    crossfit_rule,
    crossfit_summaries,
    figures_by_seed,
    paired_bootstrap,
)

__all__ = [
    "FIGURES",
    "GROUP_NAMES",
    "STD_KIND",
    "Grouping",
    "assign_groups",
    "class_accuracy",
    "confusion_matrix",
    "crossfit_grouping",
    "crossfit_halves",
    "crossfit_rule",
    "crossfit_summaries",
    "figures_by_seed",
    "group_names",
    "group_sizes",
    "grouping_rule",
    "headline_figures",
    "paired_bootstrap",
    "per_class_accuracy",
    "per_class_precision",
    "spearman",
    "summarize",
]
