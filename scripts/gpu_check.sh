#!/usr/bin/env bash
# The one prepared device check, for a machine with a CUDA GPU: the GPU tests (bf16/fp16 autocast, multi-worker
# loading; a bf16 fine-tune with workers, --compile, --grad-checkpointing, --channels-last, --model-ema and a
# TensorBoard tracker, stopped and resumed), GPU throughput of the probe and fine-tune benchmarks, and the speed and
# memory switches' table (benchmarks/finetune_switches.py). Logs go to ${OUT:-gpu-check}/. (No FSDP run yet: the
# checkpoints do not go through accelerator.save_state.)
#   bash scripts/gpu_check.sh            (after `make setup`, or with PYTHON pointing at an environment with mr2ft)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
export PYTHONUNBUFFERED=1
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
    | tee "$out/device.txt" || exit 1
"$py" -m pytest -q -m gpu tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.txt"
"$py" benchmarks/finetune_throughput.py --model vit_small_patch16_224 --image-size 224 --batch-size 128 \
    --per-class 64 --num-workers 8 --repeats 4 --mixed-precision bf16 2>&1 | tee "$out/finetune_throughput_gpu.txt"
"$py" benchmarks/probe_cost.py --model resnet50 --size 224 --per-class 100 --batch 256 --workers 8 2>&1 \
    | tee "$out/probe_cost_gpu.txt"
"$py" benchmarks/finetune_switches.py --device cuda --model vit_base_patch16_224 --batch-size 64 --steps 10 2>&1 \
    | tee "$out/finetune_switches_gpu.txt"
