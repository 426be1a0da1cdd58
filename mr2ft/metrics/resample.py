"""Groupings and resampling: which images score which groups (fixed, or cross-fitted halves), the figures of each
seed under a grouping, and the paired, stratified bootstrap of a change between two runs (paired by seed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mr2ft.metrics.figures import (
    ArrayLike,
    _as_numpy,
    _check_labels,
    _figures,
    _n_groups,
    _ratio,
    _stack_seeds,
    assign_groups,
)

# ---- groupings that decide which images score which groups --------------------------------------------------------


@dataclass(frozen=True)
class Grouping:
    """Which groups score which test images.

    Images fall into ``len(parts)`` disjoint parts (``part[i]``); the images of part ``j`` are scored with the
    grouping ``parts[j]`` (K,), and the figures of the parts are averaged. One part is the plain case (one fixed
    grouping for every image); two parts are the cross-fit (each half scored with the groups the other half chose).
    """

    part: np.ndarray  # (N,) part index of each image
    parts: tuple[np.ndarray, ...]  # per part, the (K,) groups used to score its images
    rule: str = ""

    @classmethod
    def fixed(cls, groups: ArrayLike, n_images: int, rule: str = "") -> Grouping:
        return cls(np.zeros(n_images, dtype=np.int64), (_as_numpy(groups, np.int64).reshape(-1),), rule)

    def strata(self, targets: np.ndarray, num_classes: int) -> np.ndarray:
        """(N,) stratum of each image: ``class + K * part`` (resampling keeps each stratum's size)."""
        return targets + num_classes * self.part

    def score(self, counts: np.ndarray, support: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
        """Figures of R replicates from per-stratum correct counts (R, K * parts), averaged over the parts."""
        per_part = []
        for j, groups in enumerate(self.parts):
            cols = slice(j * num_classes, (j + 1) * num_classes)
            per_part.append(_figures(counts[:, cols], support[cols], groups, _n_groups(groups)))
        if len(per_part) == 1:
            return per_part[0]
        names = [k for k in per_part[0] if k != "worst_index"]
        return {k: np.mean([p[k] for p in per_part], axis=0) for k in names}


def crossfit_halves(targets: ArrayLike, num_classes: int, seed: int = 0) -> np.ndarray:
    """A fixed half of each class's test images: ``True`` for the first half, ``False`` for the second.

    Per class ``c``, its images (in index order) are permuted by a generator seeded with ``(seed, c)`` and the
    first ``n_c // 2`` of the permutation form the first half. The halves depend only on the test labels and
    ``seed``, never on a training seed or on other classes' sizes.
    """
    t = _as_numpy(targets, np.int64).reshape(-1)
    _check_labels(t, num_classes, "targets")
    first = np.zeros(t.shape[0], dtype=bool)
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        perm = np.random.default_rng([int(seed), int(c)]).permutation(idx.shape[0])
        first[idx[perm[: idx.shape[0] // 2]]] = True
    return first


def class_accuracy(correct: np.ndarray, targets: np.ndarray, num_classes: int, mask: np.ndarray) -> np.ndarray:
    """Per-class accuracy (%) of the images in ``mask``, mean over the rows (seeds) of ``correct`` (S, N)."""
    support = np.bincount(targets[mask], minlength=num_classes).astype(np.float64)
    hits = np.stack([np.bincount(targets[mask], weights=c[mask], minlength=num_classes) for c in correct])
    return _ratio(hits.mean(axis=0), support)


def crossfit_grouping(
    reference_correct: ArrayLike | Sequence[ArrayLike], targets: ArrayLike, num_classes: int, seed: int = 0
) -> Grouping:
    """The cross-fitted :class:`Grouping`: groups from the reference's accuracy on one half, scored on the other.

    ``reference_correct`` is (N,) or one (N,) array per seed (its per-class accuracy is the mean over seeds).
    """
    t = _as_numpy(targets, np.int64).reshape(-1)
    ref = _stack_seeds(reference_correct, t.shape[0], "reference_correct")
    first = crossfit_halves(t, num_classes, seed)
    from_first = assign_groups(class_accuracy(ref, t, num_classes, first))
    from_second = assign_groups(class_accuracy(ref, t, num_classes, ~first))
    # part 0: the second half's images, scored with the groups the first half chose; part 1 the reverse.
    return Grouping(first.astype(np.int64), (from_first, from_second), crossfit_rule(seed))


def crossfit_rule(seed: int = 0, source: str = "the reference run's") -> str:
    """The cross-fit grouping rule in words."""
    return (
        f"Groups are cross-fitted: each class's test images are split into two fixed halves (split seed {seed}, "
        f"independent of any training seed); classes are ranked by {source} per-class accuracy on one half and cut "
        "into easy/medium/hard thirds, every method is scored on the other half, then the halves swap and the two "
        "sets of figures are averaged. No image both chooses a group and is scored in it."
    )


def crossfit_summaries(
    correct_by_method: Mapping[str, ArrayLike | Sequence[ArrayLike]],
    targets: ArrayLike,
    num_classes: int,
    reference: str,
    seed: int = 0,
) -> dict:
    """Headline figures of every method under cross-fitted groups (see :func:`crossfit_grouping`).

    Args:
        correct_by_method: per method, (N,) bool (whether each test image was right), or one such array per seed.
        targets: (N,) test labels shared by every method.
        num_classes: K.
        reference: the method whose per-class accuracy ranks the classes (usually the baseline).
        seed: the halves' split seed.

    Returns:
        ``{"rule": str, "seed": int, "methods": {name: {top1, balanced_accuracy, easy, medium, hard,
        worst_class, worst10, std}}}``: each figure is the mean over the two halves (and over seeds) of the figure
        scored on one half with the groups the other half chose, in percent.
    """
    if reference not in correct_by_method:
        raise ValueError(f"reference {reference!r} is not one of the methods: {', '.join(correct_by_method)}")
    grouping = crossfit_grouping(correct_by_method[reference], targets, num_classes, seed)
    methods = {
        name: {k: float(np.mean(v)) for k, v in figures_by_seed(correct, targets, num_classes, grouping).items()}
        for name, correct in correct_by_method.items()
    }
    return {"rule": grouping.rule, "seed": int(seed), "methods": methods}


def figures_by_seed(
    correct: ArrayLike | Sequence[ArrayLike], targets: ArrayLike, num_classes: int, grouping: ArrayLike | Grouping
) -> dict[str, np.ndarray]:
    """Each headline figure of each seed under a grouping: ``{name: (S,) array}`` for the names of :data:`FIGURES`.

    Args:
        correct: (N,) bool, whether each test image was right, or one such array per seed.
        targets: (N,) test labels.
        num_classes: K.
        grouping: (K,) fixed groups or a :class:`Grouping` (e.g. cross-fitted).
    """
    t = _as_numpy(targets, np.int64).reshape(-1)
    _check_labels(t, num_classes, "targets")
    g = grouping if isinstance(grouping, Grouping) else Grouping.fixed(grouping, t.shape[0])
    c = _stack_seeds(correct, t.shape[0], "correct")
    strata = g.strata(t, num_classes)
    size = num_classes * len(g.parts)
    counts = np.stack([np.bincount(strata, weights=row, minlength=size) for row in c])
    fig = g.score(counts, np.bincount(strata, minlength=size), num_classes)
    return {k: np.asarray(v, dtype=np.float64) for k, v in fig.items() if k != "worst_index"}


# ---- paired bootstrap ---------------------------------------------------------------------------------------------


def _check_bootstrap_args(g: Grouping, n: int, num_classes: int, n_boot: int, ci: float) -> None:
    for groups in g.parts:
        if groups.shape[0] != num_classes:
            raise ValueError(f"groups has {groups.shape[0]} entries for {num_classes} classes")
    if g.part.shape[0] != n:
        raise ValueError(f"the grouping covers {g.part.shape[0]} images, not {n}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), got {ci}")


def _seed_mean(
    counts: np.ndarray, draws: np.ndarray, g: Grouping, support: np.ndarray, num_classes: int
) -> dict[str, np.ndarray]:
    """Mean over the drawn seeds of each figure: counts (R, S, strata), draws (R, S') seed indices."""
    r, s = draws.shape
    picked = counts[np.arange(r)[:, None], draws].reshape(r * s, counts.shape[2])
    fig = g.score(picked, support, num_classes)
    return {k: v.reshape(r, s).mean(axis=1) for k, v in fig.items() if k != "worst_index"}


class _Resampler:
    """Stratified resampling of test images, counting each seed's right answers per stratum in every replicate.

    Images are laid out per stratum in a padded (strata, M) grid (M = the largest stratum); a replicate's
    multiplicities on that grid times each seed's 0/1 answers is one batched matrix product. When strata are very
    unequal (the grid would be over four times the images) the counts come from a gather and a segment sum instead.
    """

    def __init__(self, strata: np.ndarray, size: int, answers: np.ndarray) -> None:
        self.n = strata.shape[0]
        self.size = size
        self.support = np.bincount(strata, minlength=size)
        self.order = np.argsort(strata, kind="stable")
        self.starts = np.cumsum(self.support) - self.support
        self.nonempty = np.flatnonzero(self.support > 0)
        st = strata[self.order]
        self.lo, self.cnt = self.starts[st], self.support[st]
        self.width = int(self.support.max()) if self.n else 0
        self.padded = size * self.width <= 4 * self.n
        self.answers = answers.astype(bool)  # (S, N)
        if self.padded:
            self.slot = st * self.width + (np.arange(self.n) - self.lo)  # grid cell of each sorted position
            grid = np.zeros((answers.shape[0], size * self.width), dtype=np.float32)
            grid[:, self.slot] = self.answers[:, self.order]
            self.grid = grid.reshape(answers.shape[0], size, self.width)

    def chunk(self, n_boot: int) -> int:
        cells = self.size * self.width if self.padded else self.n * self.answers.shape[0]
        return max(1, min(n_boot, 4_000_000 // max(cells, 1)))

    def counts(self, r: int, rng: np.random.Generator) -> np.ndarray:
        """(r, S, strata) right answers of every seed in r fresh replicates."""
        pos = self.lo + np.floor(rng.random((r, self.n)) * self.cnt).astype(np.int64)  # sorted positions
        if self.padded:
            cells = self.size * self.width
            flat = (np.arange(r)[:, None] * cells + self.slot[pos]).reshape(-1)
            mult = np.bincount(flat, minlength=r * cells).astype(np.float32).reshape(r, self.size, self.width)
            return np.einsum("rkm,skm->rsk", mult, self.grid, optimize=True).astype(np.float64)
        out = np.zeros((self.answers.shape[0], r, self.size))
        picked = self.answers[:, self.order[pos]].view(np.uint8)
        out[:, :, self.nonempty] = np.add.reduceat(picked, self.starts[self.nonempty], axis=2, dtype=np.int32)
        return out.transpose(1, 0, 2)


def _replicate_deltas(
    t: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    g: Grouping,
    num_classes: int,
    n_boot: int,
    rng: np.random.Generator,
    paired: bool,
) -> dict[str, np.ndarray]:
    """Each figure's b - a in ``n_boot`` stratified replicates (seed means over resampled seed indices)."""
    size = num_classes * len(g.parts)
    sampler = _Resampler(g.strata(t, num_classes), size, np.concatenate([a, b]))
    deltas: dict[str, list[np.ndarray]] = {}
    step = sampler.chunk(n_boot)
    for s in range(0, n_boot, step):
        r = min(step, n_boot - s)
        counts = sampler.counts(r, rng)
        draw_a = rng.integers(0, a.shape[0], size=(r, a.shape[0]))
        draw_b = draw_a if paired else rng.integers(0, b.shape[0], size=(r, b.shape[0]))
        fa = _seed_mean(counts[:, : a.shape[0]], draw_a, g, sampler.support, num_classes)
        fb = _seed_mean(counts[:, a.shape[0] :], draw_b, g, sampler.support, num_classes)
        for k in fa:
            deltas.setdefault(k, []).append(fb[k] - fa[k])
    return {k: np.concatenate(v) for k, v in deltas.items()}


def paired_bootstrap(
    targets: ArrayLike,
    correct_a: ArrayLike | Sequence[ArrayLike],
    correct_b: ArrayLike | Sequence[ArrayLike],
    groups: ArrayLike | Grouping,
    num_classes: int,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    paired: bool | None = None,
) -> dict:
    """Paired, stratified bootstrap of the change from run a to run b in every headline figure.

    Each replicate resamples the test images with replacement *within each class* (within each class and half
    for a cross-fitted grouping), so every class keeps its support, and scores a and b on the *same* resample.

    Several seeds: ``correct_a`` / ``correct_b`` may be lists of (N,) arrays, one per training seed. The point
    estimate is the mean over seeds of each figure. When the seeds are paired (seed i of both methods shares its
    data order and split; the default when both have the same number of seeds), each replicate also resamples
    the seed indices with replacement, the *same* indices for a and b, and takes the mean over the drawn seeds:
    the interval is that of the mean-over-seeds difference, and identical models give a zero-width interval.
    Unpaired seeds (``paired=False``, or different counts) are resampled independently for a and b. With one
    seed the interval has no seed-to-seed variation in it.

    Args:
        targets: (N,) true labels of the shared test set.
        correct_a: (N,) bool, whether run a got each image right (or a list of those, one per seed).
        correct_b: the same for run b.
        groups: (K,) fixed grouping (:func:`assign_groups`; -1 = no group), or a :class:`Grouping`
            (e.g. :func:`crossfit_grouping`).
        num_classes: K.
        n_boot: number of bootstrap replicates.
        seed: seed of the resampling generator.
        ci: coverage of the percentile interval.
        paired: whether seed i of a and seed i of b are a pair (None: when both have the same number of seeds).

    Returns:
        dict with ``n_boot``, ``seed``, ``ci``, ``seeds_a``, ``seeds_b``, ``paired`` and ``figures``: for each name
        in :data:`FIGURES` (and each group), ``{"a", "b", "delta", "low", "high"}`` in percentage points, where
        ``delta = b - a`` and ``[low, high]`` is the percentile interval of the replicate deltas.
    """
    t = _as_numpy(targets, np.int64).reshape(-1)
    n = t.shape[0]
    _check_labels(t, num_classes, "targets")
    g = groups if isinstance(groups, Grouping) else Grouping.fixed(groups, n)
    _check_bootstrap_args(g, n, num_classes, n_boot, ci)
    a = _stack_seeds(correct_a, n, "correct_a")
    b = _stack_seeds(correct_b, n, "correct_b")
    if paired is None:
        paired = a.shape[0] == b.shape[0]
    elif paired and a.shape[0] != b.shape[0]:
        raise ValueError(f"paired seeds need as many seeds of a as of b, got {a.shape[0]} and {b.shape[0]}")
    point_a = figures_by_seed(a, t, num_classes, g)
    point_b = figures_by_seed(b, t, num_classes, g)
    names = [k for k in point_a if k != "worst_index"]
    deltas = _replicate_deltas(t, a, b, g, num_classes, n_boot, np.random.default_rng(seed), paired)
    q = (100 * (1 - ci) / 2, 100 * (1 + ci) / 2)
    figures = {}
    for k in names:
        va, vb = float(np.mean(point_a[k])), float(np.mean(point_b[k]))
        if np.isnan(deltas[k]).any():
            low = high = float("nan")
        else:
            low, high = (float(v) for v in np.percentile(deltas[k], q))
        figures[k] = {"a": va, "b": vb, "delta": vb - va, "low": low, "high": high}
    return {
        "n_boot": int(n_boot),
        "seed": int(seed),
        "ci": float(ci),
        "seeds_a": int(a.shape[0]),
        "seeds_b": int(b.shape[0]),
        "paired": bool(paired),
        "figures": figures,
    }
