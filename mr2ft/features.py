"""Feature extraction from a frozen backbone and the on-disk feature cache.

Features are extracted once per (backbone fingerprint, data split fingerprint, device type, precision) and stored as
safetensors under the cache folder, so a second probe on the same data loads no image at all; bf16 features from a GPU
are never reused on a CPU, nor the reverse. The backbone fingerprint hashes the weights' content and the split
fingerprint each image's size, mtime, inode and ctime, so a file replaced in place is noticed. Each entry records its
own key and shape; an entry that does not match its key (a truncated file) is detected and rebuilt. Opening the cache
deletes the temporary files that a killed write left in it. Entries are written in chunks (:mod:`mr2ft.featstore`).

Under ``accelerate launch`` (or ``torchrun``) :func:`stored_features` (and :func:`cached_features`, which loads its
result into memory) splits every split into contiguous row ranges, one per process, aligned to whole extraction
batches so that every batch holds the same images as in a one-process run (hence bit-identical features); each
process writes its range as shard files ``<key>.parts/<start>-<end>`` in pieces, atomically; the main process
assembles them in dataset order into the entry and deletes the parts. A killed extraction leaves only shard files, no
entry; the next run (with any number of processes) extracts only the rows no shard file covers. One process
extracting more than one chunk of rows writes such pieces too, so it resumes as well.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader, Subset

from mr2ft import featstore
from mr2ft.errors import UserError
from mr2ft.featstore import CACHE_FORMAT, ChunkWriter, StoredFeatures, write_entry
from mr2ft.io import remove_stale_temp_files, save_tensors

log = logging.getLogger("mr2ft")

__all__ = [
    "CACHE_FORMAT",
    "FeatureCache",
    "cache_key",
    "cached_features",
    "extract_features",
    "launch_state",
    "stored_features",
]


def default_cache_dir() -> Path:
    """``$MR2FT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mr2ft/features`` (``~/.cache/mr2ft/features``)."""
    if os.environ.get("MR2FT_CACHE_DIR"):
        return Path(os.environ["MR2FT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mr2ft" / "features"


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision(device: torch.device) -> str:
    """The precision features are extracted in on ``device``: bf16 autocast on CUDA, float32 elsewhere."""
    return "bf16-autocast" if device.type == "cuda" else "float32"


def cache_key(backbone_fingerprint: str, split_fingerprint: str, device: torch.device | str | None = None) -> str:
    """The cache key of one split's features under one backbone, extracted on ``device`` (default: :func:`pick_device`)
    in its :func:`precision`."""
    device = torch.device(device) if device is not None else pick_device()
    h = hashlib.sha256()
    for part in (CACHE_FORMAT, backbone_fingerprint, split_fingerprint, device.type, precision(device)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    device: torch.device | None = None,
    description: str = "features",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` over a dataset of ``(image tensor, label)`` in eval mode and return float32 features and labels.

    On CUDA the forward runs under bf16 autocast and the loader pins memory; workers decode images.
    """
    device = device or pick_device()
    # channels_last makes convolutions markedly faster on CPU and GPU (1.4x for EfficientNet-Lite0 on 2 CPU cores);
    # it changes the layout of 4-d weights only, never their values.
    model.eval().to(device, memory_format=torch.channels_last)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(description, total=len(dataset))
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision(device) != "float32"):
                out = model(images)
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).long())
            bar.advance(task, len(images))
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """Feature entries under ``root/<key[:2]>/<key>.safetensors`` (see :mod:`mr2ft.featstore` for the chunked form).

    Args:
        root: the cache folder (``--cache-dir``); ``None`` means :func:`default_cache_dir`.
        stale_after_s: a temporary file older than this is deleted on open even if its writer may still run.
        chunk_rows: rows per chunk file of a new entry (default :data:`mr2ft.featstore.CHUNK_ROWS`).

    Raises:
        UserError: the folder cannot be created or written (a file, read-only, a name too long).
    """

    def __init__(
        self, root: str | os.PathLike | None = None, stale_after_s: float = 3600.0, chunk_rows: int | None = None
    ) -> None:
        self.root = Path(root) if root else default_cache_dir()
        self.chunk_rows = chunk_rows or featstore.CHUNK_ROWS
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK | os.X_OK):
                raise PermissionError(13, "permission denied")
        except OSError as e:
            reason = (
                "it is a file, not a folder" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
            )
            raise UserError(
                f"the feature cache folder {self.root} cannot be used ({reason}); pass a writable folder with "
                "--cache-dir"
            ) from None
        # depth 2: entries; depth 3: chunks and shard files
        removed = sum(remove_stale_temp_files(self.root, max_age_s=stale_after_s, depth=d) for d in (2, 3))
        if removed:
            log.info("removed %d temporary file(s) left by interrupted writes in %s", removed, self.root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def parts(self, key: str) -> Path:
        """The temporary folder of an entry's shard files while processes extract it."""
        return self.root / key[:2] / f"{key}.parts"

    def open(self, key: str, expected_rows: int | None = None) -> StoredFeatures | None:
        """The entry for ``key`` opened for chunked reading, or ``None`` when absent or not valid for the key (or a
        chunk's header is damaged)."""
        stored = StoredFeatures.open(self.path(key), key, expected_rows)
        return stored if stored is not None and stored.verify() else None

    def load(self, key: str, expected_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (features, targets) for ``key`` in memory, or ``None`` when absent or not valid for the key."""
        stored = self.open(key, expected_rows)
        if stored is None:
            return None
        try:
            return stored.load()
        except Exception as e:  # a damaged chunk: rebuild
            log.warning("feature cache entry %s is unreadable (%s); rebuilding it", self.path(key), e)
            return None

    def save(self, key: str, features: torch.Tensor, targets: torch.Tensor, **info: str) -> Path:
        """Store features atomically (chunked when large), with the key and shape in the metadata."""
        path = self.path(key)
        meta = {"key": key, **{k: str(v) for k, v in info.items()}}
        try:
            write_entry(path, features, targets, meta, self.chunk_rows, save=save_tensors)
        except OSError as e:  # a full disk must not cost the features just extracted
            log.warning("could not write the feature cache entry %s (%s); continuing without it", path, e.strerror)
        return path


# ---- extraction over several processes ------------------------------------------------------------------------


def launch_state() -> tuple[int, int, torch.device]:
    """(rank, number of processes, device) of this process. Under ``accelerate launch``/``torchrun`` (WORLD_SIZE > 1)
    this starts the process group through accelerate (gloo on CPU, NCCL on GPU; one device per process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes, state.device
    return 0, 1, pick_device()


def is_main_process() -> bool:
    """Rank 0 of a launch, or a process outside any launch."""
    return os.environ.get("RANK", "0") in ("", "0")


def shard_ranges(rows: int, batch_size: int, world: int) -> list[tuple[int, int]]:
    """Contiguous row ranges, one per process, made of whole batches of ``batch_size`` (some may be empty)."""
    batches = -(-rows // batch_size)
    edges = [min(rows, (r * batches // world) * batch_size) for r in range(world)] + [rows]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _shard_files(folder: Path, key: str) -> list[tuple[int, int, Path]]:
    """Complete shard files of ``key`` in ``folder`` as sorted (start, end, path)."""
    from safetensors import safe_open

    found = []
    for p in folder.glob("*.safetensors") if folder.is_dir() else []:
        try:
            start, end = (int(v) for v in p.stem.split("-"))
            with safe_open(str(p), framework="pt") as fh:
                ok = (fh.metadata() or {}).get("key") == key and fh.get_slice("features").get_shape()[0] == end - start
        except Exception:  # a foreign or broken file: extracted again
            ok = False
        if ok:
            found.append((start, end, p))
    return sorted(found)


def _gaps(start: int, end: int, have: list[tuple[int, int, Path]]) -> list[tuple[int, int]]:
    """Sub-ranges of [start, end) that no shard in ``have`` covers."""
    gaps, pos = [], start
    for a, b, _ in have:
        if b <= pos or a >= end:
            continue
        if a > pos:
            gaps.append((pos, min(a, end)))
        pos = max(pos, b)
    return gaps + ([(pos, end)] if pos < end else [])


def _assemble(cache: FeatureCache, key: str, rows: int, meta: dict[str, str]) -> None:
    """Main process: write the entry from the shard files in row order, then delete them."""
    from safetensors import safe_open

    have = _shard_files(cache.parts(key), key)
    writer, pos = ChunkWriter(cache.path(key), {"key": key, **meta}, cache.chunk_rows, save=save_tensors), 0
    while pos < rows:
        covering = [(b, a, p) for a, b, p in have if a <= pos < b]
        if not covering:
            raise RuntimeError(f"rows {pos}.. of feature cache entry {key} were extracted by no process")
        b, a, p = max(covering)
        with safe_open(str(p), framework="pt") as fh:
            writer.append(fh.get_slice("features")[pos - a : b - a], fh.get_slice("targets")[pos - a : b - a])
        pos = b
    writer.close()
    shutil.rmtree(cache.parts(key), ignore_errors=True)


def _barrier_and_agree(world: int, value: bool) -> tuple[Callable[[], None], bool]:
    """A barrier for the launch and the main process's ``value`` on every process."""
    if world == 1:
        return (lambda: None), value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return dist.barrier, bool(box[0])


def stored_features(
    cache: FeatureCache,
    key: str,
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    num_workers: int = 2,
    description: str = "features",
    progress: bool = True,
    info: dict[str, str] | None = None,
) -> StoredFeatures | None:
    """One split's features as an opened store entry, nothing read but its targets: from the cache when valid, else
    extracted by every process of the launch on its own rows and cached once. Returns it on the main process and
    ``None`` on the others. A split of at most one chunk extracted by one process comes back as the tensors just
    computed (:meth:`StoredFeatures.in_memory`)."""
    rank, world, device = launch_state()
    rows = len(dataset)
    hit = cache.open(key, expected_rows=rows) if rank == 0 else None
    parts = cache.parts(key)
    barrier, have_it = _barrier_and_agree(world, hit is not None)
    if have_it:
        if hit is not None:  # the main process; shards left by a kill after the entry was written go now
            shutil.rmtree(parts, ignore_errors=True)
        return hit
    if world == 1 and rows <= cache.chunk_rows and not parts.is_dir():  # small, one process: in memory, cache once
        x, y = extract_features(
            model,
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            description=description,
            progress=progress,
        )
        cache.save(key, x, y, **(info or {}))
        return StoredFeatures.in_memory(x, y)
    remove_stale_temp_files(parts, depth=1)
    start, end = shard_ranges(rows, batch_size, world)[rank]
    piece = max(batch_size, cache.chunk_rows // batch_size * batch_size)
    for a, b in _gaps(start, end, _shard_files(parts, key)):
        for p in range(a, b, piece):
            q = min(b, p + piece)
            x, y = extract_features(
                model,
                Subset(dataset, range(p, q)),
                batch_size=batch_size,
                num_workers=num_workers,
                device=device,
                description=f"{description} [{p}:{q}]",
                progress=progress,
            )
            try:
                save_tensors(parts / f"{p:012d}-{q:012d}.safetensors", {"features": x, "targets": y}, {"key": key})
            except OSError as e:
                raise UserError(
                    f"cannot write extracted features to {parts} ({e.strerror}); free some space or pass another "
                    "--cache-dir"
                ) from None
    barrier()
    if rank != 0:
        return None
    _assemble(cache, key, rows, info or {})
    return cache.open(key, expected_rows=rows)


def cached_features(
    cache: FeatureCache, key: str, model: torch.nn.Module, dataset, **options
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One split's (features, targets) in memory: :func:`stored_features` (same options), loaded. ``None`` on the
    processes of a launch other than the main one."""
    stored = stored_features(cache, key, model, dataset, **options)
    return None if stored is None else stored.load()
