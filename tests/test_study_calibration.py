"""The study's verdict, calibrated by simulation through the same analysis code (:func:`mr2ft.study.analyze`).

Simulated studies: K classes with known per-class accuracies; ERM's seeds get independent errors; MR2 seed i is ERM
seed i (its pair: same data order and split) with a share of its images' outcomes drawn afresh from the same true
per-class accuracy: MR2 has ERM's per-class accuracy but its own errors (5-25% of the images differ). The groups come
from ERM's per-class accuracy on simulated validation images (the study's default). Without an effect "helps" must
be rare (at most 5% of the studies); with +3 points planted on the hard classes it must be common (at least 80%).
"""

from __future__ import annotations

import numpy as np

from mr2ft import study

N_BOOT = 200


def redraw(correct: np.ndarray, p: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """Another model with the same true per-class accuracy ``p`` (per image) and its own errors: each image's
    outcome is drawn afresh with probability ``q``, chosen so that about ``share`` of the images differ
    (``q = share / (2 p (1 - p))``, at most 1: a redraw differs with probability ``2 p (1 - p)``)."""
    q = np.minimum(1.0, share / np.maximum(2 * p * (1 - p), 1e-9))
    fresh = rng.random(correct.shape[0]) < p
    return np.where(rng.random(correct.shape[0]) < q, fresh, correct)


def simulate(
    rng: np.random.Generator,
    k: int,
    seeds: int,
    share: float,
    effect: float,
    per_class: int,
    groups: str = "validation",
) -> dict:
    """One simulated study through :func:`mr2ft.study.analyze`; ``effect`` points planted on the hardest third."""
    p = rng.uniform(0.35, 0.97, k)
    targets = np.repeat(np.arange(k), per_class)
    hard = np.zeros(k, dtype=bool)
    hard[np.argsort(p)[: k // 3]] = True
    # ERM's validation accuracy: its own images (as many per class as the test has), mean over the seeds.
    val_accuracy = 100.0 * rng.binomial(per_class, p, size=(seeds, k)).mean(axis=0) / per_class
    ce, mr2 = [], []
    for _ in range(seeds):
        erm = rng.random(targets.shape[0]) < p[targets]
        other = redraw(erm, p[targets], share, rng)
        if effect:
            # each wrong image of a hard class turns right with the probability that adds `effect` points on average
            gain = np.where(hard, effect / 100.0 / (1.0 - p), 0.0)[targets]
            other = other | (rng.random(targets.shape[0]) < gain)
        ce.append(np.where(erm, targets, (targets + 1) % k))
        mr2.append(np.where(other, targets, (targets + 1) % k))
    return study.analyze(
        targets,
        {"ce": ce, "mr2": mr2},
        k,
        n_boot=N_BOOT,
        seed=int(rng.integers(1 << 30)),
        groups=groups,
        group_accuracy=val_accuracy,
    )


def studies(effect: float, count: int, seed: int, groups: str = "validation") -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        k = (10, 100, 1000)[i % 3]
        out.append(
            simulate(
                rng,
                k,
                seeds=int(rng.integers(1, 6)),
                share=float(rng.uniform(0.05, 0.25)),
                effect=effect,
                per_class={10: 600, 100: 60, 1000: 8}[k],
                groups=groups,
            )
        )
    return out


def test_redraw_keeps_the_true_accuracy_and_changes_the_asked_share():
    rng = np.random.default_rng(0)
    p = np.full(200_000, 0.7)
    correct = rng.random(p.shape[0]) < p
    other = redraw(correct, p, 0.2, rng)
    assert abs(other.mean() - 0.7) < 0.005 and abs(np.mean(other != correct) - 0.2) < 0.005


def test_no_effect_is_called_a_help_in_at_most_5_percent_of_studies():
    results = studies(effect=0.0, count=210, seed=1)
    kinds = [r["verdict"]["kind"] for r in results]
    rate = kinds.count("helps") / len(kinds)
    print(f"no effect: helps in {kinds.count('helps')} of {len(kinds)} ({rate:.1%})")
    assert rate <= 0.05


def test_a_planted_gain_on_the_hard_classes_is_called_a_help_in_at_least_80_percent():
    results = studies(effect=3.0, count=60, seed=2)
    kinds = [r["verdict"]["kind"] for r in results]
    rate = kinds.count("helps") / len(kinds)
    print(f"+3 points on hard: helps in {kinds.count('helps')} of {len(kinds)} ({rate:.1%})")
    assert rate >= 0.8


def test_the_simulation_can_fail_groups_from_the_scored_test_images_find_gains_that_are_not_there():
    """The same no-effect studies with the paper's protocol (groups from ERM's test accuracy): selection alone makes
    MR2 look better on the hard classes, so "helps" comes far more often than 5%, and every verdict says why."""
    results = studies(effect=0.0, count=30, seed=3, groups="test")
    kinds = [r["verdict"]["kind"] for r in results]
    print(f"no effect, groups from test: helps in {kinds.count('helps')} of {len(kinds)}")
    assert kinds.count("helps") / len(kinds) > 0.05
    assert all("selection bias" in r["verdict"]["text"] and r["grouping"]["selection_bias"] for r in results)


def test_cross_fitted_groups_are_calibrated_too():
    """``--groups crossfit`` (for studies without validation data): no effect is rarely called a help."""
    results = studies(effect=0.0, count=45, seed=4, groups="crossfit")
    kinds = [r["verdict"]["kind"] for r in results]
    print(f"no effect, cross-fitted groups: helps in {kinds.count('helps')} of {len(kinds)}")
    assert kinds.count("helps") / len(kinds) <= 0.05
