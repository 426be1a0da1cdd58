"""The chunked feature store and extraction sharded over the processes of an accelerate launch (issue 17)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mr2ft import features
from mr2ft.featstore import chunk_folder, chunk_path
from mr2ft.features import FeatureCache, cached_features, extract_features, shard_ranges
from mr2ft.io import load_tensors
from tests._images import make_image_folder

REPO = Path(__file__).resolve().parents[1]
KEY = "ab" + "1" * 30


def _data(n: int = 30, d: int = 5, k: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)


# ---- the chunked store -------------------------------------------------------------------------------------------


def test_large_entry_is_written_in_fixed_size_chunks_and_reads_back_exactly(tmp_path):
    x, y = _data(30)
    cache = FeatureCache(tmp_path, chunk_rows=7)
    cache.save(KEY, x, y, split="train")
    files = sorted(chunk_folder(cache.path(KEY)).iterdir())
    assert [load_tensors(f)["features"].shape[0] for f in files] == [7, 7, 7, 7, 2]
    assert "features" not in load_tensors(cache.path(KEY))  # the index holds targets only
    stored = cache.open(KEY, expected_rows=30)
    assert stored.shape == (30, 5) and stored.nbytes == 30 * 5 * 4
    lx, ly = cache.load(KEY)
    assert torch.equal(lx, x) and torch.equal(ly, y)
    for a, b in ((0, 30), (3, 4), (6, 8), (5, 22), (28, 30), (7, 14)):  # slices across chunk boundaries
        assert torch.equal(stored[a:b], x[a:b])
    assert torch.equal(torch.cat([c for c, _ in stored.chunks()]), x)


def test_small_entry_stays_one_file(tmp_path):
    x, y = _data(6)
    cache = FeatureCache(tmp_path, chunk_rows=7)
    cache.save(KEY, x, y)
    assert not chunk_folder(cache.path(KEY)).exists()
    assert torch.equal(load_tensors(cache.path(KEY))["features"], x)
    assert torch.equal(cache.open(KEY)[2:5], x[2:5])


def test_streamed_batches_visit_every_row_once_per_epoch_reproducibly(tmp_path):
    x, y = _data(30)
    cache = FeatureCache(tmp_path, chunk_rows=7)
    cache.save(KEY, x, y)
    stored = cache.open(KEY)

    def epoch(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        bx, by = zip(*stored.batches(3, seed=5, epoch=e), strict=True)
        assert max(len(b) for b in bx) == 3
        return torch.cat(bx), torch.cat(by)

    ex, ey = epoch(0)
    order = torch.tensor([int(torch.nonzero((x == row).all(1))[0]) for row in ex])
    assert sorted(order.tolist()) == list(range(30))  # each row once
    assert torch.equal(ey, y[order])  # labels travel with their rows
    assert torch.equal(epoch(0)[0], ex)  # same seed and epoch: same order
    assert not torch.equal(epoch(1)[0], ex)  # next epoch: another order
    plain = torch.cat([b for b, _ in stored.batches(4, shuffle=False)])
    assert torch.equal(plain, x)


def test_one_pass_moments_match_the_direct_statistics(tmp_path):
    x, y = _data(40, d=3, k=4)
    cache = FeatureCache(tmp_path, chunk_rows=9)
    cache.save(KEY, x, y)
    m = cache.open(KEY).moments(5)  # class 4 has no rows
    for c in range(4):
        xc = x[y == c].double()
        assert m.counts[c] == len(xc)
        torch.testing.assert_close(m.class_means()[c], xc.mean(0))
        torch.testing.assert_close(m.class_spread()[c], ((xc - xc.mean(0)) ** 2).sum(1).mean())
    assert m.counts[4] == 0 and torch.all(m.sums[4] == 0)


def test_mr2_statistics_over_the_store_equal_the_in_memory_ones(tmp_path):
    from mr2ft.losses.stats import ClassStatistics

    x, y = _data(50, d=6, k=3)
    cache = FeatureCache(tmp_path, chunk_rows=8)
    cache.save(KEY, x, y)
    a, b = ClassStatistics(3, 6, p=5.0), ClassStatistics(3, 6, p=5.0)
    a.set_exact(x, y)
    b.set_exact(cache.open(KEY), y, chunk_size=8)  # two streaming passes over the chunks
    for name in ("M", "S", "S2"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name))


@pytest.mark.parametrize("damage", ["chunk_missing", "chunk_truncated", "index_truncated", "other_key"])
def test_damaged_chunked_entry_is_not_used(tmp_path, damage):
    x, y = _data(30)
    cache = FeatureCache(tmp_path, chunk_rows=7)
    cache.save(KEY, x, y)
    if damage == "chunk_missing":  # a kill after some chunks: the index is written last, so this is a broken copy
        chunk_path(cache.path(KEY), 2).unlink()
    elif damage == "chunk_truncated":
        p = chunk_path(cache.path(KEY), 1)
        p.write_bytes(p.read_bytes()[:100])
    elif damage == "index_truncated":
        p = cache.path(KEY)
        p.write_bytes(p.read_bytes()[:50])
    else:
        other = "ab" + "2" * 30
        cache.save(other, *_data(30, seed=1))
        chunk_path(cache.path(other), 1).replace(chunk_path(cache.path(KEY), 1))
    assert cache.load(KEY) is None
    cache.save(KEY, x, y)  # rebuilt
    assert torch.equal(cache.load(KEY)[0], x)


# ---- sharded extraction ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,batch,world", [(21, 4, 2), (21, 4, 8), (64, 8, 3), (5, 16, 2), (0, 4, 2)])
def test_shards_are_contiguous_cover_every_row_and_hold_whole_batches(rows, batch, world):
    ranges = shard_ranges(rows, batch, world)
    assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(a % batch == 0 for a, _ in ranges)
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= batch


class Images(torch.utils.data.Dataset):
    """Random 3x8x8 "images" with labels; counts how many are read."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.read = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.read += 1
        return self.x[i], int(self.y[i])


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())


def test_killed_sharded_extraction_resumes_with_only_the_missing_shard(tmp_path, monkeypatch):
    ds, model = Images(23), _model()
    whole, targets = extract_features(model, ds, batch_size=4, num_workers=0, progress=False)
    cache = FeatureCache(tmp_path / "cache")
    args = {"batch_size": 4, "num_workers": 0, "progress": False}
    # Process 1 of 2 finished its shard; process 0 was killed: shard files, no entry.
    with monkeypatch.context() as m:
        m.setattr(features, "launch_state", lambda: (1, 2, torch.device("cpu")))
        m.setattr(features, "_barrier_and_agree", lambda world, value: ((lambda: None), value))
        assert cached_features(cache, KEY, model, ds, **args) is None
    start, end = shard_ranges(23, 4, 2)[1]
    assert [p.name for p in cache.parts(KEY).iterdir()] == [f"{start:012d}-{end:012d}.safetensors"]
    assert not cache.path(KEY).exists() and cache.load(KEY) is None
    ds.read = 0
    x, y = cached_features(cache, KEY, model, ds, **args)  # the rerun (here with one process)
    assert ds.read == start  # only the rows of the missing shard were read
    assert torch.equal(x, whole) and torch.equal(y, targets)  # bit for bit: same batches as one process
    assert not cache.parts(KEY).exists()
    assert torch.equal(cache.load(KEY, expected_rows=23)[0], whole)
    ds.read = 0
    assert torch.equal(cached_features(cache, KEY, model, ds, **args)[0], whole) and ds.read == 0


def test_one_process_killed_mid_split_resumes_from_its_last_piece(tmp_path, monkeypatch):
    ds, model = Images(23), _model()
    whole, _ = extract_features(model, ds, batch_size=4, num_workers=0, progress=False)
    cache = FeatureCache(tmp_path / "cache", chunk_rows=8)  # 23 rows > one chunk: written in pieces of 8 rows
    calls = []

    def killed_after_one_piece(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # what Ctrl-C or a kill does mid-extraction
        calls.append(1)
        return extract_features(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(features, "extract_features", killed_after_one_piece)
        with pytest.raises(KeyboardInterrupt):
            cached_features(cache, KEY, model, ds, batch_size=4, num_workers=0, progress=False)
    assert [p.name for p in cache.parts(KEY).iterdir()] == [f"{0:012d}-{8:012d}.safetensors"]
    assert cache.load(KEY) is None  # no half entry
    ds.read = 0
    x, _ = cached_features(cache, KEY, model, ds, batch_size=4, num_workers=0, progress=False)
    assert ds.read == 15 and torch.equal(x, whole)
    assert len(list(chunk_folder(cache.path(KEY)).iterdir())) == 3  # stored as chunks of 8, 8 and 7 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PROBE = [
    "probe",
    "--backbone",
    "timm",
    "--model",
    "test_resnet",
    "--weights",
    "none",
    "--loss",
    "mr2",
    "--epochs",
    "3",
    "--batch-size",
    "8",
    "--extract-batch-size",
    "4",
    "--num-workers",
    "0",
]


@pytest.mark.slow
def test_two_process_probe_extracts_shards_and_matches_one_process_exactly(tmp_path):
    # 3 classes x 7 images: 21 rows over 2 processes x batch 4 are uneven shards (12 + 9 rows).
    data = make_image_folder(tmp_path / "images", num_classes=3, per_class=7, size=32)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(REPO)
    common = [*PROBE, "--dataset", str(data)]
    one = [sys.executable, "-m", "mr2ft", *common, "--cache-dir", str(tmp_path / "c1"), "--out", str(tmp_path / "r1")]
    launch = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(_free_port()), "-m", "mr2ft", *common]
    two = [*launch, "--cache-dir", str(tmp_path / "c2"), "--out", str(tmp_path / "r2")]
    for cmd in (one, two):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    entries = [sorted((tmp_path / c).rglob("*.safetensors")) for c in ("c1", "c2")]
    assert [p.relative_to(tmp_path / "c1") for p in entries[0]] == [p.relative_to(tmp_path / "c2") for p in entries[1]]
    assert len(entries[0]) == 2 and not list((tmp_path / "c2").rglob("*.parts"))
    for a, b in zip(*entries, strict=True):
        ta, tb = load_tensors(a), load_tensors(b)
        assert ta["features"].dtype == torch.float32 and torch.equal(ta["features"], tb["features"])
        assert torch.equal(ta["targets"], tb["targets"])
    assert (tmp_path / "r1" / "per_class.csv").read_text() == (tmp_path / "r2" / "per_class.csv").read_text()
    pa, pb = (
        load_tensors(tmp_path / "r1" / "predictions.safetensors"),
        load_tensors(tmp_path / "r2" / "predictions.safetensors"),
    )
    assert torch.equal(pa["preds"], pb["preds"]) and torch.equal(pa["targets"], pb["targets"])


def test_fits_in_memory_compares_with_the_memory_available_now():
    from mr2ft.featstore import fits_in_memory

    assert fits_in_memory(1 << 20) and not fits_in_memory(1 << 60)
