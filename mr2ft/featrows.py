"""The rows a probe's head trains on: an in-memory tensor, or rows of the chunked feature store read chunk by chunk.

The probe's code (:mod:`mr2ft.headfit`, :mod:`mr2ft.probe`) reads its features in a few ways, and each works on both
kinds of rows, so one code path serves features that fit in memory and features that do not:

- ``x[idx]`` (a LongTensor) or ``x[a:b]``: those rows, read into a tensor; ``len(x)``, ``x.shape``;
- :func:`subset` and :func:`concat`: the probe's validation share and its refit on train+val (for stored rows an
  index, nothing read);
- :func:`epoch_order`: one training epoch's order. For a tensor a global permutation, as always; for stored rows the
  chunks in random order and the rows shuffled within each, so consecutive batches read one chunk;
- :func:`column_moments`: per-dimension mean and standard deviation in one pass (float64).

:class:`StoredRows` keeps, for each of its rows, the chunk it lives in and its place there, and maps at most
:data:`MAPPED_CHUNKS` chunks at a time (a batch across a chunk boundary reads two): streaming costs a few chunks of
memory, whatever the size of the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from mr2ft.errors import UserError
from mr2ft.featstore import StoredFeatures, fits_in_memory

FEATURE_MEMORY = ("auto", "memory", "stream")
IN_MEMORY_COPIES = 4  # the in-memory probe holds the features, its train/val split, the refit's concatenation and
# the standardised copy of what it fits: about four copies at its peak
MAPPED_CHUNKS = 2
BLOCK_ROWS = 8192  # rows per block of an ordered pass (predictions, moments, class statistics)

_mapped: dict[tuple[int, int], tuple[StoredFeatures, torch.Tensor]] = {}  # (id(store), chunk) -> the mapped chunk


def _chunk(store: StoredFeatures, i: int) -> torch.Tensor:
    """Chunk ``i`` of ``store``, from the few kept mapped (least recently used goes first)."""
    key = (id(store), i)
    if key in _mapped:
        _mapped[key] = _mapped.pop(key)
        return _mapped[key][1]
    try:
        x = store.chunk(i)
    except ValueError as e:  # a chunk damaged after the entry was opened
        raise UserError(str(e)) from None
    while len(_mapped) >= MAPPED_CHUNKS:
        _mapped.pop(next(iter(_mapped)))
    _mapped[key] = (store, x)  # the store is held so that its id is not reused while the chunk is kept
    return x


class StoredRows:
    """Rows of one or more feature stores, read on demand (see the module docstring).

    Args:
        chunks: the (store, chunk number) pairs the rows come from.
        chunk_of: for each row, its chunk's position in ``chunks``.
        local_of: for each row, its row within that chunk.
        transform: applied to every block of rows read (e.g. standardisation), or None.
    """

    def __init__(
        self,
        chunks: list[tuple[StoredFeatures, int]],
        chunk_of: torch.Tensor,
        local_of: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.chunks, self.chunk_of, self.local_of, self.transform = chunks, chunk_of, local_of, transform
        self.dim = chunks[0][0].dim if chunks else 0

    @classmethod
    def of(cls, store: StoredFeatures) -> StoredRows:
        """Every row of ``store``, in order."""
        rows = torch.arange(len(store))
        chunks = [(store, i) for i in range(max(store.n_chunks, 1))]
        return cls(chunks, rows // store.chunk_rows, rows % store.chunk_rows)

    def __len__(self) -> int:
        return len(self.chunk_of)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * 4

    def __getitem__(self, item: slice | torch.Tensor) -> torch.Tensor:
        if isinstance(item, slice):
            return self.take(torch.arange(*item.indices(len(self))))
        return self.take(torch.as_tensor(item, dtype=torch.long))

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` (in that order) as a float32 tensor, read chunk by chunk."""
        keys, local = self.chunk_of[idx], self.local_of[idx]
        present = torch.unique(keys).tolist()
        if len(present) == 1:  # the usual batch of a chunk-blocked epoch
            out = _chunk(*self.chunks[present[0]]).index_select(0, local)
        else:
            out = torch.empty(len(idx), self.dim)
            for k in present:
                sel = torch.nonzero(keys == k).squeeze(1)
                out[sel] = _chunk(*self.chunks[k]).index_select(0, local[sel])
        return out if self.transform is None else self.transform(out)

    def subset(self, idx: torch.Tensor) -> StoredRows:
        return StoredRows(self.chunks, self.chunk_of[idx], self.local_of[idx], self.transform)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> StoredRows:
        """The same rows with ``fn`` applied to every block read (after any transform already there)."""
        inner = self.transform
        return StoredRows(self.chunks, self.chunk_of, self.local_of, fn if inner is None else lambda b: fn(inner(b)))

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """A permutation of the rows: the chunks in random order, the rows of each chunk shuffled."""
        rows = torch.randperm(len(self), generator=generator)
        rank = torch.randperm(len(self.chunks), generator=generator)
        return rows[torch.argsort(rank[self.chunk_of[rows]], stable=True)]

    @staticmethod
    def concat(a: StoredRows, b: StoredRows) -> StoredRows:
        if a.transform is not None or b.transform is not None or (len(a) and len(b) and a.dim != b.dim):
            raise ValueError("only untransformed stored rows of one width can be concatenated")
        chunk_of = torch.cat([a.chunk_of, b.chunk_of + len(a.chunks)])
        return StoredRows(a.chunks + b.chunks, chunk_of, torch.cat([a.local_of, b.local_of]))


Rows = torch.Tensor | StoredRows


def subset(x: Rows, idx: torch.Tensor) -> Rows:
    """Rows ``idx`` of ``x``: a tensor's rows copied, stored rows indexed (nothing read)."""
    return x[idx] if isinstance(x, torch.Tensor) else x.subset(idx)


def concat(a: Rows, b: Rows) -> Rows:
    """``a``'s rows then ``b``'s, both tensors or both stored."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, StoredRows) and isinstance(b, StoredRows):
        return StoredRows.concat(a, b)
    raise TypeError("cannot concatenate in-memory features with stored ones")


def epoch_order(x: Rows, generator: torch.Generator) -> torch.Tensor:
    """One epoch's order of the rows (see the module docstring)."""
    if isinstance(x, torch.Tensor):
        return torch.randperm(len(x), generator=generator)
    return x.epoch_order(generator)


def blocks(x: Rows, size: int = BLOCK_ROWS) -> Iterator[torch.Tensor]:
    """The rows of ``x`` in order, ``size`` at a time."""
    for start in range(0, len(x), size):
        yield x[start : start + size]


def column_moments(x: Rows, size: int = BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and standard deviation (population, float64 sums) in one ordered pass, as float32."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for b in blocks(x, size):
        b = b.double()
        total += b.sum(0)
        squares += (b * b).sum(0)
    n = max(len(x), 1)
    mean = total / n
    return mean.float(), (squares / n - mean * mean).clamp(min=0).sqrt().float()


def choose_memory(mode: str, nbytes: int) -> tuple[str, str]:
    """("memory" or "stream", why) for ``--feature-memory mode`` and features of ``nbytes`` bytes in all."""
    if mode not in FEATURE_MEMORY:
        raise UserError(f"unknown --feature-memory {mode!r}; choose one of: {', '.join(FEATURE_MEMORY)}")
    if mode != "auto":
        return mode, f"--feature-memory {mode}"
    size = f"{nbytes / 2**30:.2f} GiB of features"
    if fits_in_memory(IN_MEMORY_COPIES * nbytes):
        return "memory", f"auto: {size} fit in memory"
    return "stream", f"auto: {size} x {IN_MEMORY_COPIES} copies exceed half the available memory"


def rows_of(store: StoredFeatures, where: str) -> Rows:
    """The features of an opened store entry as the head reads them: loaded (``"memory"``) or stored rows."""
    return store.load()[0] if where == "memory" else StoredRows.of(store)


def open_rows(store: StoredFeatures, mode: str = "auto") -> tuple[Rows, str]:
    """The features of one store entry for ``--feature-memory mode`` (:func:`choose_memory`) and where they are."""
    where, _ = choose_memory(mode, store.nbytes)
    return rows_of(store, where), where
