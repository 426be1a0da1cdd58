"""MR2 and baselines against independent reference computations (plain loops, closed forms, F.cross_entropy)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mr2ft.errors import UserError
from mr2ft.losses import (
    ClassDROLoss,
    ClassStatistics,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
    MR2Loss,
    WatchedLoss,
    build_loss,
    keeps_class_statistics,
    list_losses,
)

# ---- plain-loop references (written independently of the library: per class, per sample) ----------------------


def loop_stats(z: torch.Tensor, y: torch.Tensor, K: int, p: float):
    """M, S, S2 per class by explicit loops over classes and samples (float64)."""
    z = z.double()
    M, S, S2, present = [0.0] * K, [0.0] * K, [0.0] * K, [False] * K
    for k in range(K):
        rows = [z[i] for i in range(len(y)) if int(y[i]) == k]
        if not rows:
            continue
        present[k] = True
        mu = sum(rows) / len(rows)
        M[k] = float(sum(abs(float(v)) ** p for v in mu) ** (2 / p))
        S[k] = sum(float(sum(abs(float(v)) ** p for v in (r - mu)) ** (2 / p)) for r in rows) / len(rows)
        S2[k] = sum(float(((r - mu) ** 2).sum()) for r in rows) / len(rows)
    f64 = torch.float64
    return torch.tensor(M, dtype=f64), torch.tensor(S, dtype=f64), torch.tensor(S2, dtype=f64), torch.tensor(present)


def loop_rep(z: torch.Tensor, y: torch.Tensor, K: int, s_bar: float, tf: float) -> float:
    """L_RM by a plain loop over classes and pairs."""
    z = z.double()
    d = z.shape[1]
    T, Tp = tf * d, d / tf
    total = 0.0
    for c in range(K):
        idx = [i for i in range(len(y)) if int(y[i]) == c]
        if len(idx) < 2:
            continue
        ls = []
        for i in idx:
            vals = [(float(((z[i] - z[j]) ** 2).sum()) - 2 * s_bar) / T for j in idx if j != i]
            m = max(vals)
            lse = m + math.log(sum(math.exp(v - m) for v in vals))
            ls.append(math.log1p(math.exp(lse)))
        total += sum(ls) / len(ls)
    return Tp / K * total


@st.composite
def batches(draw):
    K = draw(st.integers(1, 7))
    d = draw(st.integers(1, 6))
    B = draw(st.integers(1, 24))
    # labels drawn from a subset so some classes are missing; singletons arise naturally
    labels = draw(st.lists(st.integers(0, K - 1), min_size=B, max_size=B))
    seed = draw(st.integers(0, 2**16))
    p = draw(st.sampled_from([1.0, 2.0, 3.0, 5.0]))
    g = torch.Generator().manual_seed(seed)
    return K, torch.randn(B, d, generator=g) * 2 + 0.5, torch.tensor(labels), p


@settings(max_examples=60, deadline=None)
@given(batches())
def test_batch_statistics_match_plain_loop(batch):
    K, z, y, p = batch
    stats = ClassStatistics(K, z.shape[1], p=p)
    M, S, S2, counts = stats.batch_statistics(z, y)
    rM, rS, rS2, present = loop_stats(z, y, K, p)
    assert torch.equal(counts > 0, present)
    torch.testing.assert_close(M.double(), rM, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S.double(), rS, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(S2.double(), rS2, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(batches(), batches(), st.floats(0.0, 0.99))
def test_ema_update_matches_loop(b1, b2, beta):
    K, z1, y1, p = b1
    _, z2, y2, _ = b2
    d = z1.shape[1]
    z2 = torch.randn(len(y2), d)
    y2 = y2 % K
    stats = ClassStatistics(K, d, p=p, momentum=beta)
    stats.update(z1, y1)
    stats.update(z2, y2)
    ref = {"M": [None] * K, "S": [None] * K, "S2": [None] * K}
    for z, y in ((z1, y1), (z2, y2)):
        bM, bS, bS2, present = loop_stats(z, y, K, p)
        for k in range(K):
            if not present[k]:
                continue
            for name, val in (("M", bM[k]), ("S", bS[k]), ("S2", bS2[k])):
                old = ref[name][k]
                ref[name][k] = float(val) if old is None else beta * old + (1 - beta) * float(val)
    seen = torch.tensor([v is not None for v in ref["M"]])
    assert torch.equal(stats.seen, seen)
    for name in ("M", "S", "S2"):
        expect = torch.tensor([v if v is not None else 0.0 for v in ref[name]], dtype=torch.float64)
        torch.testing.assert_close(getattr(stats, name).double(), expect, rtol=1e-4, atol=1e-5)


def test_watched_loss_is_the_wrapped_loss_plus_mr2_statistics_of_normalised_features():
    g = torch.Generator().manual_seed(3)
    K, d, beta = 4, 6, 0.8
    watched = build_loss("ce", K, d)
    watched = WatchedLoss(watched, MR2Loss(K, d, normalize_features=True, momentum=beta)).train()
    ref = {"M": [None] * K, "S": [None] * K}
    for y in (torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([1, 1, 3, 0, 3])):
        logits = torch.randn(len(y), K, generator=g, requires_grad=True)
        features = torch.randn(len(y), d, generator=g, requires_grad=True)
        out = watched(logits, features, y)
        out["loss"].backward()
        # The loss and its gradient are plain cross-entropy's; the watched statistics take no gradient.
        plain = logits.detach().clone().requires_grad_(True)
        F.cross_entropy(plain, y).backward()
        torch.testing.assert_close(out["loss"], F.cross_entropy(logits.detach(), y))
        torch.testing.assert_close(logits.grad, plain.grad)
        assert features.grad is None
        bM, bS, _, present = loop_stats(F.normalize(features.detach(), dim=1), y, K, 5.0)  # p = 5 when normalised
        for k in range(K):
            if present[k]:
                for name, val in (("M", bM[k]), ("S", bS[k])):
                    old = ref[name][k]
                    ref[name][k] = float(val) if old is None else beta * old + (1 - beta) * float(val)
    stats = watched.class_stats()
    assert stats["seen"].all()
    for name in ("M", "S"):
        torch.testing.assert_close(
            stats[name].double(), torch.tensor(ref[name], dtype=torch.float64), rtol=1e-4, atol=1e-6
        )
    # Evaluation mode leaves them alone; the state dict carries them.
    watched.eval()(torch.randn(3, K), torch.randn(3, d), torch.tensor([0, 1, 2]))
    assert torch.equal(watched.class_stats()["S"], stats["S"])
    assert {k for k in watched.state_dict() if k.startswith("watch.stats.")} >= {"watch.stats.M", "watch.stats.S"}


def test_first_sight_takes_batch_value_even_when_zero():
    """A class whose first batch value is exactly 0 is still 'seen' (the seen mask, not a == 0 test)."""
    stats = ClassStatistics(2, 3, momentum=0.5)
    stats.update(torch.zeros(1, 3), torch.tensor([0]))  # M = S = 0 for class 0
    assert stats.seen.tolist() == [True, False]
    stats.update(torch.ones(1, 3), torch.tensor([0]))
    assert stats.M[0].item() == pytest.approx(0.5 * 0 + 0.5 * 3.0)


def test_set_exact_matches_loop_and_chunking():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(103, 5, generator=g), torch.randint(0, 6, (103,), generator=g)
    y[y == 4] = 5  # class 4 absent
    stats = ClassStatistics(6, 5, p=3.0)
    stats.set_exact(z, y, chunk_size=10)
    rM, rS, rS2, present = loop_stats(z, y, 6, 3.0)
    assert torch.equal(stats.seen, present)
    torch.testing.assert_close(stats.M.double(), rM, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.S.double(), rS, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.S2.double(), rS2, rtol=1e-5, atol=1e-6)


def test_margins_average_to_cbar_and_follow_spread():
    stats = ClassStatistics(5, 4)
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.5, 1.0, 2.0, 4.0, 1.0])
    y = torch.arange(4).repeat_interleave(50)  # class 4 never seen
    z = torch.randn(200, 4, generator=g) * scales[y][:, None]
    stats.set_exact(z, y)
    gamma = stats.margins(c_bar=1.7)
    assert gamma[:4].mean().item() == pytest.approx(1.7, rel=1e-5)
    assert gamma[4].item() == pytest.approx(1.7)
    assert torch.all(gamma[1:4] > gamma[:3])  # more spread -> larger margin
    # closed form
    a = (stats.M + stats.S)[:4] ** (1 / 3)
    torch.testing.assert_close(gamma[:4], 1.7 * 4 * a / a.sum())
    assert stats.margins(2.0).requires_grad is False


def test_margins_before_anything_seen_are_cbar_and_s_bar_zero():
    stats = ClassStatistics(3, 2)
    assert stats.margins(0.7).tolist() == pytest.approx([0.7] * 3)
    assert stats.s_bar().item() == 0.0


def test_mr2_with_unit_margins_and_no_rep_equals_cross_entropy():
    g = torch.Generator().manual_seed(2)
    for K in (2, 10, 37):
        logits, z, y = torch.randn(64, K, generator=g), torch.randn(64, 8, generator=g), torch.randint(0, K, (64,))
        loss = MR2Loss(K, 8, c_bar=1.0, lambda_rep=0.0).eval()  # eval: no statistics -> gamma == c_bar == 1
        out = loss(logits, z, y)
        torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y), rtol=0, atol=1e-6)
        # the uniform control at c_bar=1 is plain CE too, even after statistics are seen
        uni = build_loss("uniform", K, 8, c_bar=1.0, lambda_rep=0.0).train()
        torch.testing.assert_close(uni(logits, z, y)["loss"], F.cross_entropy(logits, y), rtol=0, atol=1e-6)


def test_mr2_logit_margin_matches_formula_in_both_modes():
    g = torch.Generator().manual_seed(3)
    K, d = 6, 5
    logits, z, y = torch.randn(40, K, generator=g), torch.randn(40, d, generator=g), torch.randint(0, K, (40,))
    for mode in ("scale", "additive"):
        loss = MR2Loss(K, d, c_bar=1.3, lambda_rep=0.0, margin_mode=mode).train()
        out = loss(logits, z, y)
        gamma = loss.margins()
        # reference: per-sample loop
        ref = 0.0
        for i in range(40):
            f = logits[i].clone().double()
            gi = float(gamma[y[i]])
            f = f / gi if mode == "scale" else f - gi * F.one_hot(y[i], K).double()
            ref += float(-(f[y[i]] - torch.logsumexp(f, 0)))
        assert out["loss"].item() == pytest.approx(ref / 40, rel=1e-5)


@pytest.mark.parametrize("normalize", [False, True])
def test_representation_term_matches_pair_loop_and_has_feature_gradient(normalize):
    g = torch.Generator().manual_seed(4)
    K, d = 5, 7
    z = torch.randn(30, d, generator=g, requires_grad=True)
    y = torch.randint(0, K, (30,), generator=g)
    y[0], y[1] = 4, 3  # make singleton classes likely
    loss = MR2Loss(K, d, lambda_rep=1.0, normalize_features=normalize, temperature_factor=0.5).train()
    out = loss(torch.zeros(30, K), z, y)
    zz = F.normalize(z.detach(), dim=1) if normalize else z.detach()
    ref = loop_rep(zz, y, K, float(loss.stats.s_bar()), 0.5)
    assert out["rep"].item() == pytest.approx(ref, rel=1e-4)
    out["loss"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    for buf in ("M", "S", "S2"):
        assert not getattr(loss.stats, buf).requires_grad
        assert getattr(loss.stats, buf).grad_fn is None


def test_representation_term_is_zero_without_pairs():
    z = torch.randn(4, 3, requires_grad=True)
    loss = MR2Loss(4, 3, lambda_rep=1.0).train()
    out = loss(torch.randn(4, 4), z, torch.tensor([0, 1, 2, 3]))
    assert out["rep"].item() == 0.0
    out["loss"].backward()
    assert torch.isfinite(z.grad).all()


def test_statistics_update_only_in_training_mode_and_fit_statistics_freezes():
    loss = MR2Loss(3, 4).eval()
    loss(torch.randn(6, 3), torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert not loss.stats.seen.any()
    loss.train()
    loss.fit_statistics(torch.randn(30, 4), torch.arange(3).repeat(10))
    before = loss.stats.M.clone()
    loss(torch.randn(6, 3), torch.randn(6, 4) * 10, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(before, loss.stats.M)


def test_state_dict_round_trip_reproduces_next_loss():
    g = torch.Generator().manual_seed(5)
    K, d = 8, 6
    a = MR2Loss(K, d, momentum=0.7).train()
    for _ in range(3):
        a(torch.randn(16, K, generator=g), torch.randn(16, d, generator=g), torch.randint(0, K, (16,), generator=g))
    b = MR2Loss(K, d, momentum=0.7).train()
    b.load_state_dict(a.state_dict())
    batch = (torch.randn(16, K, generator=g), torch.randn(16, d, generator=g), torch.randint(0, K, (16,), generator=g))
    oa, ob = a(*batch), b(*batch)
    assert oa["loss"].item() == ob["loss"].item()
    assert torch.equal(a.stats.S, b.stats.S)
    assert set(a.state_dict()) >= {"stats.M", "stats.S", "stats.S2", "stats.seen", "frozen"}


def test_normalized_features_refuse_p2_and_default_to_p5():
    with pytest.raises(UserError, match="p=5"):
        MR2Loss(10, 4, normalize_features=True, p=2.0)
    assert MR2Loss(10, 4, normalize_features=True).stats.p == 5.0
    assert MR2Loss(10, 4).stats.p == 2.0


def test_bad_settings_are_user_errors():
    for kwargs in ({"margin_mode": "nope"}, {"c_bar": 0.0}, {"lambda_rep": -1.0}):
        with pytest.raises(UserError):
            MR2Loss(3, 2, **kwargs)
    with pytest.raises(UserError, match="unknown loss"):
        build_loss("mr3", 3, 2)


# ---- baselines -----------------------------------------------------------------------------------------------


def test_registry_names_and_call_shape():
    assert {"ce", "mr2", "focal", "ldam", "la", "dro", "uniform"} <= set(list_losses())
    logits, z, y = torch.randn(12, 4, requires_grad=True), torch.randn(12, 3), torch.randint(0, 4, (12,))
    for name in list_losses():
        out = build_loss(name, 4, 3, class_counts=[3, 3, 3, 3], c_bar=1.0, normalize_features=False)(logits, z, y)
        assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
        out["loss"].backward()


def test_ce_temperature_and_weights_match_reference():
    logits, y = torch.randn(20, 5), torch.randint(0, 5, (20,))
    w = torch.rand(20)
    out = build_loss("ce", 5, 1, temperature=2.0)(logits, None, y, weight=w)
    per = F.cross_entropy(logits / 2.0, y, reduction="none")
    assert out["loss"].item() == pytest.approx(float((per * w).sum() / w.sum()), rel=1e-6)


def test_focal_matches_closed_form():
    logits, y = torch.randn(15, 4), torch.randint(0, 4, (15,))
    p = F.softmax(logits, 1)[torch.arange(15), y]
    ref = (-((1 - p) ** 2) * p.log()).mean()
    assert FocalLoss(4)(logits, None, y)["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    # gamma 0 is cross-entropy
    assert FocalLoss(4, 0.0)(logits, None, y)["loss"].item() == pytest.approx(F.cross_entropy(logits, y).item())


def test_ldam_and_logit_adjustment_match_reference():
    counts = [100, 10, 1]
    logits, y = torch.randn(9, 3), torch.tensor([0, 1, 2] * 3)
    m = torch.tensor([c**-0.25 for c in counts])
    m = m * 0.5 / m.max()
    ref = F.cross_entropy(30 * (logits - F.one_hot(y, 3) * m[y][:, None]), y)
    assert LDAMLoss(3, counts)(logits, None, y)["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    prior = torch.tensor(counts, dtype=torch.float) / sum(counts)
    ref = F.cross_entropy(logits + prior.log(), y)
    assert LogitAdjustedLoss(3, counts)(logits, None, y)["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    with pytest.raises(UserError, match="classes"):
        LDAMLoss(4, counts)


def test_class_dro_upweights_the_worst_class():
    dro = ClassDROLoss(3, dro_step_size=1.0).train()
    y = torch.tensor([0, 1, 2])
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0]])  # class 2 is wrong
    for _ in range(5):
        out = dro(logits, None, y)
    assert dro.q.argmax().item() == 2 and dro.q.sum().item() == pytest.approx(1.0)
    per = F.cross_entropy(logits, y, reduction="none")  # one sample per class: the class losses
    assert out["loss"].item() == pytest.approx(float((dro.q * per).sum()), rel=1e-5)


def _sagawa_reference(batches, num_classes: int, eta: float):
    """Sagawa et al.'s LossComputer, transcribed as plain loops: per-group mean loss (0 for an absent group), then
    ``adv_probs *= exp(eta * group_loss)``, normalised, and ``robust_loss = group_loss @ adv_probs``."""
    q = [1.0 / num_classes] * num_classes
    losses = []
    for logits, y in batches:
        per = [float(F.cross_entropy(logits[i : i + 1].double(), y[i : i + 1])) for i in range(len(y))]
        group_loss = []
        for g in range(num_classes):
            mine = [per[i] for i in range(len(y)) if int(y[i]) == g]
            group_loss.append(sum(mine) / len(mine) if mine else 0.0)
        q = [q[g] * math.exp(eta * group_loss[g]) for g in range(num_classes)]
        total = sum(q)
        q = [v / total for v in q]
        losses.append(sum(group_loss[g] * q[g] for g in range(num_classes)))
    return losses, q


def test_class_dro_follows_sagawa_et_al_including_absent_classes():
    torch.manual_seed(0)
    K, eta = 4, 0.3
    # the second and third batches lack class 3 and classes 0/3: absent groups have loss 0 and are not renormalised away
    ys = [torch.tensor([0, 1, 2, 3, 3, 1]), torch.tensor([0, 0, 1, 2, 2]), torch.tensor([1, 2, 2, 1])]
    batches = [(torch.randn(len(y), K) * 2, y) for y in ys]
    ref_losses, ref_q = _sagawa_reference(batches, K, eta)
    dro = ClassDROLoss(K, dro_step_size=eta).train()
    for (logits, y), ref in zip(batches, ref_losses, strict=True):
        assert dro(logits, None, y)["loss"].item() == pytest.approx(ref, rel=1e-5)
    assert dro.q.tolist() == pytest.approx(ref_q, rel=1e-5)
    # in eval mode q is left alone
    before = dro.q.clone()
    dro.eval()(*batches[0][:1], None, batches[0][1])
    assert torch.equal(dro.q, before)


def test_ldam_on_a_cosine_head_matches_closed_form():
    from mr2ft.heads import build_head

    torch.manual_seed(1)
    counts = [50, 20, 5]
    head = build_head("linear", 6, 3, cosine=True)
    x, y = torch.randn(8, 6) * 7.0, torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    with torch.no_grad():
        cos = torch.stack(
            [torch.stack([x[i] @ w / (x[i].norm() * w.norm()) for w in head.fc.weight]) for i in range(8)]
        )
    assert head.fc.bias is None and torch.allclose(head(x), cos, atol=1e-6)
    m = torch.tensor([c**-0.25 for c in counts])
    m = m * 0.5 / m.max()
    ref = (
        sum(
            -math.log(
                math.exp(30 * (cos[i, y[i]] - m[y[i]]))
                / (
                    math.exp(30 * (cos[i, y[i]] - m[y[i]]))
                    + sum(math.exp(30 * cos[i, k]) for k in range(3) if k != y[i])
                )
            )
            for i in range(8)
        )
        / 8
    )
    out = build_loss("ldam", 3, 6, class_counts=counts)(head(x), x, y)["loss"]
    assert out.item() == pytest.approx(float(ref), rel=1e-5)
    # the cosine logits do not depend on the features' scale
    assert torch.allclose(head(x * 100.0), head(x), atol=1e-6)


def test_keeps_class_statistics_is_the_one_answer():
    assert {n for n in list_losses() if keeps_class_statistics(n)} == {"mr2", "uniform"}
    for name in list_losses():
        loss = build_loss(name, 3, 2, class_counts=[1, 1, 1])
        assert keeps_class_statistics(name) == callable(getattr(loss, "class_stats", None)), name
    assert not keeps_class_statistics("jtt") and not keeps_class_statistics("nope")


# ---- distributed: two gloo processes, each with half the batch --------------------------------------------------


def _dist_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    stats = ClassStatistics(7, 5, p=3.0, momentum=0.8)
    for _ in range(3):
        z = torch.randn(21, 5, generator=g)  # odd size: ranks get unequal halves
        y = torch.randint(0, 7, (21,), generator=g)
        half = 11
        part = slice(0, half) if rank == 0 else slice(half, None)
        stats.update(z[part], y[part])
    torch.save(stats.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_hold_the_statistics_of_the_whole_batch():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_dist_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        s0 = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        s1 = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    g = torch.Generator().manual_seed(0)
    single = ClassStatistics(7, 5, p=3.0, momentum=0.8)
    for _ in range(3):
        single.update(torch.randn(21, 5, generator=g), torch.randint(0, 7, (21,), generator=g))
    for key, val in single.state_dict().items():
        assert torch.equal(s0[key], s1[key]), key
        assert torch.equal(s0[key], val), key


def test_frozen_statistics_survive_a_state_dict_round_trip():
    a = MR2Loss(3, 4).train()
    a.fit_statistics(torch.randn(30, 4), torch.arange(3).repeat(10))
    b = MR2Loss(3, 4).train()
    b.load_state_dict(a.state_dict())
    before = b.stats.M.clone()
    b(torch.randn(6, 3), torch.randn(6, 4) * 10, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert torch.equal(before, b.stats.M)
