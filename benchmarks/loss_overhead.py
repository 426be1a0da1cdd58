"""Forward+backward time of MR2Loss vs plain cross-entropy vs a per-class-loop version of the authors' algorithm.

Only the loss is timed: logits (B x K) and features (B x d) are leaf tensors that need a gradient, so the
classifier's own matmul, identical for all three, does not dilute the comparison. All three run in one process on
the same inputs, interleaved, at B=256, d=768 and K in {100, 1000, 10000}; the
table reports ratios (medians of repeated timings), which survive a noisy machine better than absolute times.

    python benchmarks/loss_overhead.py [--repeats 7] [--threads 2]

The loop version follows the authors' code (github BeierZhu/MR2, MRF-Imagenet/src/mrf_loss.py): two Python loops
over all K classes each step, one for the EMA statistics and one for the representation term.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from mr2ft.losses import MR2Loss


class LoopMR2:
    """The authors' algorithm as their code runs it: two Python loops over all K classes every step.

    One loop selects each class's features with a boolean mask to update the per-class EMA (testing "first
    sight" by a zero value, as they do); a second loop over all K classes builds each class's pairwise distances
    for the representation term. Same arithmetic as MR2Loss (scale mode, p = 2).
    """

    def __init__(self, K: int, d: int, momentum: float = 0.9, c_bar: float = 1.0, lam: float = 0.1) -> None:
        self.K, self.d, self.beta, self.c_bar, self.lam = K, d, momentum, c_bar, lam
        self.M = torch.zeros(K)
        self.S = torch.zeros(K)

    def __call__(self, logits: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            for k in range(self.K):
                zk = z[y == k]
                if zk.size(0) > 0:
                    mu = zk.mean(0)
                    m, s = mu.norm(2).pow(2), (zk - mu).norm(2, dim=1).pow(2).mean()
                    if self.M[k] == 0:
                        self.M[k], self.S[k] = m, s
                    else:
                        self.M[k] = self.beta * self.M[k] + (1 - self.beta) * m
                        self.S[k] = self.beta * self.S[k] + (1 - self.beta) * s
        a = (self.M + self.S).pow(1 / 3)
        gamma = self.c_bar * self.K * a / a.sum()
        ce = F.cross_entropy(logits / gamma[y].view(-1, 1), y)
        s_bar = self.S.mean()
        rep = 0
        for k in range(self.K):
            zk = z[y == k]
            n = zk.size(0)
            if n > 1:
                dist = (zk.unsqueeze(1) - zk.unsqueeze(0)).norm(2, dim=2).pow(2)
                eye = torch.eye(n, dtype=torch.bool)
                terms = torch.exp((dist - 2 * s_bar) / (10 * self.d)).masked_fill(eye, 0).sum(1)
                rep = rep + torch.log1p(terms).mean()
        rep = rep * self.d / 10 / self.K if torch.is_tensor(rep) else z.new_zeros(())
        return ce + self.lam * rep


def loss_step(kind: str, logits0: torch.Tensor, z0: torch.Tensor, y: torch.Tensor, ours, loop) -> None:
    """One forward+backward of one loss on fresh leaf copies of the inputs."""
    z = z0.clone().requires_grad_(True)
    logits = logits0.clone().requires_grad_(True)
    if kind == "ce":
        loss = F.cross_entropy(logits, y)
    elif kind == "mr2":
        loss = ours(logits, z, y)["loss"]
    else:
        loss = loop(logits, z, y)
    loss.backward()


def time_fn(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--classes", type=int, nargs="+", default=[100, 1000, 10000])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, d = args.batch, args.dim
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={B}, d={d}, median of {args.repeats}")
    print(f"{'K':>6} {'CE ms':>8} {'MR2 ms':>8} {'loop ms':>9} {'loop/MR2':>9} {'MR2-CE ms':>10}")
    rows = []
    for K in args.classes:
        logits0 = torch.randn(B, K, generator=g)
        z0 = torch.randn(B, d, generator=g)
        y = torch.randint(0, K, (B,), generator=g)
        ours = MR2Loss(K, d).train()
        loop = LoopMR2(K, d)

        step = functools.partial(loss_step, logits0=logits0, z0=z0, y=y, ours=ours, loop=loop)

        for kind in ("ce", "mr2", "loop"):  # warm-up
            step(kind)
        t = {k: [] for k in ("ce", "mr2", "loop")}
        for _ in range(args.repeats):  # interleaved so drift hits all three alike
            for kind in t:
                t[kind].append(time_fn(functools.partial(step, kind), 1))
        ce, mr2, lp = (statistics.median(t[k]) * 1e3 for k in ("ce", "mr2", "loop"))
        rows.append((K, ce, mr2, lp))
        print(f"{K:>6} {ce:>8.2f} {mr2:>8.2f} {lp:>9.2f} {lp / mr2:>8.1f}x {mr2 - ce:>10.2f}")
    extra = {K: mr2 - ce for K, ce, mr2, _ in rows}
    if 100 in extra and 10000 in extra:
        print(f"MR2 cost beyond CE at K=10000 / at K=100: {extra[10000] / extra[100]:.2f}x (target <= 1.5x)")
    for K, _, mr2, lp in rows:
        target = {1000: 5, 10000: 15}.get(K)
        if target:
            verdict = "met" if lp / mr2 >= target else "MISSED"
            print(f"loop/MR2 at K={K}: {lp / mr2:.1f}x (target >= {target}x): {verdict}")


if __name__ == "__main__":
    main()
