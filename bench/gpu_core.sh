#!/usr/bin/env bash
# GPU checks of the learning core, for a lent GPU machine (no downloads, under 8 minutes):
# the gpu-marked tests, the memory benchmark on CUDA with a larger model, and the learner
# benchmark (step time, MFU, peak memory, weight transfer of a 1.6 B LLaDA shape). Prints a table.
# Time budget (timeouts): tests 140 s + memory 120 s + learner 190 s = 450 s, plus start-up.
# Usage (repo root): bash bench/gpu_core.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 140 python -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_gpu.py tests/test_models.py tests/test_sampler.py 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
timeout 120 python bench/memory.py --device cuda --hidden 1024 --layers 8 --heads 16 --vocab 32000 \
    --batch 4 --prompt-len 256 --gen-len 256 --out "$OUT/memory_cuda.json" 2>&1 | tee "$OUT/memory_cuda.log"
bench_rc=${PIPESTATUS[0]}
# rows not started within --budget-s are recorded as skipped, so the JSON is always written
timeout 190 python bench/gpu_learner.py --budget-s 110 --out "$OUT/gpu_learner.json" 2>&1 | tee "$OUT/gpu_learner.log"
learner_rc=${PIPESTATUS[0]}
echo "---------------------------------------------"
printf "%-28s %s\n" "gpu tests (pytest -m gpu)" "$([ $tests_rc -eq 0 ] && echo PASS || echo "FAIL rc=$tests_rc")"
printf "%-28s %s\n" "memory benchmark (cuda)" "$([ $bench_rc -eq 0 ] && echo done || echo "FAIL rc=$bench_rc")"
printf "%-28s %s\n" "learner benchmark (cuda)" "$([ $learner_rc -eq 0 ] && echo done || echo "FAIL rc=$learner_rc")"
grep -E "growth" "$OUT/memory_cuda.log" || true
sed -n '/ TFLOP\/s$/,/^wrote /p' "$OUT/gpu_learner.log" || true
exit $(( tests_rc || bench_rc || learner_rc ))
