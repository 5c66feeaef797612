#!/usr/bin/env bash
# The CUDA path in one short script, for a lent GPU: nccl, bf16, the KD step with the teacher resident and offloaded,
# tokens/s, MFU and the allocator's peak memory; then a 2-step end-to-end run on the tiny models.
#   bash bench/gpu_check.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out/gpu}
mkdir -p "$out"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
common="--nproc 1 --param_dtype bf16 --seq 4096 --batch 2 --student_hidden 1024 --student_layers 8 --teacher_hidden 2048 --teacher_layers 12 --vocab 151936 --steps 5"
python bench/step_bench.py $common | tee "$out/step_resident.txt"
python bench/step_bench.py $common --teacher_offload | tee "$out/step_offload.txt"
