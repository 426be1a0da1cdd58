"""The chunked feature store: one cache entry's features in fixed-size safetensors chunks, read without loading them.

An entry is ``<key>.safetensors``, its index, written last so that its presence means the entry is complete. A split
of at most ``chunk_rows`` rows is stored in that one file ("features", "targets"); a larger one keeps only "targets"
there and its features in ``<key>.chunks/<i>.safetensors``, ``chunk_rows`` rows each (the last one shorter), every
chunk written atomically. A kill while writing leaves chunks without an index: not an entry, rebuilt next time.

Reading: :class:`StoredFeatures` opens an entry (its index through safetensors ``safe_open``) and memory-maps one
chunk at a time (the chunk's tensor is a view of the mapped safetensors file, :func:`torch.from_file`), so
a split larger than memory can be sliced, streamed in shuffled batches (:meth:`StoredFeatures.batches`) and
summarised in one pass (:meth:`StoredFeatures.moments`); :meth:`StoredFeatures.load` gives the in-memory tensors
for data that fits (:func:`fits_in_memory` decides). The probe reads a store through :mod:`mr2ft.featrows`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mr2ft.io import save_tensors

log = logging.getLogger("mr2ft")

CACHE_FORMAT = "2"
CHUNK_ROWS = 32768  # 96 MiB of 768-d float32 features per chunk


def chunk_folder(index: Path) -> Path:
    """The folder of an entry's chunks, beside its index file."""
    return index.with_name(index.name.removesuffix(".safetensors") + ".chunks")


def chunk_path(index: Path, i: int) -> Path:
    return chunk_folder(index) / f"{i:06d}.safetensors"


def fits_in_memory(nbytes: int, share: float = 0.5) -> bool:
    """Whether ``nbytes`` take at most ``share`` of the memory available now (Linux; elsewhere: always)."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return True
    return nbytes <= share * available


class ChunkWriter:
    """Write one entry from features appended in order (any batch sizes): full chunks go to disk as they fill,
    so at most one chunk is held in memory. :meth:`close` writes the index and so commits the entry.

    Args:
        index: the entry's index path (``FeatureCache.path(key)``).
        meta: string metadata stored in the index and every chunk (must hold ``key``).
        chunk_rows: rows per chunk file.
    """

    def __init__(self, index: Path, meta: dict[str, str], chunk_rows: int = CHUNK_ROWS, save=save_tensors) -> None:
        self.index, self.meta, self.chunk_rows, self.save = Path(index), dict(meta), int(chunk_rows), save
        self.pending: list[torch.Tensor] = []
        self.pending_rows = 0
        self.rows = 0
        self.chunks = 0
        self.dim: int | None = None
        self.targets: list[torch.Tensor] = []

    def append(self, features: torch.Tensor, targets: torch.Tensor) -> None:
        features = features.detach().float().cpu()
        self.dim = features.shape[1] if features.ndim == 2 else self.dim
        self.targets.append(targets.detach().long().cpu())
        self.rows += features.shape[0]
        while features.shape[0]:
            take = min(self.chunk_rows - self.pending_rows, features.shape[0])
            self.pending.append(features[:take])
            self.pending_rows += take
            features = features[take:]
            if self.pending_rows == self.chunk_rows and self.rows > self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        if not self.pending_rows:
            return
        if self.chunks == 0:  # a fresh start: chunks of an older, broken entry must not linger
            shutil.rmtree(chunk_folder(self.index), ignore_errors=True)
        data = torch.cat(self.pending)
        meta = {**self.meta, "chunk": str(self.chunks)}
        self.save(chunk_path(self.index, self.chunks), {"features": data}, metadata=meta)
        self.chunks += 1
        self.pending, self.pending_rows = [], 0

    def close(self) -> Path:
        """Write the last chunk and the index; returns the index path."""
        targets = torch.cat(self.targets) if self.targets else torch.zeros(0, dtype=torch.long)
        meta = {**self.meta, "format": CACHE_FORMAT, "rows": str(self.rows), "chunk_rows": str(self.chunk_rows)}
        if self.chunks == 0:  # small: one file, as the cache always stored it
            feats = torch.cat(self.pending) if self.pending else torch.zeros(0, self.dim or 0)
            shutil.rmtree(chunk_folder(self.index), ignore_errors=True)
            self.save(self.index, {"features": feats, "targets": targets}, metadata={**meta, "chunks": "0"})
            return self.index
        self._flush()
        meta.update(chunks=str(self.chunks), dim=str(self.dim))
        self.save(self.index, {"targets": targets}, metadata=meta)
        return self.index


def write_entry(
    index: Path, features: torch.Tensor, targets: torch.Tensor, meta: dict[str, str], chunk_rows: int, save=save_tensors
) -> Path:
    """Write in-memory features as one entry (chunked when larger than ``chunk_rows``)."""
    writer = ChunkWriter(index, meta, chunk_rows, save)
    writer.append(features, targets)
    return writer.close()


@dataclass
class Moments:
    """One-pass statistics of a split: per-class counts, sums and sums of squares (float64), and their totals."""

    counts: torch.Tensor  # (K,)
    sums: torch.Tensor  # (K, d)
    squares: torch.Tensor  # (K,) sum over a class of ||x||^2

    def class_means(self) -> torch.Tensor:
        return self.sums / self.counts.clamp(min=1).double()[:, None]

    def class_spread(self) -> torch.Tensor:
        """Per class, the mean squared distance to the class mean: E||x||^2 - ||mu||^2 (MR2's S2)."""
        mu = self.class_means()
        return self.squares / self.counts.clamp(min=1).double() - (mu * mu).sum(1)


def _map_features(path: Path) -> tuple[torch.Tensor, dict[str, str]]:
    """The float32 "features" tensor of a safetensors file, memory-mapped (copy-on-write), and its metadata.

    The pages are read from the file as rows are touched and leave memory when the tensor is dropped, so streaming a
    store costs one chunk of memory at most.
    """
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    info, size = header["features"], path.stat().st_size
    begin, end = (8 + n + o for o in info["data_offsets"])
    if info["dtype"] != "F32" or end > size or begin % 4 or (end - begin) != 4 * math.prod(info["shape"]):
        raise ValueError(f"{path} is not a float32 feature chunk or is truncated")
    data = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return data[begin:end].view(torch.float32).view(info["shape"]), header.get("__metadata__", {})


class StoredFeatures:
    """One cache entry, opened for reading: the targets in memory, the features on disk, read chunk by chunk.

    Supports ``len``, ``shape``, slicing with a step-1 ``slice`` (what chunked statistics code does), :meth:`load`
    (all of it in memory), :meth:`chunks` and :meth:`batches`.
    """

    def __init__(self, index: Path, meta: dict[str, str], targets: torch.Tensor, features: torch.Tensor | None):
        self.index, self.meta, self.targets = index, meta, targets
        self.rows = int(meta["rows"])
        self.n_chunks = int(meta.get("chunks", "0"))
        self.chunk_rows = int(meta.get("chunk_rows", max(self.rows, 1)))
        self._inline = features  # the single-file form
        self.dim = int(meta["dim"]) if self.n_chunks else int(features.shape[1] if features.ndim == 2 else 0)

    @classmethod
    def open(cls, index: Path, key: str, expected_rows: int | None = None) -> StoredFeatures | None:
        """The entry at ``index`` if it is complete and made for ``key`` (and ``expected_rows``), else ``None``."""
        from safetensors import safe_open

        if not index.is_file():
            return None
        try:
            with safe_open(str(index), framework="pt") as fh:
                meta = fh.metadata() or {}
                targets = fh.get_tensor("targets")
                inline = fh.get_tensor("features") if "features" in fh.keys() else None
            ok = meta.get("key") == key and meta.get("format") == CACHE_FORMAT and int(meta["rows"]) == len(targets)
            ok = ok and (expected_rows is None or len(targets) == expected_rows)
            ok = ok and (inline is None or inline.shape[0] == len(targets))
            n_chunks = int(meta.get("chunks", "0"))
            ok = ok and (
                inline is not None or (n_chunks > 0 and all(chunk_path(index, i).is_file() for i in range(n_chunks)))
            )
        except Exception as e:  # truncated or foreign file: rebuild
            log.warning("feature cache entry %s is unreadable (%s); rebuilding it", index, e.__class__.__name__)
            return None
        if not ok:
            log.warning("feature cache entry %s does not match its key or the data; rebuilding it", index)
            return None
        return cls(index, meta, targets, inline)

    @classmethod
    def in_memory(cls, features: torch.Tensor, targets: torch.Tensor) -> StoredFeatures:
        """Features already in memory, behind the same interface (an entry of one inline chunk, not on disk)."""
        return cls(Path(), {"rows": str(len(targets))}, targets, features)

    def verify(self) -> bool:
        """Whether every chunk file belongs to this entry and has its shape (reads headers only, no features)."""
        try:
            for i in range(self.n_chunks):
                self.chunk(i)
        except (ValueError, OSError, KeyError, RuntimeError) as e:
            log.warning("feature cache entry %s has a damaged chunk (%s); rebuilding it", self.index, e)
            return False
        return True

    def __len__(self) -> int:
        return self.rows

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.dim)

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4

    def chunk(self, i: int) -> torch.Tensor:
        """Chunk ``i``'s features (float32): a read-only view of the memory-mapped file, not a copy.

        Raises:
            ValueError: the chunk file does not belong to this entry or has the wrong shape (a damaged cache).
        """
        if self._inline is not None:
            return self._inline
        path = chunk_path(self.index, i)
        want = (min(self.chunk_rows, self.rows - i * self.chunk_rows), self.dim)
        x, meta = _map_features(path)
        if meta.get("key") != self.meta.get("key") or meta.get("chunk") != str(i) or tuple(x.shape) != want:
            raise ValueError(f"feature cache chunk {path} does not belong to its entry; delete {self.index} to rebuild")
        return x

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, targets) of each chunk in order."""
        for i in range(max(self.n_chunks, 1)):
            x = self.chunk(i)
            start = i * self.chunk_rows
            yield x, self.targets[start : start + x.shape[0]]

    def __getitem__(self, item: slice) -> torch.Tensor:
        if not isinstance(item, slice) or item.step not in (None, 1):
            raise TypeError("StoredFeatures supports contiguous slices only; use load() for fancy indexing")
        start, stop, _ = item.indices(self.rows)
        if self._inline is not None:
            return self._inline[start:stop]
        parts = []
        for i in range(start // self.chunk_rows, (max(stop, start + 1) - 1) // self.chunk_rows + 1):
            if start >= stop:
                break
            base = i * self.chunk_rows
            parts.append(self.chunk(i)[max(start - base, 0) : stop - base])
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All features and targets in memory: the in-memory path."""
        if self._inline is not None:
            return self._inline, self.targets
        out = torch.empty(self.rows, self.dim)
        for i in range(self.n_chunks):
            x = self.chunk(i)
            out[i * self.chunk_rows : i * self.chunk_rows + x.shape[0]] = x
        return out, self.targets

    def batches(
        self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled (features, targets) batches of one epoch, reading one chunk at a time.

        The chunk order and the rows within each chunk are permuted by a generator seeded from (seed, epoch), so an
        epoch is reproducible; a batch never spans two chunks (each chunk's last batch may be shorter). Memory: one
        chunk and one batch.
        """
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
        order = torch.randperm(max(self.n_chunks, 1), generator=g).tolist() if shuffle else range(max(self.n_chunks, 1))
        for i in order:
            x = self.chunk(i)
            y = self.targets[i * self.chunk_rows : i * self.chunk_rows + x.shape[0]]
            rows = torch.randperm(x.shape[0], generator=g) if shuffle else None
            for b in range(0, x.shape[0], batch_size):
                if rows is None:
                    yield x[b : b + batch_size], y[b : b + batch_size]
                else:
                    idx = rows[b : b + batch_size]
                    yield x[idx], y[idx]

    def moments(self, num_classes: int) -> Moments:
        """Per-class counts, sums and sums of squared norms in one pass over the chunks (float64)."""
        counts = torch.zeros(num_classes, dtype=torch.long)
        sums = torch.zeros(num_classes, self.dim, dtype=torch.float64)
        squares = torch.zeros(num_classes, dtype=torch.float64)
        for x, y in self.chunks():
            x = x.double()
            counts += torch.bincount(y, minlength=num_classes)
            sums.index_add_(0, y, x)
            squares.index_add_(0, y, (x * x).sum(1))
        return Moments(counts, sums, squares)
