#!/usr/bin/env bash
# Rollout speed on a lent GPU (no downloads, under 8 minutes): bench/rollout_speed.py with the tiny
# Sudoku start on CUDA and the per-step work of a random-init LLaDA-8B-shaped built-in model in
# bfloat16 (hidden 4096, 32 layers, vocabulary 126,464; about 8B parameters, 16 GB), prompt 128 +
# 256 / 512 generated, batch 1 / 8 / 32 / 64. Prints a table of tokens/s per engine.
# Usage (repo root): bash bench/gpu_rollout.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-bench/results}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 450 python bench/rollout_speed.py --device cuda --dtype bfloat16 --shape llada-8b \
    --batches 1 8 32 64 --gen-lengths 256 512 --repeats 2 \
    --out "$OUT/rollout_speed_gpu.json" 2>&1 | grep -v "Loading weights" | tee "$OUT/rollout_speed_gpu.log"
rc=${PIPESTATUS[0]}
[ $rc -eq 0 ] || { echo "rollout_speed.py failed rc=$rc"; exit $rc; }
python - "$OUT/rollout_speed_gpu.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["model_steps"]
print(f"{r['machine']['device']}: {m['shape']} {m['model']['params'] / 1e6:,.0f}M params, {m['dtype']}, "
      f"prompt {m['prompt_length']}, block {m['block_length']}; tokens/s (speedup over reference)")
engines = list(m["rows"][0]["tokens_per_s"])
print(f"{'gen':>4} {'batch':>5} " + " ".join(f"{e:>22}" for e in engines))
for row in m["rows"]:
    cells = [f"{row['tokens_per_s'][e]:10.1f} ({row['speedup_over_reference'][e]:5.1f}x)" for e in engines]
    peak = "".join(f"  {k.removesuffix('_peak_bytes')} {row[k] / 2**30:.1f} GiB"
                   for k in ("reference_step_peak_bytes", "cached_dual_step_peak_bytes") if k in row)
    print(f"{row['gen_length']:>4} {row['batch']:>5} " + " ".join(f"{c:>22}" for c in cells) + peak)
t = r["tiny_sudoku"]
print(f"tiny Sudoku: held-out reward reference {t['engines']['reference']['eval_reward']:.3f}, "
      f"{t['parallel_engine']} {t['engines'][t['parallel_engine']]['eval_reward']:.3f}; "
      f"rollout step {t['parallel_rollout_speedup']:.1f}x faster")
PY
