#!/usr/bin/env bash
# The one prepared device check, for a machine with a CUDA GPU: the GPU tests (bf16/fp16 autocast, multi-worker
# loading) and GPU throughput of the probe and fine-tune benchmarks. Logs go to ${OUT:-gpu-check}/.
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
