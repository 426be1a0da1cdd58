"""Datasets: a ``--dataset`` spec becomes train / val / test splits of (RGB PIL image, int label), with class names.

The package, by what each module owns:

- :mod:`~mr2ft.data.base`: image datasets (one split as a view of a source), RGB conversion, bad-image errors.
- :mod:`~mr2ft.data.splits`: :func:`load_dataset`, held-out splits, balanced subsets, fingerprints.
- :mod:`~mr2ft.data.sources`: image folders (and their symbolic-link policy), CSV, IDX and the named datasets.
- :mod:`~mr2ft.data.hf`: Hugging Face hub datasets and ``save_to_disk`` folders.
- :mod:`~mr2ft.data.sampling`: the class-balanced batch sampler, the per-epoch shuffle and seeded augmentation.
"""

from mr2ft.data.base import (
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    BadImageError,
    FileImageDataset,
    HFImageDataset,
    ImageDataset,
    TransformedDataset,
    to_rgb,
)
from mr2ft.data.sampling import ClassBalancedBatchSampler, EpochShuffle, SeededTransform
from mr2ft.data.sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    KNOWN_DATASETS,
    HubDataset,
    idx_files,
    read_idx,
)
from mr2ft.data.splits import DatasetSplits, load_dataset, load_dataset_for, split_fingerprint

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "BadImageError",
    "ClassBalancedBatchSampler",
    "DatasetSplits",
    "EpochShuffle",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "FileImageDataset",
    "HFImageDataset",
    "HubDataset",
    "ImageDataset",
    "KNOWN_DATASETS",
    "SeededTransform",
    "TransformedDataset",
    "idx_files",
    "load_dataset",
    "load_dataset_for",
    "read_idx",
    "split_fingerprint",
    "to_rgb",
]
