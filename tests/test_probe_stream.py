"""The probe's head trained by streaming the chunked feature store (mr2ft.featrows) against the in-memory path.

Stores here have chunks of a few rows, so that every read crosses chunks; references are computed with plain torch
on the loaded tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mr2ft import featrows, featstore
from mr2ft.cli import app
from mr2ft.config import ProbeConfig, replace
from mr2ft.featrows import StoredRows
from mr2ft.featstore import ChunkWriter, StoredFeatures, chunk_folder
from mr2ft.headfit import Features, fit_head, fit_lff
from mr2ft.io import read_jsonl
from mr2ft.losses import build_loss

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def store(path, x: torch.Tensor, y: torch.Tensor, chunk_rows: int = 7, key: str = "k") -> StoredFeatures:
    """A store of ``x``, written in uneven pieces so chunk and append boundaries differ."""
    writer = ChunkWriter(path, {"key": key}, chunk_rows)
    for a in range(0, len(y), 5):
        writer.append(x[a : a + 5], y[a : a + 5])
    writer.close()
    return StoredFeatures.open(path, key)


def blobs(n_per_class: int = 40, dim: int = 12, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)[torch.randperm(classes * n_per_class, generator=g)]
    x = 3.0 * torch.randn(classes, dim, generator=g)[y] + 5.0 + 2.0 * torch.randn(len(y), dim, generator=g)
    return x, y


def test_take_and_blocked_epochs_read_every_row_exactly_once(tmp_path):
    xa, ya = blobs(seed=1)
    xb, yb = blobs(n_per_class=10, seed=2)
    rows = StoredRows.concat(
        StoredRows.of(store(tmp_path / "a.safetensors", xa, ya)),
        StoredRows.of(store(tmp_path / "b.safetensors", xb, yb, key="b")),
    )
    ref = torch.cat([xa, xb])
    pick = torch.randperm(len(ref), generator=torch.Generator().manual_seed(0))[:100].sort().values
    for x, want in ((rows, ref), (rows.subset(pick), ref[pick])):
        assert x.shape == want.shape and torch.equal(x[3:40], want[3:40])
        assert torch.equal(x[torch.tensor([5, 0, len(want) - 1, 5])], want[[5, 0, len(want) - 1, 5]])
        for epoch in range(3):
            order = featrows.epoch_order(x, torch.Generator().manual_seed(epoch))
            assert torch.equal(order.sort().values, torch.arange(len(want)))  # every row once
            assert torch.equal(x[order], want[order])
            # chunk-blocked: the order visits each chunk in one run of consecutive rows
            chunks = x.chunk_of[order]
            runs = 1 + int((chunks[1:] != chunks[:-1]).sum())
            assert runs == len(torch.unique(chunks))
    assert len(rows.chunks) == 18 + 5  # 120 rows in chunks of 7, then 30
    assert torch.equal(torch.cat(list(featrows.blocks(rows, 16))), ref)


def test_column_moments_equal_a_float64_reference(tmp_path):
    x, y = blobs()
    x = x * 100.0 + 1000.0  # a large mean: one-pass float64 sums must keep the spread
    rows = StoredRows.of(store(tmp_path / "m.safetensors", x, y))
    mean, std = featrows.column_moments(rows, size=9)
    ref = x.double()
    assert torch.allclose(mean.double(), ref.mean(0), rtol=1e-6)
    assert torch.allclose(std.double(), ref.std(0, unbiased=False), rtol=1e-5)


@pytest.mark.parametrize(
    ("p", "normalized", "head"), [(2.0, False, "linear"), (5.0, True, "linear"), (2.0, False, "bn_linear")]
)
def test_mr2_statistics_from_the_store_equal_a_direct_computation(tmp_path, p, normalized, head):
    from mr2ft.probe import make_loss

    x, y = blobs()
    rows = StoredRows.of(store(tmp_path / "s.safetensors", x, y))
    cfg = ProbeConfig(dataset="x", p=p, head=head)
    stats = make_loss(cfg, "mr2", Features(rows, y), 3, normalized).stats
    z = x.double()
    if head == "bn_linear":
        z = (z - z.mean(0)) / z.std(0, unbiased=False)
    if normalized:
        z = torch.nn.functional.normalize(z, dim=1)
    for k in range(3):
        zk = z[y == k]
        mu = zk.mean(0)
        dev = zk - mu
        assert stats.M[k].item() == pytest.approx(float(mu.abs().pow(p).sum().pow(2 / p)), rel=1e-5)
        assert stats.S[k].item() == pytest.approx(float(dev.abs().pow(p).sum(1).pow(2 / p).mean()), rel=1e-5)
        assert stats.S2[k].item() == pytest.approx(float(dev.pow(2).sum(1).mean()), rel=1e-5)
    in_memory = make_loss(cfg, "mr2", Features(x, y), 3, normalized).stats
    for name in ("M", "S", "S2"):
        assert torch.allclose(getattr(stats, name), getattr(in_memory, name), rtol=1e-5)


def test_a_streamed_fit_converges_to_the_in_memory_optimum(tmp_path):
    x, y = blobs()
    rows = StoredRows.of(store(tmp_path / "f.safetensors", x, y, chunk_rows=16))
    cfg = ProbeConfig(dataset="x", batch_size=8)
    fits = [fit_head(cfg, Features(f, y), 3, build_loss("ce", 3, 12), weight_decay=0.05, seed=0) for f in (x, rows)]
    (mem, a), (stream, b) = fits
    assert a.converged and b.converged
    assert b.train_loss == pytest.approx(a.train_loss, rel=1e-2)
    # both heads read raw features (standardisation folded back) and agree up to the plateau's tolerance
    assert torch.allclose(stream(x), mem(x), atol=0.1) and torch.equal(stream(x).argmax(1), mem(x).argmax(1))
    lff, stopped = fit_lff(replace(cfg, epochs=3), Features(rows, y), 3, weight_decay=0.05, seed=0)  # 45 steps
    assert stopped.steps == 45 and (lff(x).argmax(1) == mem(x).argmax(1)).float().mean() >= 0.9


def test_auto_streams_only_when_the_features_would_not_fit(monkeypatch):
    assert (
        featrows.choose_memory("stream", 10)[0] == "stream" and featrows.choose_memory("memory", 1 << 60)[0] == "memory"
    )
    assert featrows.choose_memory("auto", 1 << 20)[0] == "memory"
    monkeypatch.setattr(featrows, "fits_in_memory", lambda nbytes: False)
    assert featrows.choose_memory("auto", 1 << 20)[0] == "stream"


PROBE = ["probe", "--backbone", "timm", "--model", "test_resnet", "--weights", "none", "--num-workers", "0"]
PROBE += [
    "--extract-batch-size",
    "6",
    "--batch-size",
    "6",
    "--loss",
    "mr2",
    "--wd-grid",
    "0.03,0.3",
    "--converge-tol",
    "0.01",
]


def test_the_streamed_probe_chooses_and_scores_like_the_in_memory_one(images, tmp_path, monkeypatch):
    monkeypatch.setattr(featstore, "CHUNK_ROWS", 5)  # 18 train / 18 test features: 4 chunks each
    cache, runs = tmp_path / "cache", {}
    for how in ("memory", "stream"):
        with monkeypatch.context() as m:
            if how == "stream":  # the stream path never loads a split whole
                m.setattr(StoredFeatures, "load", lambda self: pytest.fail("features loaded whole"))
            out = tmp_path / how
            args = ["--dataset", str(images), "--cache-dir", str(cache), "--out", str(out), "--feature-memory", how]
            result = runner.invoke(app, [*PROBE, *args])
            assert result.exit_code == 0, (result.output, result.exception)
        header = yaml.safe_load((out / "config.yaml").read_text())
        text = (out / "config.yaml").read_text()
        assert header["feature_memory"] == how and f"feature_memory_used: {how}" in text
        records = read_jsonl(out / "metrics.jsonl")
        stopped = [r for r in records if r.get("event") == "stopped" or r["stage"] == "sweep"]  # every fit's end
        runs[how] = {
            "wd": header["weight_decay"],  # the weight decay chosen on validation
            "sweep": [(r["weight_decay"], r["val_overall"]) for r in records if r["stage"] == "sweep"],
            "top1": json.loads((out / "report.json").read_text())["summary"]["top1"],
            "converged": [r["converged"] for r in stopped],
        }
    assert len(list(chunk_folder(next(cache.rglob("*.safetensors"))).iterdir())) == 4
    mem, stream = runs["memory"], runs["stream"]
    assert mem["wd"] == stream["wd"] and mem["sweep"] == stream["sweep"] and len(mem["sweep"]) == 2
    assert len(mem["converged"]) == 3 and all(mem["converged"]) and all(stream["converged"])
    assert abs(mem["top1"] - stream["top1"]) <= 100 / 18 + 1e-6  # at most one of 18 test images differs


def test_an_unknown_feature_memory_is_one_line_and_exit_2(images, tmp_path):
    result = runner.invoke(
        app, [*PROBE, "--dataset", str(images), "--feature-memory", "disk", "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 2 and "--feature-memory" in result.output and not (tmp_path / "r").exists()
