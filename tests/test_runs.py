"""The run folder: refused when taken (by a finished run or by a job writing it now), removed when a run fails,
replaced only once a new run succeeds, and put back by the next job when a kill -9 interrupted its replacement."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mr2ft import runs
from mr2ft.cli import app
from mr2ft.errors import UserError
from mr2ft.runs import run_folder

runner = CliRunner()


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


# ---- one writer per folder (issue 19) -------------------------------------------------------------------------------


@pytest.fixture
def holder(tmp_path):
    """Another process that claims a run folder (as a running probe or finetune does) until the test ends."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        code = "import sys; from pathlib import Path; from mr2ft import runs; runs.claim(Path(sys.argv[1]));"
        code += "print('held', flush=True); sys.stdin.read()"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.communicate(timeout=60)


def test_a_second_job_on_a_folder_another_process_writes_stops_in_one_line(tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    with pytest.raises(UserError, match="is being written by another mr2ft run.*choose another --out"):
        runs.check_run_dir(out)
    data = tmp_path / "data"
    data.mkdir()
    result = runner.invoke(app, ["probe", "--dataset", str(data), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        f"error: output folder {out} is being written by another mr2ft run (it holds {runs.lock_file(out)}); wait "
        "for it to finish or choose another --out"
    ]
    assert not out.exists()
    proc.communicate(timeout=60)  # the other job ends: its lock goes with it, and the folder is free
    with runs.run_folder(out):
        (out / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "run"]  # no lock file left behind


def test_a_claim_is_held_until_released_and_removes_the_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    runs.check_run_dir(out)
    runs.check_run_dir(out)  # the same process again: no conflict
    assert runs.lock_file(out).is_file()
    runs.release()
    assert not (tmp_path / "a").exists()


# ---- a killed --overwrite (issue 19) ----------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed_overwrite(tmp_path: Path, pid: int, checkpoint: bool = False) -> tuple[Path, Path]:
    """What kill -9 during ``--overwrite`` leaves: the old run aside, the new one half-written."""
    out = tmp_path / "run"
    backup = tmp_path / f".run.replaced-{pid}"
    backup.mkdir()
    (backup / "config.yaml").write_text("old: run\n")
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n')
    if checkpoint:
        (out / "checkpoints" / "ckpt-00000001").mkdir(parents=True)
    return out, backup


def test_the_next_job_restores_the_run_a_killed_overwrite_left_aside(tmp_path, capsys):
    out, backup = killed_overwrite(tmp_path, dead_pid())
    with pytest.raises(UserError, match="already exists"):
        runs.check_run_dir(out)
    assert f"note: restored {out} from {backup.name}" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml"] and not backup.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_report_on_a_folder_a_killed_overwrite_left_restores_it_first(tmp_path):
    out, backup = killed_overwrite(tmp_path, dead_pid())
    result = runner.invoke(app, ["report", str(out)])
    assert f"note: restored {out} from {backup.name}" in result.output
    assert result.exit_code == 2 and "holds no classes.json" in result.output  # the old run, as it was
    assert (out / "config.yaml").is_file() and not backup.exists()


@pytest.mark.parametrize("why", ["its process still runs", "the new run has a checkpoint"])
def test_a_replaced_run_that_cannot_be_put_back_safely_is_named_in_one_line(tmp_path, why):
    alive = why == "its process still runs"
    out, backup = killed_overwrite(tmp_path, os.getppid() if alive else dead_pid(), checkpoint=not alive)
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    data = tmp_path / "data"
    result = runner.invoke(app, ["probe", "--dataset", str(tmp_path), "--out", str(out), "--overwrite"])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith(f"error: {out} ") and str(backup) in line and f"mv {backup} {out}" in line
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before and not data.exists()


def test_the_other_processes_of_a_launch_share_the_main_process_claim(tmp_path, holder, monkeypatch):
    out = tmp_path / "run"
    holder(out)  # rank 0 of an `accelerate launch`, say
    monkeypatch.setenv("RANK", "1")
    runs.check_run_dir(out)  # rank 1 checks the same folder without a conflict, and takes no lock of its own
    assert out.absolute() not in runs._HELD
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="being written by another mr2ft run"):
        runs.check_run_dir(out)
