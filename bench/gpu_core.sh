#!/usr/bin/env bash
# GPU checks of the learning core, for a lent GPU machine (no downloads, under 8 minutes):
# the gpu-marked tests, then the memory benchmark on CUDA with a larger model. Prints a table.
# Usage (repo root): bash bench/gpu_core.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 240 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu.py tests/test_models.py tests/test_sampler.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 300 python bench/memory.py --device cuda --hidden 1024 --layers 8 --heads 16 --vocab 32000 \
    --batch 4 --prompt-len 256 --gen-len 256 --out "$OUT/memory_cuda.json" 2>&1 | tee "$OUT/memory_cuda.log"
bench_rc=${PIPESTATUS[0]}
echo "---------------------------------------------"
printf "%-28s %s\n" "gpu tests (pytest -m gpu)" "$([ $tests_rc -eq 0 ] && echo PASS || echo "FAIL rc=$tests_rc")"
printf "%-28s %s\n" "memory benchmark (cuda)" "$([ $bench_rc -eq 0 ] && echo done || echo "FAIL rc=$bench_rc")"
grep -E "growth" "$OUT/memory_cuda.log" || true
exit $(( tests_rc || bench_rc ))
