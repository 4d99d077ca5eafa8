#!/usr/bin/env bash
# Every benchmark table in the README, in one command, with the README's sizes: training, where
# its CPU goes and its start-up against a plain PyTorch script, decode-bound and compute-bound inference and where its CPU goes,
# compression (int8, pruning, distillation), per-worker memory under DDP and FSDP, and the GPU
# script when torch sees a CUDA GPU. Results go to bench/results/ (the files the README cites).
#
#   bash bench/run_all.sh            # the README's figures
#   bash bench/run_all.sh --quick    # tiny sizes, results in a temp dir: checks that all of it runs (~4 min, and ~7 min
#                                    # more for compress_bench, which trains a ResNet-18 for an epoch)
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results
if [ "${1:-}" = "--quick" ]; then
    out=$(mktemp -d -t raycv-bench-XXXXXX)
    python bench/train_bench.py --epochs 2 --json "$out/train.json"
    python bench/train_cpu.py --epochs 2 --reps 1 --json "$out/train_cpu.json"
    python bench/train_startup.py --epochs 1 --rounds 1 --json "$out/train_startup.json"
    python bench/infer_bench.py --images 16 --scale 2 --size 32 --json "$out/infer_64.json"
    python bench/infer_cpu.py --images 16 --size 32 --json "$out/infer_cpu.json"
    python bench/layout_bench.py --rounds 1 --steps 1 --json "$out/layout.json"
    python bench/scale_bench.py --rows 300 --folder 50 --work "$out/scale-work" --json "$out/scale.json"
    python bench/gpu_bench.py --smoke --json "$out/gpu.json"
    python bench/compress_bench.py --epochs 1 --json "$out/compress.json"
    python bench/memory_bench.py --sizes "ViT-Ti/4 (32 px)" --steps 1 --json "$out/memory.json"
else
    python bench/train_bench.py --epochs 4 --json "$out/train.json"
    python bench/train_cpu.py --epochs 6 --reps 3 --json "$out/train_cpu.json"
    python bench/train_startup.py --epochs 10 --rounds 2 --json "$out/train_startup.json"
    python bench/infer_bench.py --images 600 --scale 10 --size 64 --json "$out/infer_64.json"
    python bench/infer_bench.py --images 200 --scale 10 --size 224 --json "$out/infer_224.json"
    python bench/infer_cpu.py --images 600 --size 224 --json "$out/infer_cpu.json"
    python bench/layout_bench.py --rounds 2 --json "$out/layout.json"
    python bench/scale_bench.py --rows 20000,500000 --folder 100000 --json "$out/scale.json"
    python bench/compress_bench.py --epochs 6 --json "$out/compress.json"
    python bench/memory_bench.py --steps 5 --json "$out/memory.json"
    if python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        python bench/gpu_bench.py --seconds 60 --images 5000 --json "$out/gpu.json"
    fi
fi
echo "results: $out"
