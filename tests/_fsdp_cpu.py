"""Run ``mr2ft`` commands under FSDP2 on CPU processes: ``accelerate launch --multi_gpu ... tests/_fsdp_cpu.py
RUNS.json`` runs each argument list of RUNS.json in turn, in the same processes (tests only).

Accelerate turns FSDP on only on accelerators: with ``ACCELERATE_USE_CPU=1`` its gloo processes are ``MULTI_CPU``
and ``ACCELERATE_USE_FSDP`` is ignored (plain data parallel, no error). torch's FSDP2 (``fully_shard``) itself runs on
CPU with gloo, so this script tells Accelerate's process state that it is on GPUs before mr2ft makes its
Accelerator; the rest (the plugin from the ``FSDP_*`` environment, prepare, save_state, load_state,
get_state_dict) is Accelerate's and mr2ft's own code.
"""

from __future__ import annotations

import json
import sys

import torch
from accelerate import PartialState
from accelerate.utils import DistributedType


def main(runs_file: str) -> None:
    from mr2ft.cli import app

    state = PartialState(cpu=True)  # the gloo process group
    assert state.distributed_type == DistributedType.MULTI_CPU, state.distributed_type
    # Each run ends with accelerator.end_training(), which ends the process group: keep it for the next run.
    PartialState.destroy_process_group = lambda self, group=None: None
    with open(runs_file) as fh:
        runs = json.load(fh)
    for args in runs:
        state.distributed_type = DistributedType.MULTI_GPU  # AcceleratorState then takes FSDP from the environment
        code = app(args, standalone_mode=False)  # the CLI's exit code (None: success)
        if code:
            sys.exit(code)
        print(f"_fsdp_cpu: done {args[-1]}", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
