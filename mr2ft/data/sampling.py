"""What order training images come in, and how their augmentation is seeded.

This module owns the class-balanced batch sampler MR2's representation margin needs, the plain per-epoch shuffle,
:class:`SeededTransform` (augmentation seeded by (seed, epoch, index), so it depends on nothing else) and the seed
mixer they share. Each is a pure function of its seed and :meth:`set_epoch`, so a resumed run sees the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from mr2ft.data.base import class_indices
from mr2ft.errors import UserError

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _mix_seed(*values: int) -> int:
    """A 63-bit seed that depends on every value and their order (SplitMix64 chained; ~1 µs per value, where
    numpy's SeedSequence takes ~25 µs: this runs once per training sample)."""
    h = 0
    for v in values:
        h = _splitmix64(h ^ (int(v) & _MASK64))
    return h >> 1


def _seed_all(seed: int) -> None:
    """Seed the CPU torch, Python and numpy RNGs that augmentations draw from."""
    # torch.default_generator, not torch.manual_seed: that would also reseed (and move) CUDA's RNG.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


class _PerEpoch:
    """What is a pure function of (seed, epoch): :meth:`set_epoch` picks the epoch (0 until called)."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` (call before each epoch, as with DistributedSampler)."""
        self.epoch = epoch


class SeededTransform(_PerEpoch, Dataset):
    """Apply ``transform`` with torch, numpy and Python RNGs seeded from (seed, epoch, index).

    Augmentation then no longer depends on worker count, process count or where a run was resumed; the
    callers' RNG states are left untouched. The DataLoader fetches a batch through :meth:`__getitems__`, so in the
    main process (``--num-workers 0``) the callers' states are saved and restored once per batch, not per image.
    """

    def __init__(self, dataset: Any, transform: Any, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def _seeded(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.dataset[index]
        _seed_all(_mix_seed(self.seed, self.epoch, index))
        return self.transform(image), label

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        if torch.utils.data.get_worker_info() is not None:
            # A loader worker's RNGs serve nothing else: seeding is enough.
            return [self._seeded(i) for i in indices]
        py_state, np_state, cpu_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self._seeded(i) for i in indices]
        finally:
            torch.set_rng_state(cpu_state)
            random.setstate(py_state)
            np.random.set_state(np_state)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]


class EpochShuffle(_PerEpoch, Sampler[int]):
    """A random permutation per epoch that depends only on (seed, epoch)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 0x5EED))
        return iter(torch.randperm(self.size, generator=g).tolist())


def _groups(idx: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """One class's shuffled samples cut into rows of ``m``; the last row is topped up with samples not already in
    it (a copy would be pixel-identical, a zero-distance pair), repeating only when the class has fewer than ``m``."""
    perm = idx[rng.permutation(len(idx))]
    rest = len(perm) % m
    if rest:
        tail, others = perm[len(perm) - rest :], perm[: len(perm) - rest]
        need = m - rest
        if len(others) >= need:
            pad = rng.choice(others, size=need, replace=False)
        else:  # fewer than m samples in the class: every one once, then repeats
            pad = np.concatenate([others, rng.choice(perm, size=need - len(others), replace=True)])
        perm = np.concatenate([others, tail, pad])
    return perm.reshape(-1, m)


def _full_batch_budget(groups: np.ndarray, c: int, rng: np.random.Generator | None) -> np.ndarray:
    """How many groups of each class go into full batches of ``c`` distinct classes, as many batches as possible.

    Taking one group from each of the ``c`` classes with the most groups left makes the most batches; the groups it
    leaves over cannot fill a batch of distinct classes. Ties are broken by ``rng`` (None: by class order); the count
    of batches and of leftovers does not depend on how.
    """
    left = groups.copy()
    while True:
        nonzero = np.count_nonzero(left)
        if nonzero < c:
            return groups - left
        jitter = rng.random(len(left)) if rng is not None else np.zeros(len(left))
        top = np.lexsort((jitter, -left))[:c]
        left[top] -= 1


class ClassBalancedBatchSampler(_PerEpoch, Sampler[list[int]]):
    """Batches of ``batch_size // samples_per_class`` distinct classes, ``samples_per_class`` samples of each.

    MR2's representation margin needs several samples of a class in a batch; random batches over many classes give
    one or none. Each epoch, every class's samples are shuffled and cut into groups of ``samples_per_class`` (the
    last group topped up with other samples of the class, never with one already in the group unless the class has
    fewer than ``samples_per_class`` samples). The epoch makes as many batches of distinct classes as the group counts
    allow, and spreads each class's groups evenly over it: under class imbalance a small class appears throughout the
    epoch, not only at its end. With ``drop_last`` the few groups that cannot fill a batch of distinct classes are
    dropped (else they form last, smaller batches). Deterministic for a given ``seed`` and :meth:`set_epoch`.

    Args:
        targets: the label of every sample of the dataset.
        samples_per_class: samples of each class in a batch (m).
        batch_size: samples in a batch; must be a multiple of m.
        seed: base seed; the epoch is mixed in.
        drop_last: drop the groups that cannot fill a batch of distinct classes (else: last, smaller batches).
    """

    def __init__(
        self,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        samples_per_class: int,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
        if samples_per_class < 1:
            raise UserError(f"samples per class must be at least 1, got {samples_per_class}")
        if batch_size % samples_per_class != 0:
            raise UserError(
                f"batch size {batch_size} is not a multiple of samples per class {samples_per_class}; change one"
            )
        self.by_class = class_indices(targets)
        self.samples_per_class = samples_per_class
        self.classes_per_batch = batch_size // samples_per_class
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        if self.classes_per_batch > len(self.by_class):
            raise UserError(
                f"a batch of {batch_size} with {samples_per_class} per class needs {self.classes_per_batch} classes "
                f"but the data has {len(self.by_class)}; lower the batch size or raise samples per class"
            )
        self._groups = np.array([-(-len(idx) // samples_per_class) for idx in self.by_class.values()], dtype=np.int64)
        budget = _full_batch_budget(self._groups, self.classes_per_batch, None)
        self._len = int(budget.sum()) // self.classes_per_batch
        if not drop_last:
            self._len += int((self._groups - budget).max(initial=0))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        c = self.classes_per_batch
        queues = [_groups(idx, self.samples_per_class, rng) for idx in self.by_class.values()]
        budget = _full_batch_budget(self._groups, c, rng)
        used = np.zeros(len(queues), dtype=np.int64)
        for order in _spread(budget, c, rng):
            yield [int(i) for k in order for i in queues[k][used[k]]]
            used[order] += 1
        if not self.drop_last:
            left = self._groups - used
            while left.any():
                order = np.flatnonzero(left)
                yield [int(i) for k in order for i in queues[k][used[k]]]
                used[order] += 1
                left[order] -= 1


def _spread(budget: np.ndarray, c: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The classes of each full batch: ``budget[k]`` batches hold class k, each class's spread evenly.

    Class k's j-th group is due at (j + u_k) / budget[k] of the epoch (u_k uniform in [0, 1)); each batch takes the
    ``c`` classes due soonest, except that a class with as many groups left as batches left must be taken now (the
    budget needs it in every remaining batch), so every budget is used exactly.
    """
    left = budget.astype(np.int64).copy()
    offset = rng.random(len(left))
    total = budget.astype(np.float64)
    for remaining in range(int(left.sum()) // c, 0, -1):
        taken = total - left
        due = np.where(left > 0, (taken + offset) / np.maximum(total, 1), np.inf)
        must = np.flatnonzero(left == remaining)
        rest = np.setdiff1d(np.flatnonzero(left > 0), must)
        order = np.concatenate([must, rest[np.argsort(due[rest], kind="stable")][: c - len(must)]])
        left[order] -= 1
        yield order
