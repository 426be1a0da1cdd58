"""mr2ft.metrics against independent plain-Python computations on hand-made predictions."""

from __future__ import annotations

import math
import random
import statistics

import numpy as np
import pytest
import torch

from mr2ft import metrics

# ---- independent reference computations (plain Python loops, no numpy) ----------------------------------------


def ref_counts(preds, targets, k):
    support, correct, predicted = [0] * k, [0] * k, [0] * k
    for p, t in zip(preds, targets, strict=True):
        support[t] += 1
        predicted[p] += 1
        if p == t:
            correct[t] += 1
    return support, correct, predicted


def ref_accuracy(preds, targets, k):
    support, correct, _ = ref_counts(preds, targets, k)
    return [100.0 * correct[c] / support[c] if support[c] else None for c in range(k)]


def ref_precision(preds, targets, k):
    _, correct, predicted = ref_counts(preds, targets, k)
    return [100.0 * correct[c] / predicted[c] if predicted[c] else None for c in range(k)]


def ref_groups(acc):
    """The documented rule, written out: rank, then sizes base+1 for easy, then hard, then medium."""
    ranked = sorted((c for c in range(len(acc)) if acc[c] is not None), key=lambda c: (-acc[c], c))
    base, extra = divmod(len(ranked), 3)
    sizes = [base, base, base]
    for g in (0, 2, 1)[:extra]:
        sizes[g] += 1
    groups = [-1] * len(acc)
    pos = 0
    for g in range(3):
        for c in ranked[pos : pos + sizes[g]]:
            groups[c] = g
        pos += sizes[g]
    return groups


def ref_summary(preds, targets, k, groups, topk=None):
    acc = ref_accuracy(preds, targets, k)
    defined = [a for a in acc if a is not None]
    n_correct = sum(1 for p, t in zip(preds, targets, strict=True) if p == t)
    out = {
        "top1": 100.0 * n_correct / len(targets),
        "balanced_accuracy": sum(defined) / len(defined),
        "worst_class": min(defined),
        "worst_index": min(c for c in range(k) if acc[c] == min(defined)),
        "std": statistics.pstdev(defined),
    }
    m = max(1, math.ceil(0.1 * len(defined)))
    out["worst10"] = sum(sorted(defined)[:m]) / m
    for g, name in enumerate(("easy", "medium", "hard")):
        members = [acc[c] for c in range(k) if groups[c] == g and acc[c] is not None]
        out[name] = sum(members) / len(members) if members else None
    if topk is not None:
        out["top5"] = 100.0 * sum(1 for row, t in zip(topk, targets, strict=True) if t in row[:5]) / len(targets)
    return out


def ref_spearman(x, y):
    pairs = [(a, b) for a, b in zip(x, y, strict=True) if not (math.isnan(a) or math.isnan(b))]

    def ranks(v):
        out = []
        for a in v:
            less = sum(1 for b in v if b < a)
            equal = sum(1 for b in v if b == a)
            out.append(less + (equal + 1) / 2)
        return out

    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


def nan_to_none(values):
    return [None if math.isnan(v) else v for v in values]


def random_case(k, n, seed, empty=(), never_predicted=()):
    rng = random.Random(seed)
    labels = [c for c in range(k) if c not in empty]
    targets = [rng.choice(labels) for _ in range(n)]
    choices = [c for c in range(k) if c not in never_predicted]
    preds = [t if rng.random() < 0.5 and t in choices else rng.choice(choices) for t in targets]
    return preds, targets


# ---- confusion matrix, accuracy, precision ---------------------------------------------------------------------


def test_confusion_matrix_counts_pairs_rows_true():
    preds, targets = random_case(7, 300, seed=1, empty=(3,))
    conf = metrics.confusion_matrix(torch.tensor(preds), torch.tensor(targets), 7)
    assert conf.dtype == torch.long and conf.shape == (7, 7)
    expected = [[0] * 7 for _ in range(7)]
    for p, t in zip(preds, targets, strict=True):
        expected[t][p] += 1
    assert conf.tolist() == expected
    assert conf[3].sum() == 0  # the empty class has an empty row
    # numpy and list inputs give the same matrix
    assert torch.equal(metrics.confusion_matrix(np.array(preds), targets, 7), conf)


def test_confusion_matrix_rejects_out_of_range_and_length_mismatch():
    with pytest.raises(ValueError, match="preds"):
        metrics.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="targets"):
        metrics.confusion_matrix([0, 1], [0, -1], 3)
    with pytest.raises(ValueError, match="length"):
        metrics.confusion_matrix([0, 1, 2], [0, 1], 3)


def test_per_class_accuracy_and_precision_match_loops_with_nan_where_undefined():
    k = 8
    preds, targets = random_case(k, 400, seed=2, empty=(5,), never_predicted=(6,))
    conf = metrics.confusion_matrix(preds, targets, k)
    acc = metrics.per_class_accuracy(conf)
    prec = metrics.per_class_precision(conf)
    assert acc.dtype == np.float64 and prec.dtype == np.float64
    assert nan_to_none(acc) == pytest.approx(ref_accuracy(preds, targets, k))
    assert nan_to_none(prec) == pytest.approx(ref_precision(preds, targets, k))
    assert math.isnan(acc[5])  # no test images
    assert math.isnan(prec[6])  # never predicted
    assert acc[6] == 0.0


# ---- groups -----------------------------------------------------------------------------------------------------


def test_group_sizes_rule():
    assert metrics.group_sizes(9) == [3, 3, 3]
    assert metrics.group_sizes(10) == [4, 3, 3]
    assert metrics.group_sizes(11) == [4, 3, 4]
    assert metrics.group_sizes(2) == [1, 0, 1]
    assert metrics.group_sizes(1) == [1, 0, 0]
    assert metrics.group_sizes(1000) == [334, 333, 333]
    for n in range(0, 40):
        for g in (1, 2, 3, 4, 5):
            sizes = metrics.group_sizes(n, g)
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1


def test_assign_groups_by_hand_with_ties_and_an_empty_class():
    # class:     0     1     2     3     4    5      6
    acc = [100.0, 50.0, 50.0, np.nan, 0.0, 100.0, 50.0]
    groups = metrics.assign_groups(acc)
    # ranked: 0 (100), 5 (100; tie -> index), 1, 2, 6 (50; ties -> index), 4 (0); class 3 has no test images
    assert groups.tolist() == [0, 1, 1, -1, 2, 0, 2]
    assert groups.dtype == np.int64


def test_assign_groups_two_classes_gives_easy_and_hard():
    assert metrics.assign_groups([30.0, 90.0]).tolist() == [2, 0]
    assert metrics.assign_groups([50.0, 50.0]).tolist() == [0, 2]  # tie: lower index ranks easier


@pytest.mark.parametrize("k", [2, 3, 4, 5, 7, 10, 11, 31, 100])
def test_assign_groups_matches_reference_rule(k):
    rng = random.Random(k)
    # Few distinct values force many ties; some classes without support.
    acc = [rng.choice([0.0, 25.0, 50.0, 75.0, 100.0]) if rng.random() > 0.1 else None for _ in range(k)]
    got = metrics.assign_groups([np.nan if a is None else a for a in acc])
    assert got.tolist() == ref_groups(acc)


def test_group_names():
    assert metrics.GROUP_NAMES == ("easy", "medium", "hard")
    assert metrics.group_names(3) == metrics.GROUP_NAMES
    assert metrics.group_names(2) == ("group1", "group2")


# ---- summarize --------------------------------------------------------------------------------------------------


def make_topk(preds, k, seed):
    rng = random.Random(seed)
    rows = []
    for p in preds:
        others = [c for c in range(k) if c != p]
        rng.shuffle(others)
        rows.append([p] + others[: min(5, k) - 1])
    return rows


@pytest.mark.parametrize("k,n,empty", [(7, 350, (3,)), (10, 500, ()), (11, 400, (0, 9)), (2, 60, ()), (4, 90, ())])
def test_summarize_matches_reference(k, n, empty):
    preds, targets = random_case(k, n, seed=k * 31 + n, empty=empty)
    topk = make_topk(preds, k, seed=k)
    got = metrics.summarize(torch.tensor(preds), torch.tensor(targets), k, topk=torch.tensor(topk))
    groups = ref_groups(ref_accuracy(preds, targets, k))
    ref = ref_summary(preds, targets, k, groups, topk=topk)
    assert got["grouping"] == "self"
    assert got["class_groups"] == groups
    assert got["num_classes"] == k and got["num_images"] == n
    assert got["top1"] == pytest.approx(ref["top1"])
    if k >= 5:
        assert got["top5"] == pytest.approx(ref["top5"])
    else:
        assert got["top5"] is None
    assert got["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"])
    assert got["std"] == pytest.approx(ref["std"])
    assert got["worst_class"]["accuracy"] == pytest.approx(ref["worst_class"])
    assert got["worst_class"]["index"] == ref["worst_index"]
    assert got["worst10"]["accuracy"] == pytest.approx(ref["worst10"])
    assert got["worst10"]["count"] == max(1, math.ceil(0.1 * (k - len(empty))))
    assert got["classes_without_support"] == len(empty)
    for name in ("easy", "medium", "hard"):
        assert got["groups"][name]["size"] == sum(1 for g in groups if g == ("easy", "medium", "hard").index(name))
        if ref[name] is None:
            assert math.isnan(got["groups"][name]["accuracy"])
        else:
            assert got["groups"][name]["accuracy"] == pytest.approx(ref[name])
    assert nan_to_none(got["per_class_accuracy"]) == pytest.approx(ref_accuracy(preds, targets, k))
    assert nan_to_none(got["per_class_precision"]) == pytest.approx(ref_precision(preds, targets, k))


def test_summarize_by_hand():
    # 3 classes; class 0: 4/4 right, class 1: 1/2 right, class 2: 0/2 right
    targets = [0, 0, 0, 0, 1, 1, 2, 2]
    preds = [0, 0, 0, 0, 1, 0, 1, 0]
    s = metrics.summarize(preds, targets, 3)
    assert s["top1"] == pytest.approx(62.5)
    assert s["balanced_accuracy"] == pytest.approx(50.0)
    assert s["groups"]["easy"] == {"size": 1, "accuracy": 100.0}
    assert s["groups"]["medium"] == {"size": 1, "accuracy": 50.0}
    assert s["groups"]["hard"] == {"size": 1, "accuracy": 0.0}
    assert s["worst_class"] == {"index": 2, "accuracy": 0.0}
    assert s["std"] == pytest.approx(math.sqrt(((100 - 50) ** 2 + 0 + 50**2) / 3))  # population std
    assert s["per_class_precision"][0] == pytest.approx(100 * 4 / 6)


def test_summarize_with_fixed_groups_uses_them():
    preds, targets = random_case(9, 270, seed=5)
    fixed = [2, 2, 2, 1, 1, 1, 0, 0, 0]
    s = metrics.summarize(preds, targets, 9, groups=fixed)
    assert s["grouping"] == "given"
    assert s["class_groups"] == fixed
    acc = ref_accuracy(preds, targets, 9)
    assert s["groups"]["easy"]["accuracy"] == pytest.approx(sum(acc[6:]) / 3)
    assert s["groups"]["hard"]["accuracy"] == pytest.approx(sum(acc[:3]) / 3)
    with pytest.raises(ValueError, match="groups"):
        metrics.summarize(preds, targets, 9, groups=[0, 1])


def test_headline_figures_flat():
    preds, targets = random_case(6, 120, seed=3)
    s = metrics.summarize(preds, targets, 6)
    flat = metrics.headline_figures(s)
    assert list(flat) == list(metrics.FIGURES)
    assert flat["hard"] == s["groups"]["hard"]["accuracy"] and flat["worst_class"] == s["worst_class"]["accuracy"]


# ---- paired bootstrap -------------------------------------------------------------------------------------------


def test_bootstrap_identical_predictions_give_zero_deltas_and_zero_width():
    preds, targets = random_case(7, 400, seed=7, empty=(2,))
    correct = np.array(preds) == np.array(targets)
    groups = metrics.assign_groups(metrics.per_class_accuracy(metrics.confusion_matrix(preds, targets, 7)))
    out = metrics.paired_bootstrap(targets, correct, correct.copy(), groups, 7, n_boot=200)
    assert set(metrics.FIGURES) <= set(out["figures"])
    for name, f in out["figures"].items():
        assert f["delta"] == 0.0 and f["low"] == 0.0 and f["high"] == 0.0, name


def test_bootstrap_is_stratified_and_paired():
    # a and b differ only on class 1: a gets all 20 of its images right, b none. With within-class resampling
    # every replicate keeps 20 class-1 images, so the overall change is exactly -20/100 in every replicate;
    # resampling across classes, or drawing a and b independently, would spread it.
    targets = np.repeat(np.arange(4), [40, 20, 25, 15])
    rng = np.random.default_rng(0)
    a = rng.random(100) < 0.6
    b = a.copy()
    a[targets == 1] = True
    b[targets == 1] = False
    groups = np.array([0, 1, 2, 2])
    out = metrics.paired_bootstrap(targets, a, b, groups, 4, n_boot=300, seed=3)
    top1 = out["figures"]["top1"]
    assert top1["delta"] == pytest.approx(-20.0)
    assert top1["low"] == pytest.approx(-20.0) and top1["high"] == pytest.approx(-20.0)
    medium = out["figures"]["medium"]  # class 1 alone: 100 -> 0 in every replicate
    assert (medium["delta"], medium["low"], medium["high"]) == pytest.approx((-100.0, -100.0, -100.0))
    easy = out["figures"]["easy"]
    assert (easy["delta"], easy["low"], easy["high"]) == pytest.approx((0.0, 0.0, 0.0))


def test_bootstrap_interval_covers_known_difference_with_the_right_width():
    # Each image: a right with prob. 0.6, b right with prob. 0.7, independently: the true change is +10 points.
    k, per_class = 10, 300
    targets = np.repeat(np.arange(k), per_class)
    rng = np.random.default_rng(11)
    a = rng.random(targets.size) < 0.6
    b = rng.random(targets.size) < 0.7
    groups = metrics.assign_groups(np.arange(k, 0, -1).astype(float))
    out = metrics.paired_bootstrap(targets, a, b, groups, k, n_boot=2000, seed=1)
    top1 = out["figures"]["top1"]
    assert top1["low"] < 10.0 < top1["high"]
    assert top1["delta"] == pytest.approx(100 * (b.mean() - a.mean()))
    # Independent check of the width: stratified variance of the mean paired difference, by hand.
    d = b.astype(float) - a.astype(float)
    var = (
        sum((targets == c).sum() * d[targets == c].var() for c in range(k)) / targets.size**2
    )  # sum_c n_c var_c(d) / N^2
    expected_width = 2 * 1.959964 * math.sqrt(var) * 100
    assert top1["high"] - top1["low"] == pytest.approx(expected_width, rel=0.12)
    for name in ("easy", "medium", "hard"):
        assert out["figures"][name]["low"] < 10.0 < out["figures"][name]["high"]


def test_bootstrap_point_estimates_are_the_summaries():
    preds_a, targets = random_case(9, 360, seed=21)
    preds_b, _ = random_case(9, 360, seed=22)
    preds_b = [t if i % 3 == 0 else p for i, (p, t) in enumerate(zip(preds_b, targets, strict=True))]
    groups = metrics.assign_groups(metrics.per_class_accuracy(metrics.confusion_matrix(preds_a, targets, 9)))
    ca = np.array(preds_a) == np.array(targets)
    cb = np.array(preds_b) == np.array(targets)
    out = metrics.paired_bootstrap(targets, ca, cb, groups, 9, n_boot=50)
    fa = metrics.headline_figures(metrics.summarize(preds_a, targets, 9, groups=groups))
    fb = metrics.headline_figures(metrics.summarize(preds_b, targets, 9, groups=groups))
    for name in metrics.FIGURES:
        f = out["figures"][name]
        assert (f["a"], f["b"], f["delta"]) == pytest.approx((fa[name], fb[name], fb[name] - fa[name]))
        assert f["low"] <= f["high"]


def test_bootstrap_over_seeds_averages_and_widens():
    k = 6
    targets = np.repeat(np.arange(k), 50)
    rng = np.random.default_rng(4)
    seeds_a = [rng.random(targets.size) < p for p in (0.55, 0.65)]
    seeds_b = [rng.random(targets.size) < p for p in (0.7, 0.72, 0.74)]
    groups = metrics.assign_groups(np.arange(k, 0, -1).astype(float))
    out = metrics.paired_bootstrap(targets, seeds_a, seeds_b, groups, k, n_boot=400, seed=2)
    assert out["seeds_a"] == 2 and out["seeds_b"] == 3
    mean_a = np.mean([100 * s.mean() for s in seeds_a])
    mean_b = np.mean([100 * s.mean() for s in seeds_b])
    assert out["figures"]["top1"]["a"] == pytest.approx(mean_a)
    assert out["figures"]["top1"]["delta"] == pytest.approx(mean_b - mean_a)
    # Identical single seeds give zero width; seed variation must widen the interval.
    same = metrics.paired_bootstrap(targets, [seeds_a[0], seeds_a[0]], [seeds_a[0]], groups, k, n_boot=100)
    assert same["figures"]["top1"]["high"] - same["figures"]["top1"]["low"] == 0.0
    one = metrics.paired_bootstrap(targets, seeds_a[0], seeds_b[0], groups, k, n_boot=400, seed=2)
    width_many = out["figures"]["top1"]["high"] - out["figures"]["top1"]["low"]
    width_one = one["figures"]["top1"]["high"] - one["figures"]["top1"]["low"]
    assert width_many > width_one


def test_bootstrap_rejects_bad_inputs():
    targets = [0, 1, 1, 0]
    ok = np.array([True, False, True, True])
    with pytest.raises(ValueError, match="correct_b"):
        metrics.paired_bootstrap(targets, ok, ok[:3], [0, 2], 2)
    with pytest.raises(ValueError, match="groups"):
        metrics.paired_bootstrap(targets, ok, ok, [0], 2)
    with pytest.raises(ValueError, match="n_boot"):
        metrics.paired_bootstrap(targets, ok, ok, [0, 2], 2, n_boot=0)


def test_bootstrap_handles_1000_classes_in_chunks():
    k, n = 1000, 20_000
    rng = np.random.default_rng(0)
    targets = rng.integers(0, k, n)
    a, b = rng.random(n) < 0.7, rng.random(n) < 0.72
    groups = metrics.assign_groups(rng.random(k) * 100)
    out = metrics.paired_bootstrap(targets, a, b, groups, k, n_boot=300)
    assert out["figures"]["top1"]["delta"] == pytest.approx(100 * (b.mean() - a.mean()))
    assert out["figures"]["top1"]["low"] < out["figures"]["top1"]["delta"] < out["figures"]["top1"]["high"]


def test_paired_seeds_identical_models_give_zero_width_and_unpaired_ones_do_not():
    k = 5
    targets = np.repeat(np.arange(k), 60)
    rng = np.random.default_rng(8)
    seeds = [rng.random(targets.size) < 0.7 for _ in range(3)]  # the seeds differ from each other
    groups = metrics.assign_groups(np.arange(k, 0, -1).astype(float))
    paired = metrics.paired_bootstrap(targets, seeds, [s.copy() for s in seeds], groups, k, n_boot=300, seed=1)
    assert paired["paired"] is True
    for name, f in paired["figures"].items():
        assert f["delta"] == 0.0 and f["low"] == 0.0 and f["high"] == 0.0, name
    unpaired = metrics.paired_bootstrap(targets, seeds, seeds, groups, k, n_boot=300, seed=1, paired=False)
    assert unpaired["figures"]["top1"]["high"] - unpaired["figures"]["top1"]["low"] > 0
    with pytest.raises(ValueError, match="paired"):
        metrics.paired_bootstrap(targets, seeds, seeds[:2], groups, k, paired=True)


def test_paired_seed_intervals_narrow_with_more_seeds():
    """The interval is that of the mean-over-seeds difference: more seeds of independent errors narrow it."""
    k = 4
    targets = np.repeat(np.arange(k), 100)
    rng = np.random.default_rng(3)
    groups = metrics.assign_groups(np.arange(k, 0, -1).astype(float))

    def width(n_seeds: int) -> float:
        a = [rng.random(targets.size) < 0.7 for _ in range(n_seeds)]
        b = [rng.random(targets.size) < 0.7 for _ in range(n_seeds)]
        f = metrics.paired_bootstrap(targets, a, b, groups, k, n_boot=400, seed=0)["figures"]["top1"]
        return f["high"] - f["low"]

    one, eight = width(1), width(8)
    # Images alone would give 1/sqrt(8) of the one-seed width; resampling the seeds as well adds their spread
    # (about as much again when errors are independent): between 0.35 and 0.75 of it, never the same width.
    assert 0.35 * one < eight < 0.75 * one


def test_paired_seed_bootstrap_resamples_seed_indices_jointly():
    """Two seeds whose a/b differences cancel: seed 0 has b right on 3 images of class 0 where a is wrong, seed 1 the
    reverse. A replicate that draws both seeds (half of them) has a difference of exactly 0 whatever the images; one
    that draws seed 0 twice is positive, seed 1 twice negative: the 80% interval straddles 0. Drawing seeds for a and b
    independently would not give exact zeros half of the time."""
    targets = np.repeat(np.arange(3), 30)
    a = [np.ones(targets.size, dtype=bool), np.ones(targets.size, dtype=bool)]
    b = [x.copy() for x in a]
    a[0][:3] = False
    b[1][:3] = False
    out = metrics.paired_bootstrap(targets, a, b, [0, 1, 2], 3, n_boot=2000, seed=5, ci=0.8)
    easy = out["figures"]["easy"]
    assert easy["delta"] == 0.0
    assert easy["low"] < 0 < easy["high"]
    same = metrics.paired_bootstrap(targets, [a[0], a[0]], [b[0], b[0]], [0, 1, 2], 3, n_boot=2000, seed=5, ci=0.8)
    assert same["figures"]["easy"]["low"] > 0


# ---- cross-fitted groups ----------------------------------------------------------------------------------------


def test_crossfit_halves_split_each_class_in_two_fixed_halves():
    targets = np.array([0] * 7 + [1] * 10 + [2] * 1 + [3] * 4)
    first = metrics.crossfit_halves(targets, 5, seed=0)
    assert first.dtype == bool and first.shape == targets.shape
    for c, n in ((0, 7), (1, 10), (2, 1), (3, 4)):
        assert first[targets == c].sum() == n // 2
    assert np.array_equal(first, metrics.crossfit_halves(targets, 5, seed=0))
    assert not np.array_equal(first, metrics.crossfit_halves(targets, 5, seed=1))
    # A class's halves do not depend on the other classes (or on where its images sit).
    shuffled = np.concatenate([targets[targets != 1], targets[targets == 1]])
    assert np.array_equal(metrics.crossfit_halves(shuffled, 5)[shuffled == 1], first[targets == 1])


def ref_crossfit(correct_by_method, targets, k, reference, first):
    """The documented cross-fit, written out with the plain-loop references above."""
    idx = {True: [i for i in range(len(targets)) if first[i]], False: [i for i in range(len(targets)) if not first[i]]}

    def preds_of(correct, ids):
        return [targets[i] if correct[i] else (targets[i] + 1) % k for i in ids]

    out = {}
    for name, seeds in correct_by_method.items():
        sums = {}
        for half in (True, False):
            ref_acc = [
                [a for a in ref_accuracy(preds_of(c, idx[half]), [targets[i] for i in idx[half]], k)]
                for c in correct_by_method[reference]
            ]
            mean_acc = [None if ref_acc[0][c] is None else sum(r[c] for r in ref_acc) / len(ref_acc) for c in range(k)]
            groups = ref_groups(mean_acc)
            scored = idx[not half]
            for c in seeds:
                s = ref_summary(preds_of(c, scored), [targets[i] for i in scored], k, groups)
                for key in ("top1", "balanced_accuracy", "easy", "medium", "hard", "worst_class", "worst10", "std"):
                    sums.setdefault(key, []).append(s[key])
        out[name] = {key: sum(v) / len(v) for key, v in sums.items()}
    return out


@pytest.mark.parametrize("seeds", [1, 3])
def test_crossfit_summaries_match_a_plain_loop_reference(seeds):
    k = 7
    rng = random.Random(seeds)
    targets = [c for c in range(k) for _ in range(rng.randint(6, 14))]
    correct = {m: [[rng.random() < 0.3 + 0.08 * t for t in targets] for _ in range(seeds)] for m in ("ce", "mr2")}
    got = metrics.crossfit_summaries(
        {m: [np.array(c) for c in v] for m, v in correct.items()}, targets, k, reference="ce", seed=4
    )
    first = metrics.crossfit_halves(targets, k, seed=4)
    want = ref_crossfit(correct, targets, k, "ce", list(first))
    assert "cross-fitted" in got["rule"] and got["seed"] == 4
    for m in ("ce", "mr2"):
        for key, value in want[m].items():
            assert got["methods"][m][key] == pytest.approx(value), (m, key)


def test_crossfit_bootstrap_point_matches_summaries_and_identical_models_have_zero_width():
    k = 6
    targets = np.repeat(np.arange(k), 40)
    rng = np.random.default_rng(2)
    a = [rng.random(targets.size) < 0.6 + 0.05 * targets for _ in range(2)]
    b = [rng.random(targets.size) < 0.6 + 0.05 * targets for _ in range(2)]
    grouping = metrics.crossfit_grouping(a, targets, k, seed=0)
    out = metrics.paired_bootstrap(targets, a, b, grouping, k, n_boot=200)
    summ = metrics.crossfit_summaries({"a": a, "b": b}, targets, k, reference="a")["methods"]
    for key in metrics.FIGURES:
        assert out["figures"][key]["a"] == pytest.approx(summ["a"][key])
        assert out["figures"][key]["delta"] == pytest.approx(summ["b"][key] - summ["a"][key])
    same = metrics.paired_bootstrap(targets, a, a, grouping, k, n_boot=200)
    assert all(f["low"] == f["high"] == 0.0 for f in same["figures"].values())


def test_crossfit_removes_the_selection_gain_of_test_groups():
    """Two methods with the same per-class accuracy and independent errors: grouping on the scored images makes the
    second look better on "hard" (regression to the mean); cross-fitting does not, on average."""
    k, n = 30, 40
    targets = np.repeat(np.arange(k), n)
    p = np.linspace(0.5, 0.9, k)[targets]
    rng = np.random.default_rng(0)
    on_test, crossfit = [], []
    for _ in range(40):
        a, b = rng.random(targets.size) < p, rng.random(targets.size) < p
        groups = metrics.assign_groups(metrics.class_accuracy(a[None].astype(float), targets, k, targets >= 0))
        fa = metrics.paired_bootstrap(targets, a, b, groups, k, n_boot=1)["figures"]["hard"]
        on_test.append(fa["delta"])
        cf = metrics.crossfit_summaries({"a": a, "b": b}, targets, k, reference="a", seed=1)["methods"]
        crossfit.append(cf["b"]["hard"] - cf["a"]["hard"])
    assert np.mean(on_test) > 2.0
    assert abs(np.mean(crossfit)) < 1.0


# ---- spearman ---------------------------------------------------------------------------------------------------


def test_spearman_matches_reference_with_ties_and_nan():
    rng = random.Random(9)
    x = [float(rng.randint(0, 5)) for _ in range(40)]
    y = [xi * 0.5 + rng.choice([0.0, 1.0, 2.0]) for xi in x]
    x[3] = float("nan")
    y[10] = float("nan")
    assert metrics.spearman(x, y) == pytest.approx(ref_spearman(x, y))
    assert metrics.spearman(torch.tensor(x), np.array(y)) == pytest.approx(ref_spearman(x, y))


def test_spearman_edge_cases():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 3]) == pytest.approx(ref_spearman([1, 2, 2, 3], [1, 2, 3, 3]))
    assert math.isnan(metrics.spearman([1, 1, 1], [1, 2, 3]))  # constant side
    assert math.isnan(metrics.spearman([1.0, float("nan")], [1.0, 2.0]))  # one pair left
    with pytest.raises(ValueError):
        metrics.spearman([1, 2], [1, 2, 3])
