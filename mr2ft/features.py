"""Feature extraction from a frozen backbone and the on-disk feature cache.

Features are extracted once per (backbone fingerprint, data split fingerprint) and stored as safetensors under the
cache folder, so a second probe on the same data loads no image at all. Each entry records its own key and shape;
an entry that does not match its key (a changed dataset, a truncated file) is detected and rebuilt.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch.utils.data import DataLoader

from mr2ft.io import save_tensors

log = logging.getLogger("mr2ft")

CACHE_FORMAT = "1"


def default_cache_dir() -> Path:
    """``$MR2FT_CACHE_DIR``, else ``$XDG_CACHE_HOME/mr2ft/features`` (``~/.cache/mr2ft/features``)."""
    if os.environ.get("MR2FT_CACHE_DIR"):
        return Path(os.environ["MR2FT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mr2ft" / "features"


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cache_key(backbone_fingerprint: str, split_fingerprint: str) -> str:
    """The cache key of one split's features under one backbone."""
    h = hashlib.sha256()
    for part in (CACHE_FORMAT, backbone_fingerprint, split_fingerprint):
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
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(images)
            feats.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).long())
            bar.advance(task, len(images))
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


class FeatureCache:
    """Safetensors files of features under ``root/<key[:2]>/<key>.safetensors``.

    Args:
        root: the cache folder (``--cache-dir``); ``None`` means :func:`default_cache_dir`.
    """

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root else default_cache_dir()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str, expected_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The cached (features, targets) for ``key``, or ``None`` when absent or not valid for the key."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                feats, targets = fh.get_tensor("features"), fh.get_tensor("targets")
        except Exception as e:  # truncated or foreign file: rebuild
            log.warning("feature cache entry %s is unreadable (%s); rebuilding it", path, e.__class__.__name__)
            return None
        ok = (
            meta.get("key") == key
            and meta.get("format") == CACHE_FORMAT
            and feats.shape[0] == targets.shape[0]
            and (expected_rows is None or feats.shape[0] == expected_rows)
        )
        if not ok:
            log.warning("feature cache entry %s does not match its key or the data; rebuilding it", path)
            return None
        return feats, targets

    def save(self, key: str, features: torch.Tensor, targets: torch.Tensor, **info: str) -> Path:
        """Store features atomically, with the key and shape in the file's metadata."""
        path = self.path(key)
        meta = {
            "key": key,
            "format": CACHE_FORMAT,
            "rows": str(features.shape[0]),
            **{k: str(v) for k, v in info.items()},
        }
        save_tensors(path, {"features": features.float().contiguous(), "targets": targets.long()}, metadata=meta)
        return path
