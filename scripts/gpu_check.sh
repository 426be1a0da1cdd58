#!/usr/bin/env bash
# The one prepared device check, for a machine with a CUDA GPU. It runs, each with its log in ${OUT:-gpu-check}/:
#   bf16-switches   a bf16 fine-tune with 2 DataLoader workers, --compile, --grad-checkpointing, --channels-last,
#                   --model-ema and a TensorBoard tracker, stopped by --max-steps and resumed (tests/test_gpu.py)
#   fsdp-1gpu       an FSDP2 fine-tune on one GPU (accelerate launch --use_fsdp, bf16, 2 workers), stopped and
#                   resumed through accelerator.save_state / load_state (tests/test_gpu.py)
#   gpu-tests       the other GPU tests: bf16 features against fp32, bf16 and fp16 fine-tunes with 4 workers
#   throughput      benchmarks/finetune_throughput.py in bf16 (ViT-S/16 at 224 px, 8 workers)
#   probe-cost      benchmarks/probe_cost.py (ResNet-50 at 224 px)
#   switches        benchmarks/finetune_switches.py (speed and memory of each switch, ViT-B/16)
# and prints one table: each check, ok or FAILED, its seconds and its headline line.
#   bash scripts/gpu_check.sh            (after `make setup`, or with PYTHON pointing at an environment with mr2ft)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
py="${PYTHON:-.venv/bin/python}"
export PYTHONUNBUFFERED=1
rows=()

# check NAME HEADLINE COMMAND...: run COMMAND, its output in $out/NAME.txt; HEADLINE, an awk program, picks from it
# the table's headline (by default the last line that matches it).
last() { echo "/$1/ { l = \$0 } END { print l }"; }
check() {
    local name="$1" headline="$2" start=$SECONDS status detail
    shift 2
    echo "== $name: $*"
    if "$@" >"$out/$name.txt" 2>&1; then status=ok; else status="FAILED ($?)"; fi
    detail="$(awk "$headline" "$out/$name.txt" | sed 's/^ *//' | cut -c1-100)"
    rows+=("$name|$status|$((SECONDS - start))|$detail")
}

check device "$(last .)" "$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.__version__, torch.cuda.get_device_name(0))"
if [[ "${rows[0]}" != device\|ok* ]]; then
    cat "$out/device.txt"
    exit 1
fi
tests=(-m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py)
check bf16-switches "$(last 'passed|failed|error')" "$py" "${tests[@]}" -k compile_grad_checkpointing
check fsdp-1gpu "$(last 'passed|failed|error')" "$py" "${tests[@]}" -k fsdp
check gpu-tests "$(last 'passed|failed|error')" "$py" "${tests[@]}" -k "not compile_grad_checkpointing and not fsdp"
speed='$1 == "mr2" { s = "MR2 " $2 " images/s" } /MR2 step time/ { t = $0 } END { print s ";" t }'
check throughput "$speed" "$py" benchmarks/finetune_throughput.py --model vit_small_patch16_224 \
    --image-size 224 --batch-size 128 --per-class 64 --num-workers 8 --repeats 4 --mixed-precision bf16
check probe-cost "$(last 'whole probe')" "$py" benchmarks/probe_cost.py --model resnet50 --size 224 --per-class 100 \
    --batch 256 --workers 8
check switches "$(last .)" "$py" benchmarks/finetune_switches.py --model vit_base_patch16_224 --batch-size 64 \
    --steps 16 --repeats 2 --num-workers 6 --mixed-precision bf16 --raw "$out/finetune_switches_gpu_steps.json"

{
    printf '%-14s | %-11s | %7s | %s\n' check result seconds "headline (log: $out/CHECK.txt)"
    printf '%s\n' "---------------+-------------+---------+------------------------------------------------------------"
    for row in "${rows[@]}"; do
        IFS='|' read -r name status seconds detail <<<"$row"
        printf '%-14s | %-11s | %7s | %s\n' "$name" "$status" "$seconds" "$detail"
    done
} | tee "$out/summary.txt"
! grep -q FAILED "$out/summary.txt"
