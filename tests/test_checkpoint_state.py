"""Issue 16: checkpoints through ``accelerator.save_state`` / ``load_state``.

- FSDP2 on two CPU processes (gloo; see tests/_sharded_cpu.py for how Accelerate is told to shard on a CPU): a run
  stopped by ``--max-steps`` mid-epoch and resumed ends bit-identical to an uninterrupted one.
- DeepSpeed ZeRO-2 on two CPU processes (tests/_sharded_cpu.py): the same, bit-identical.
- A checkpoint of mr2ft 0.1 (``optimizer.pt``, no ``accelerate/``) still resumes, exactly.
- No pickle in a checkpoint ever runs: Accelerate's files, torch's distributed-checkpoint ``.metadata``, DeepSpeed's
  ``*_states.pt`` and mr2ft's own are read with only tensors and plain values allowed (and DeepSpeed's four plain
  classes), and anything else is refused in one line.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _images import make_image_folder
from _models import write_tiny_checkpoint
from typer.testing import CliRunner

from mr2ft import checkpoints, sharding
from mr2ft.cli import app
from mr2ft.errors import UserError
from mr2ft.io import load_tensors, read_jsonl

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_flags(root: Path, images: Path) -> list[str]:
    """A tiny ViT, MR2 and drop-path (so the RNG states matter): 2 epochs of 3 steps of 6 images."""
    spec = write_tiny_checkpoint("timm-vit", root / "models")
    flags = ["--backbone", "timm", "--model", spec["model"], "--weights", str(spec["weights"]), "--image-size", "32"]
    flags += ["--dataset", str(images), "--epochs", "2", "--batch-size", "6", "--lr", "1e-3", "--num-workers", "0"]
    return [*flags, "--loss", "mr2", "--drop-path", "0.2"]


def ok(args: list[str]):
    result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def assert_same_run(a: Path, b: Path, ranks: int = 1) -> None:
    """Same final weights, MR2 statistics of every process, predictions, class statistics and metrics records."""
    ca, cb = checkpoints.find_checkpoint(a)[1], checkpoints.find_checkpoint(b)[1]
    assert ca.name == cb.name
    names = ["model.safetensors", *(f"loss_rank{r}.safetensors" for r in range(ranks))]
    pairs = [(ca / n, cb / n) for n in names] + [
        (a / n, b / n) for n in ("predictions.safetensors", "class_stats.safetensors")
    ]
    for fa, fb in pairs:
        ta, tb = load_tensors(fa), load_tensors(fb)
        assert ta.keys() == tb.keys(), fa.name
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{fa.name}:{key}"
    assert read_jsonl(a / "metrics.jsonl") == read_jsonl(b / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, images: Path) -> dict[str, Path]:
    """One process: an uninterrupted run, and the same stopped by --max-steps inside its second epoch."""
    root = tmp_path_factory.mktemp("ckpt-state")
    flags = tiny_flags(root, images)
    ok(["finetune", *flags, "--out", str(root / "whole")])
    ok(["finetune", *flags, "--max-steps", "4", "--out", str(root / "parts")])
    return {"whole": root / "whole", "parts": root / "parts"}


# ---- the new layout, and a checkpoint of mr2ft 0.1 ------------------------------------------------------------------


def test_optimizer_scaler_and_rng_go_through_save_state_and_the_weights_stay_ours(runs: dict[str, Path]) -> None:
    ckpt = checkpoints.find_checkpoint(runs["parts"])[1]
    assert {p.name for p in (ckpt / "accelerate").iterdir()} == {"optimizer.bin", "random_states_0.pkl"}
    assert (ckpt / "model.safetensors").is_file() and not (ckpt / "optimizer.pt").exists()
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["sharding"] is None and state["step"] == 4 and state["batch"] == 1


def test_a_checkpoint_of_mr2ft_0_1_still_resumes_exactly(runs: dict[str, Path], tmp_path: Path) -> None:
    old = tmp_path / "old"
    shutil.copytree(runs["parts"], old)
    ckpt = checkpoints.find_checkpoint(old)[1]
    # 0.1's layout: optimizer.pt beside model.safetensors, the scaler in state.pt, no accelerate/ folder.
    torch.save(torch.load(ckpt / "accelerate" / "optimizer.bin", weights_only=True), ckpt / "optimizer.pt")
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["sharding"]
    torch.save({**state, "scaler": None}, ckpt / "state.pt")
    shutil.rmtree(ckpt / "accelerate")
    assert "resuming" in ok(["finetune", "--resume", str(old), "--num-workers", "0"]).output
    assert_same_run(runs["whole"], old)
    assert (checkpoints.find_checkpoint(old)[1] / "accelerate" / "optimizer.bin").is_file()  # new ones: new layout


def test_a_checkpoint_resumes_only_under_the_sharding_it_was_written_with(runs: dict[str, Path]) -> None:
    ckpt = checkpoints.find_checkpoint(runs["parts"])[1]
    with pytest.raises(UserError, match="written without FSDP and this run is under FSDP2 FULL_STATE_DICT"):
        checkpoints.read_state(ckpt, 1, {}, "FSDP2 FULL_STATE_DICT")


def test_megatron_zero_3_an_ignored_config_and_switches_needing_whole_weights_are_refused(monkeypatch) -> None:
    plugin = SimpleNamespace(fsdp_version=2, state_dict_type=SimpleNamespace(name="SHARDED_STATE_DICT"))
    fsdp = SimpleNamespace(distributed_type="FSDP", state=SimpleNamespace(fsdp_plugin=plugin))
    assert sharding.sharding(fsdp) == "FSDP2 SHARDED_STATE_DICT"
    with pytest.raises(UserError, match="--model-ema works on the whole weights"):
        sharding.refuse_unsupported(fsdp, model_ema=True, wise=False)
    with pytest.raises(UserError, match="--wise-alpha"):
        sharding.refuse_unsupported(fsdp, model_ema=False, wise=True)
    megatron = SimpleNamespace(distributed_type="MEGATRON_LM", state=SimpleNamespace())
    with pytest.raises(UserError, match="does not run under Megatron-LM.*unpickling.*FSDP or DeepSpeed ZeRO-1/2"):
        sharding.refuse_unsupported(megatron, model_ema=False, wise=False)
    for stage in (0, 3):
        zero = SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=SimpleNamespace()))
        zero.state.deepspeed_plugin.zero_stage = stage
        with pytest.raises(UserError, match=f"ZeRO stage 1 or 2 only.*asks for stage {stage}"):
            sharding.refuse_unsupported(zero, model_ema=False, wise=False)
    zero2 = SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=SimpleNamespace()))
    zero2.state.deepspeed_plugin.zero_stage = 2
    assert sharding.sharding(zero2) == "DeepSpeed ZeRO-2"
    with pytest.raises(UserError, match="--model-ema does not run under DeepSpeed"):
        sharding.refuse_unsupported(zero2, model_ema=True, wise=False)
    sharding.refuse_unsupported(zero2, model_ema=False, wise=False)
    ddp = SimpleNamespace(distributed_type="MULTI_CPU", state=SimpleNamespace())
    sharding.refuse_unsupported(ddp, model_ema=True, wise=True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch --use_fsdp` on CPUs: no FSDP, no error
    with pytest.raises(UserError, match="asks for FSDP, which Accelerate applies on GPUs only.*MULTI_CPU"):
        sharding.refuse_unsupported(ddp, model_ema=False, wise=False)
    sharding.refuse_unsupported(fsdp, model_ema=False, wise=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")  # e.g. `accelerate launch --use_deepspeed --cpu`
    with pytest.raises(UserError, match="asks for DeepSpeed, which Accelerate did not apply.*MULTI_CPU"):
        sharding.refuse_unsupported(ddp, model_ema=False, wise=False)


def test_deepspeed_clips_gradients_as_grad_clip_says() -> None:
    """DeepSpeed clips gradients itself (Accelerate's default config: at 1.0); --grad-clip decides."""

    def run(clipping: object) -> SimpleNamespace:
        plugin = SimpleNamespace(zero_stage=2, deepspeed_config={"gradient_clipping": clipping})
        return SimpleNamespace(distributed_type="DEEPSPEED", state=SimpleNamespace(deepspeed_plugin=plugin))

    for grad_clip, want in ((None, 0.0), (2.5, 2.5)):
        accelerator = run("auto")
        sharding.fit_deepspeed_config(accelerator, grad_clip)
        assert accelerator.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] == want
    sharding.fit_deepspeed_config(run(1.0), 1.0)
    with pytest.raises(UserError, match="clips gradients at 1.0 and --grad-clip is None"):
        sharding.fit_deepspeed_config(run(1.0), None)
    sharding.fit_deepspeed_config(SimpleNamespace(distributed_type="MULTI_CPU"), None)  # nothing without DeepSpeed


# ---- no pickle runs -----------------------------------------------------------------------------------------------


class Payload:
    """Unpickling it makes a folder: proof that arbitrary code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_pickle_in_any_checkpoint_file_is_refused_and_never_runs(runs: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for name in ("accelerate/optimizer.bin", "accelerate/random_states_0.pkl", "accelerate/custom_checkpoint_0.pkl"):
        ckpt = tmp_path / name.replace("/", "-")
        shutil.copytree(checkpoints.find_checkpoint(runs["parts"])[1], ckpt)
        torch.save({"state": Payload(marker)}, ckpt / name)
        with pytest.raises(UserError, match=f"{name}.* unreadable or holds more than tensors"):
            sharding.check_accelerate_files(ckpt / "accelerate")
    for name in ("state.pt", "rank0.pt"):
        torch.save({"step": Payload(marker)}, tmp_path / name)
        with pytest.raises(UserError, match="unreadable"):
            checkpoints.read(tmp_path / name)
    assert not marker.exists()
    # End to end: one line, exit 2, nothing ran, the run is left as it was.
    run = tmp_path / "run"
    shutil.copytree(runs["parts"], run)
    torch.save(Payload(marker), checkpoints.find_checkpoint(run)[1] / "accelerate" / "optimizer.bin")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = runner.invoke(app, ["finetune", "--resume", str(run), "--num-workers", "0"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "accelerate/optimizer.bin" in errors[0], result.output
    assert not marker.exists()
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}


def _stack_global(module: str, name: str) -> bytes:
    """A protocol-4 pickle of the global ``module.name`` (pickle 4 resolves a dotted name attribute by attribute)."""
    m, n = module.encode(), name.encode()
    return b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x94\x8c" + bytes([len(n)]) + n + b"\x94\x93\x94."


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_distributed_checkpoint_metadata_allows_torchs_classes_only(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "accelerate"
    state = {"model": {"w": torch.randn(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)}}
    state["optimizer"] = {"state": {"w": {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder / "pytorch_model_fsdp_0"))  # one process, no group
    sharding.check_accelerate_files(folder)  # what torch itself writes passes
    metadata = folder / "pytorch_model_fsdp_0" / ".metadata"
    marker = tmp_path / "ran"
    bad = [
        pickle.dumps(Payload(marker)),
        # an attribute path through an allowed module (pickle 4 resolves "a.b" from the module)
        _stack_global("torch.distributed.checkpoint.metadata", "torch.load"),
        _stack_global("torch", "load"),  # a torch global that is not a dtype
    ]
    for data in bad:
        metadata.write_bytes(data)
        with pytest.raises(UserError, match=r"\.metadata is unreadable or holds more than tensors \(.* not allowed"):
            sharding.check_accelerate_files(folder)
    assert not marker.exists()


def test_deepspeed_checkpoint_files_allow_its_plain_classes_only(tmp_path: Path) -> None:
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    folder = tmp_path / "accelerate"
    (folder / "pytorch_model").mkdir(parents=True)
    optim = folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    # What DeepSpeed 0.19 writes for ZeRO-1/2, in small.
    state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients, "partition_count": [2]}
    state["param_slice_mappings"] = [{"w": fragment_address(numel=4, start=0)}]
    torch.save({"optimizer_state_dict": state, "ds_version": deepspeed.__version__}, optim)
    torch.save({"module": {"w": torch.zeros(4)}}, folder / "pytorch_model" / "mp_rank_00_model_states.pt")
    (folder / "latest").write_text("pytorch_model")
    (folder / "zero_to_fp32.py").write_text("raise SystemExit('never run')\n")
    sharding.check_accelerate_files(folder)
    marker = tmp_path / "ran"
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for bad in (Payload(marker), DeepSpeedZeroConfig()):  # arbitrary code; a DeepSpeed class not allowed
        torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "x": bad}}, optim)
        with pytest.raises(UserError, match="optim_states.pt is unreadable or holds more than tensors"):
            sharding.check_accelerate_files(folder)
    assert not marker.exists()


# ---- FSDP --------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_and_resume_runs(tmp_path: Path) -> tuple[Path, Path]:
    """Write ``runs.json`` for tests/_sharded_cpu.py: a whole run, the same stopped after step 2 (inside the epoch)
    and its resume; returns the two run folders."""
    images = make_image_folder(tmp_path / "images", num_classes=3, per_class=6, size=32)
    flags = tiny_flags(tmp_path, images)
    flags[flags.index("--batch-size") + 1] = "3"  # 3 x 2 processes: 3 steps an epoch, as in one process
    flags[flags.index("--epochs") + 1] = "1"
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    runs = [
        ["finetune", *flags, "--out", str(whole)],
        ["finetune", *flags, "--max-steps", "2", "--out", str(parts)],
        ["finetune", "--resume", str(parts), "--num-workers", "0"],
    ]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    return whole, parts


@pytest.mark.slow
def test_fsdp_on_two_cpu_processes_stops_and_resumes_bit_identical(tmp_path: Path) -> None:
    whole, parts = stop_and_resume_runs(tmp_path)
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    cmd += [str(REPO / "tests" / "_sharded_cpu.py"), "fsdp", str(tmp_path / "runs.json")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_STATE_DICT_TYPE="SHARDED_STATE_DICT")
    env.update(FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP", FSDP_TRANSFORMER_CLS_TO_WRAP="Block")
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "at step 2 (epoch 1, batch 2)" in proc.stdout
    assert "sharded by FSDP2 SHARDED_STATE_DICT" in proc.stdout
    ckpt = checkpoints.find_checkpoint(parts)[1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["sharding"] == "FSDP2 SHARDED_STATE_DICT" and state["num_processes"] == 2
    # FSDP's shards through save_state (torch distributed checkpoints), beside the gathered full weights.
    saved = {str(p.relative_to(ckpt / "accelerate")) for p in (ckpt / "accelerate").rglob("*") if p.is_file()}
    assert {"pytorch_model_fsdp_0/.metadata", "optimizer_0/.metadata", "random_states_1.pkl"} <= saved
    assert_same_run(whole, parts, ranks=2)
    # eval and export read the gathered weights as they read those of any run.
    from mr2ft.evaluate import load_trained

    trained = load_trained(whole)
    weights = load_tensors(ckpt / "model.safetensors")
    assert torch.equal(trained.head.weight, weights["head.weight"])


# ---- DeepSpeed ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_deepspeed_zero_2_on_two_cpu_processes_stops_and_resumes_bit_identical(tmp_path: Path) -> None:
    pytest.importorskip("deepspeed")
    whole, parts = stop_and_resume_runs(tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port())]
    cmd += [str(REPO / "tests" / "_sharded_cpu.py"), "deepspeed", str(tmp_path / "runs.json")]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout and "at step 2 (epoch 1, batch 2)" in proc.stdout
    assert "sharded by DeepSpeed ZeRO-2" in proc.stdout
    ckpt = checkpoints.find_checkpoint(parts)[1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["sharding"] == "DeepSpeed ZeRO-2" and state["num_processes"] == 2
    saved = {str(p.relative_to(ckpt / "accelerate")) for p in (ckpt / "accelerate").rglob("*") if p.is_file()}
    assert {
        "pytorch_model/mp_rank_00_model_states.pt",
        "pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "random_states_1.pkl",
    } <= saved
    sharding.check_accelerate_files(ckpt / "accelerate")  # what DeepSpeed writes passes the allowlist
    assert_same_run(whole, parts, ranks=2)
    # Not measured under DeepSpeed (its backward hooks on the model's outputs): logged as null.
    assert all(r.get("rep_grad_share") is None for r in read_jsonl(whole / "metrics.jsonl") if "epoch" in r)
