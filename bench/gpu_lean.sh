#!/usr/bin/env bash
# Issue 19 on a lent GPU (no downloads, one call, under 8 minutes on an H100/H200): bench/gpu_lean.py's
#   1. learner step MFU and peak memory, 1.6 B LLaDA shape (vocabulary 126,464), fp32 masters + bf16
#      autocast, before / after the masked-row ELBO head, n_t 1 / 16;
#   2. cached engine vs reference engine in bf16, batch 1 / 8 / 32: tokens/s and token agreement
#      (random-init LLaDA-8B shape, and the trained tiny Sudoku start);
#   3. weight sync bytes and seconds per version, fp32 vs bf16 (device-to-host; NCCL with >= 2 GPUs).
# Prints one table and writes one JSON (gpu_lean.json in OUT_DIR).
# Needs torch (CUDA), transformers, numpy, pydantic: no Ray (the learner and weight-sync
# modules import Ray only inside the functions that use it; nothing run here does), nothing to carry.
# Time budget: timeout 450 s for the benchmark, whose --budget-s 330 skips (and records as skipped)
# every row not started by then; plus start-up. Device call, e.g.:
#   run(command="bash bench/gpu_lean.sh $OUT", timeout_s=540)
# Usage (repo root): bash bench/gpu_lean.sh [OUT_DIR]   (default $OUT, else bench/results)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 450 python bench/gpu_lean.py --budget-s 330 --out "$OUT/gpu_lean.json" 2>&1 \
    | grep -v "Loading weights" | tee "$OUT/gpu_lean.log"
rc=${PIPESTATUS[0]}
[ $rc -eq 0 ] || echo "gpu_lean.py failed rc=$rc (124: timed out; see $OUT/gpu_lean.log)"
exit $rc
