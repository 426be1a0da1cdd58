"""Run ``mr2ft`` commands on CPU processes under FSDP2 or DeepSpeed ZeRO-1/2 (tests only): ``accelerate launch
--multi_gpu ... tests/_sharded_cpu.py fsdp RUNS.json`` or ``torchrun --nproc_per_node N tests/_sharded_cpu.py
deepspeed RUNS.json`` runs each argument list of RUNS.json in turn, in the same processes.

Both start from Accelerate's own gloo process group (``PartialState(cpu=True)``, ``MULTI_CPU``); the rest (the plugin
from the environment, prepare, save_state, load_state, get_state_dict) is Accelerate's, torch's or DeepSpeed's and
mr2ft's own code.

- FSDP: Accelerate turns FSDP on only on accelerators (with ``ACCELERATE_USE_CPU=1`` ``ACCELERATE_USE_FSDP`` is
  ignored: plain data parallel, no error), while torch's FSDP2 (``fully_shard``) itself runs on CPU with gloo; so the
  process state is told it is on GPUs before each run makes its Accelerator.
- DeepSpeed: on CPUs without ``cpu=True`` Accelerate sees no backend and DeepSpeed builds its own gloo group behind
  it (Accelerate then counts 1 process and DeepSpeed's batch check fails); with Accelerate's group made first,
  DeepSpeed (CPU accelerator, gloo) joins it.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType


def main(kind: str, runs_file: str) -> None:
    from mr2ft.cli import app

    if kind == "deepspeed":  # DeepSpeed's CPU all-reduce over shared memory is a C++ op compiled on first use (most
        # of a minute on 2 cores, on every fresh machine); gloo, which it otherwise uses, does the same reduction
        import importlib

        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # (deepspeed.comm.torch is torch)
    state = PartialState(cpu=True)  # the gloo process group
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    # Each run ends with accelerator.end_training(), which ends the process group: keep it for the next run.
    PartialState.destroy_process_group = lambda self, group=None: None
    with open(runs_file) as fh:
        runs = json.load(fh)
    for args in runs:
        if kind == "fsdp":  # AcceleratorState then takes FSDP from the environment
            state.distributed_type = DistributedType.MULTI_GPU
        code = app(args, standalone_mode=False)  # the CLI's exit code (None: success)
        if code:
            sys.exit(code)
        print(f"_sharded_cpu: done {args[-1]}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
