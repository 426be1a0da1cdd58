"""Fixtures more than one test file uses, defined once (a file that needs other inputs defines its own)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _images import make_image_folder


@pytest.fixture(scope="session", autouse=True)
def private_feature_cache(tmp_path_factory: pytest.TempPathFactory):
    """Jobs run without --cache-dir (predict, some eval calls) cache features under $MR2FT_CACHE_DIR: a folder of
    this test session, never the user's ~/.cache."""
    before = os.environ.get("MR2FT_CACHE_DIR")
    os.environ["MR2FT_CACHE_DIR"] = str(tmp_path_factory.mktemp("default-feature-cache"))
    yield
    if before is None:
        os.environ.pop("MR2FT_CACHE_DIR", None)
    else:
        os.environ["MR2FT_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes a step up
    to 30x slower; one thread keeps these tests fast (and results do not depend on it).

    Use it for a whole file with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 6 images of 32 px per split: 18 train images = 3 batches of 6."""
    return make_image_folder(tmp_path_factory.mktemp("images"), num_classes=3, per_class=6, size=32)
