#!/usr/bin/env bash
# The tutorial recipe on real CIFAR-10, timed: reproduces the 60-minute tutorial's ~53% (JPEG copy) / ~54%.
#   bash bench/tutorial.sh [DATA_ROOT]      (DATA_ROOT holds cifar-10-batches-py/; default ./data)
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-./data}
out=bench/results/tutorial-$(date +%Y%m%d-%H%M%S)
OMP_NUM_THREADS=1 python train.py --config configs/tutorial.yaml "data.root=$root" data.download=false \
    "output_dir=$out" wandb.mode=disabled
python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"tutorial: {s['final_test_acc']:.2f}% test accuracy, \
{s['train_seconds']:.0f} s training, {s['images_per_sec']:.0f} images/s\")" "$out/summary.json"
