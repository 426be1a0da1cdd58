"""``mr2ft study``: does MR2 help the hard classes on this data, beyond a matched control and beyond noise?

ERM (``ce``, weight decay and a global logit temperature tuned on validation) and MR2 (``mr2``, c_bar tuned on
validation over the same grid), each over N seeds on the same data; plus, where one shared margin is not simply ERM
(fine-tune mode, or additive margins), the matched control (``uniform``: one margin for every class, i.e. MR2 without
its class dependence). Then, from the run folders alone: easy/medium/hard groups from data the comparison does not
score (ERM's validation accuracy by default; ``--groups crossfit`` or the paper's ``--groups test``, labelled as
subject to selection bias), the paper's table averaged over seeds, bootstrap intervals paired by seed, one verdict on
the whole picture, and the diagnostics MR2's argument rests on.

Modules: :mod:`~mr2ft.study.run` (settings, checks and the runs), :mod:`~mr2ft.study.build` (study.json from the run
folders), :mod:`~mr2ft.study.analysis` (groups, table, intervals, verdict, diagnostics) and
:mod:`~mr2ft.study.render` (terminal, Markdown, HTML).

Layout of the study folder::

    config.yaml                    the resolved study config (``mr2ft study --recipe DIR`` repeats it)
    <method>-seed<i>/              one complete run folder per method and seed (``mr2ft report`` reads it)
    study.json, study.md, study.html
"""

from __future__ import annotations

from mr2ft.study.analysis import (
    CI,
    GROUP_RULES,
    LABELS,
    METHODS,
    TABLE_FIGURES,
    TOLERANCE,
    analyze,
    comparison_key,
    comparisons_of,
    control_of,
    diagnostics,
    direction,
    matched_c_bar,
    mean_inverse_margin,
    methods_of,
    representation_check,
    verdict,
)
from mr2ft.study.build import build_study
from mr2ft.study.render import print_study, render_html, render_markdown, study_table, table_rows, write_study
from mr2ft.study.run import (
    finetune_settings,
    method_config,
    run_study,
    seeds_of,
    study_configs,
    validate_study,
)

__all__ = [
    "CI",
    "GROUP_RULES",
    "LABELS",
    "METHODS",
    "TABLE_FIGURES",
    "TOLERANCE",
    "analyze",
    "build_study",
    "comparison_key",
    "comparisons_of",
    "control_of",
    "diagnostics",
    "direction",
    "finetune_settings",
    "matched_c_bar",
    "mean_inverse_margin",
    "method_config",
    "methods_of",
    "print_study",
    "render_html",
    "render_markdown",
    "representation_check",
    "run_study",
    "seeds_of",
    "study_configs",
    "study_table",
    "table_rows",
    "validate_study",
    "verdict",
    "write_study",
]
