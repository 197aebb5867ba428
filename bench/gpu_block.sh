#!/usr/bin/env bash
# Block-diffusion checks on a lent GPU (no downloads, under 8 minutes): the block engine's tokens/s
# at batch 1 / 8 / 32 and the block learner step (BGPO on the BD3-LM layout) at n_t 1 / 16, on a
# random-init SDAR-1.7B-shaped model (bench/gpu_block.py), plus the block tests on CUDA. Prints a table.
# Needs no Ray (learner.step and dlrl.weights import Ray only where they use it).
# Time budget (timeouts): tests 120 s + benchmark 300 s = 420 s, plus start-up.
# Usage (repo root): bash bench/gpu_block.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_sdar.py tests/test_block_mask.py \
    tests/test_block_engine.py 2>&1 | tail -5 | tee "$OUT/gpu_block_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 300 python bench/gpu_block.py --out "$OUT/gpu_block.json" 2>&1 | tee "$OUT/gpu_block.log"
bench_rc=${PIPESTATUS[0]}
echo "---------------------------------------------"
printf "%-28s %s\n" "block tests" "$([ $tests_rc -eq 0 ] && echo PASS || echo "FAIL rc=$tests_rc")"
printf "%-28s %s\n" "block benchmark (cuda)" "$([ $bench_rc -eq 0 ] && echo done || echo "FAIL rc=$bench_rc")"
exit $(( tests_rc || bench_rc ))
