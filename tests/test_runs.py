"""The run folder: refused when taken, removed when a run fails, replaced only once a new run succeeds."""

from __future__ import annotations

import pytest

from mr2ft.errors import UserError
from mr2ft.runs import run_folder


def test_failed_run_leaves_no_folder(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError), run_folder(out):
        (out / "half.txt").write_text("x")
        raise RuntimeError("killed")
    assert not out.exists()


def test_failed_overwrite_restores_the_old_run(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), run_folder(out, overwrite=True):
        assert not (out / "old.txt").exists()
        (out / "new.txt").write_text("new")
        raise RuntimeError("killed")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    with run_folder(out, overwrite=True):
        (out / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


def test_taken_folder_is_refused_and_a_checkpoint_is_kept(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "x").write_text("x")
    with pytest.raises(UserError, match="--overwrite"), run_folder(out):
        pass
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), run_folder(fresh):
        (fresh / "checkpoints").mkdir()
        (fresh / "checkpoints" / "ckpt-1").mkdir()
        raise RuntimeError("nan")
    assert (fresh / "checkpoints" / "ckpt-1").is_dir()
