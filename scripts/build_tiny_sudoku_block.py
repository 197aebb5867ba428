"""Build the shipped starting checkpoint of the tiny block-diffusion job: `builtin:tiny-sudoku-block`.

The block-diffusion twin of `builtin:tiny-sudoku` (scripts/build_tiny_sudoku.py, whose teacher,
data and prompt encoding this reuses): a real SDAR-family checkpoint (`SDARForCausalLM`, the
Qwen3 body, block-causal, `dlrl.models.build_tiny_sdar`) with the same character tokenizer, about
0.75M parameters, trained with SDAR's block-diffusion SFT loss on the BD3-LM [noisy ; clean]
layout (`learner.sft.sft_loss` dispatches on the family: Bernoulli(p) masks,
p = (1 - 1e-3) t + 1e-3, CE / p) on 4x4 Sudoku demonstrations written by the same imperfect
teacher (the true solution with probability `--teacher-accuracy`, else a row fill).

What the shipped start is (sft_curve.json): block size 16 (one of SDAR's published block sizes:
4 by default, 8/16/32/64 variants) and the LLaDA build's teacher, 0.4 (held-out 0.70), saved at
the end of 3000 SFT steps at lr 2e-3 (batch 64): held-out greedy 0.48-0.60 from step 800 on,
a flat 0.53-0.57 from step 1600, 0.545 at the end. Saving at the end is the rule fixed before
any RL from it.

Why block 16 and not SDAR's default 4. The 20-token answer (19 characters + EOS) follows a
20-token prompt; on the global block grid, block 16 puts prompt tokens 16-19 and answer tokens
0-11 (rows 1-3) in one mixed block and answer tokens 12-19 in the last, partial block, so the
model fills rows 1-3 in its own confidence order and row 4 after them. With block 4 every row is
committed before any later row is seen, and this body learnt less from the same teacher: at
teacher 0.4 its greedy plateau was 0.50-0.53 with best-of-16 0.68-0.74, and RL from it ended at
0.63-0.69; the block-4 starts with more skill (teacher 0.5 or 0.6) start higher (0.62-0.64),
and no block-4 start gained +0.15 within 10 minutes (bench/results/tiny_sudoku_block.json,
`block4_start`).

`--snapshots DIR` also saves every evaluated step (DIR/step_N) to study one run; saving them
does not change the weights. The loop is build_tiny_sudoku.train_sft, shared with the LLaDA
build. Puzzles are plentiful (a pool of distinct train-split puzzles) and the held-out test-split
grids are never seen here.

The held-out evaluation during SFT decodes greedily with the block engine, one token per step
(steps = block size), low-confidence static remasking (the job's own evaluation decodes with its
rollout rule, dynamic threshold 0.9, and records the start under it at step 0).

Deterministic for a given seed on the CPU.

    python scripts/build_tiny_sudoku_block.py      # writes dlrl/assets/tiny-sudoku-block
                                                   # (28 min on 2 cores, 1 thread)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from build_tiny_sudoku import GEN_LENGTH, add_sft_arguments, parse_sft_arguments, teacher_rewards, train_sft  # noqa: E402

from dlrl.decoding import Decoding  # noqa: E402
from dlrl.models import build_tiny_sdar, special_ids  # noqa: E402
from dlrl.models.families import model_family  # noqa: E402
from dlrl.tasks import get_task  # noqa: E402
from rollout.engines import make_engine  # noqa: E402
from rollout.completion import EVAL_SEED  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_arguments(p, out=ROOT / "dlrl/assets/tiny-sudoku-block", steps=3000, steps_after=3000, lr=2e-3,
                      teacher_accuracy=0.4, eval_every=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--snapshots", default=None,
                   help="also save a checkpoint at each evaluation into DIR/step_N (and the curve so far into "
                        "DIR/curve.json), to pick the saved step from one long run")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: a shared, loaded machine stalls multi-threaded ops)")
    args = parse_sft_arguments(p)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task = get_task("sudoku")
    model, tokenizer = build_tiny_sdar(hidden=args.hidden, layers=args.layers, heads=args.heads,
                                       kv_heads=args.kv_heads, block_size=args.block_size, seed=args.seed)
    print(f"SDAR tiny: {sum(p.numel() for p in model.parameters()):,} parameters, block {args.block_size}")
    ids = special_ids(model, tokenizer)
    pool = task.examples("train", args.pool, args.seed)
    held_out = task.examples("test", args.eval_size, EVAL_SEED)
    teacher_reward, row_fill_reward = teacher_rewards(task, held_out, args.teacher_accuracy)
    decoding = Decoding(engine="block", gen_length=GEN_LENGTH, block_length=args.block_size,
                        steps=args.block_size, block_remasking="low_confidence_static")
    engine = make_engine(decoding, model, ids)
    t0 = time.time()
    curve = train_sft(model, tokenizer, ids, task, pool, held_out, engine, decoding, steps=args.steps,
                      steps_after=args.steps_after, lr=args.lr, batch=args.batch, eval_every=args.eval_every,
                      seed=args.seed, teacher_accuracy=args.teacher_accuracy, out=Path(args.out),
                      snapshots=Path(args.snapshots) if args.snapshots else None)
    record = {
        "recipe": {k: v for k, v in vars(args).items() if k not in ("out", "snapshots")},
        "family": model_family(model).name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "loss": "SDAR block-diffusion SFT (BD3-LM [noisy; clean], Bernoulli(p) masks, CE/p); learner.sft",
        "teacher": {"held_out_reward": teacher_reward, "row_fill_held_out_reward": row_fill_reward},
        "saved_at_step": args.steps,
        "saved_eval_reward": next(c["eval_reward"] for c in curve if c["step"] == args.steps),
        "eval": {"split": "test", "n": args.eval_size, "seed": EVAL_SEED, "engine": "block",
                 "block_length": args.block_size, "steps_per_block": args.block_size,
                 "block_remasking": "low_confidence_static", "greedy": True},
        "curve": curve,
        "seconds": round(time.time() - t0),
        "torch": torch.__version__,
    }
    (Path(args.out) / "sft_curve.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {args.out} at step {args.steps} (held-out {record['saved_eval_reward']:.3f})")


if __name__ == "__main__":
    main()
