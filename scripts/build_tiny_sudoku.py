"""Build the shipped starting checkpoint of the embedded default job: `builtin:tiny-sudoku`.

A 0.8M-parameter built-in masked-diffusion transformer (4 layers, d 128, character tokenizer)
trained with LLaDA's masked-diffusion SFT loss on 4x4 Sudoku demonstrations written by an
imperfect teacher: with probability `--teacher-accuracy` a demonstration is the true solution,
otherwise it is a sloppy "row fill" (each row's blanks get the row's missing digits in ascending
order, ignoring columns and boxes), which is right on only about half of the blank cells.

Why this start. Puzzles are plentiful (a pool of `--pool` distinct train-split puzzles), so the
SFT plateau is set by the teacher, not by the amount of data: the model learns both ways of
filling a grid, greedy decoding follows the teacher's more frequent one, and more SFT only
imitates the same mixture more closely (the script keeps training to `--steps-after` to record
that plateau in `sft_curve.json`). Only a verifier tells the two modes apart, so whatever the RL
job gains on the held-out test-split grids (never seen here) is RL's own. This mirrors a
pre-trained LM whose data mixes right and wrong solutions.

An earlier recipe, SFT on only 32 correct demonstrations, also plateaued (at 0.53) but left a
policy whose rollouts barely correlate with what the verifier rewards: independent BGPO batch
gradients were nearly orthogonal and 300 CPU steps gained +0.035.

Deterministic for a given seed on the CPU.

    python scripts/build_tiny_sudoku.py            # writes dlrl/assets/tiny-sudoku (about 4 min)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl.decoding import Decoding  # noqa: E402
from dlrl.models import build_tiny, save_checkpoint, special_ids  # noqa: E402
from dlrl.tasks import get_task  # noqa: E402
from dlrl.tasks.sudoku import BLANK, DIGITS, SIDE, rows  # noqa: E402
from dlrl.tasks.task import Example  # noqa: E402
from learner.sft import sft_loss  # noqa: E402
from rollout.completion import encode_prompt, evaluate, left_pad  # noqa: E402
from rollout.engines import make_engine  # noqa: E402
from rollout.completion import EVAL_SEED  # noqa: E402

GEN_LENGTH = 20  # 19 characters of solution + EOS


def row_fill(puzzle: str) -> str:
    """The sloppy teacher's grid: each row's blanks, left to right, get the digits missing from
    that row in ascending order. Right whenever a row has one blank; columns and boxes ignored."""
    cells = list(puzzle)
    for r in range(SIDE):
        row = cells[r * SIDE:(r + 1) * SIDE]
        missing = iter(sorted(set(DIGITS) - set(row)))
        for c in range(SIDE):
            if row[c] == BLANK:
                cells[r * SIDE + c] = next(missing)
    return "".join(cells)


def demonstration(ex: Example, accuracy: float, rng: random.Random) -> str:
    """The teacher's compact answer for `ex`: the solution with probability `accuracy`."""
    grid = ex.answer["solution"] if rng.random() < accuracy else row_fill(ex.question["puzzle"])
    return "\n".join(rows(grid))


def encode_sft(tokenizer, task, examples, answers, ids):
    prompts = [encode_prompt(tokenizer, task, ex, "compact") for ex in examples]
    targets = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    prompt_ids, attn = left_pad(prompts, ids.pad_id)
    response = torch.full((len(examples), GEN_LENGTH), ids.eos_ids[0])
    for i, t in enumerate(targets):
        response[i, :len(t)] = torch.tensor(t)
    tokens = torch.cat([prompt_ids, response], 1)
    attention = torch.cat([attn, torch.ones_like(response)], 1)
    return tokens, attention, prompt_ids.shape[1]


def add_sft_arguments(p: argparse.ArgumentParser, *, out: Path, steps: int, steps_after: int, lr: float,
                      teacher_accuracy: float = 0.4, eval_every: int = 50) -> None:
    """The recipe flags both tiny builds share (teacher, data, SFT schedule, evaluation), with each
    build's own defaults for where it writes and how long and fast it trains."""
    p.add_argument("--out", default=str(out))
    p.add_argument("--teacher-accuracy", type=float, default=teacher_accuracy,
                   help="probability that a demonstration is the true solution (else a row fill)")
    p.add_argument("--pool", type=int, default=4000, help="distinct train-split puzzles demonstrated")
    p.add_argument("--steps", type=int, default=steps, help="SFT steps before saving")
    p.add_argument("--steps-after", type=int, default=steps_after,
                   help="keep training to here, only to record the curve")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--seed", type=int, default=0)


def parse_sft_arguments(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if not 0.0 <= args.teacher_accuracy <= 1.0:
        p.error("--teacher-accuracy must be in [0, 1]")
    return args


def teacher_rewards(task, held_out, accuracy: float) -> tuple[float, float]:
    """The teacher's expected held-out reward and that of a row fill alone (printed, and recorded
    in sft_curve.json as the plateau the SFT start is measured against)."""
    row_fill_reward = sum(task.score("\n".join(rows(row_fill(ex.question["puzzle"]))), ex)
                          for ex in held_out) / len(held_out)
    teacher_reward = accuracy + (1 - accuracy) * row_fill_reward  # its expectation
    print(f"teacher on the held-out puzzles: {teacher_reward:.3f} (row fill alone {row_fill_reward:.3f})")
    return teacher_reward, row_fill_reward


def train_sft(model, tokenizer, ids, task, pool, held_out, engine, decoding: Decoding, *, steps: int,
              steps_after: int, lr: float, batch: int, eval_every: int, seed: int, teacher_accuracy: float,
              out: Path, snapshots: Path | None = None) -> list[dict]:
    """SFT `model` on the teacher's demonstrations of `pool` (AdamW, the family's `sft_loss`),
    evaluating greedily on `held_out` every `eval_every` steps; saves the checkpoint at step `steps`
    into `out` and keeps training to `steps_after` only to record the curve (returned). With
    `snapshots`, each evaluated step is also saved as snapshots/step_N, with the curve so far in
    snapshots/curve.json, so one long run can pick the saved step. Shared by the masked-diffusion
    build (this script) and the block-diffusion one (build_tiny_sudoku_block.py)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    teacher = random.Random(f"teacher:{seed}")
    curve, t0 = [], time.time()
    for step in range(steps_after + 1):
        if step % eval_every == 0:
            ev = evaluate(engine, tokenizer, task, held_out, decoding, 128, "compact")
            curve.append({"step": step, "eval_reward": ev["eval_reward"], "eval_solved": ev["eval_solved"]})
            print(f"sft step {step:5d}  held-out reward {ev['eval_reward']:.3f}  solved {ev['eval_solved']:.2f}"
                  f"  ({time.time() - t0:.0f}s)", flush=True)
            if snapshots is not None:
                save_checkpoint(model, tokenizer, snapshots / f"step_{step}")
                (snapshots / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
        if step == steps:
            shutil.rmtree(out, ignore_errors=True)
            save_checkpoint(model, tokenizer, out)
        if step == steps_after:
            break
        examples = [pool[i] for i in torch.randint(len(pool), (batch,), generator=gen).tolist()]
        answers = [demonstration(ex, teacher_accuracy, teacher) for ex in examples]
        tokens, attention, prompt_len = encode_sft(tokenizer, task, examples, answers, ids)
        loss = sft_loss(model, tokens, attention, prompt_len, ids.mask_id, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sft_arguments(p, out=ROOT / "dlrl/assets/tiny-sudoku", steps=1200, steps_after=1600, lr=1e-3)
    args = parse_sft_arguments(p)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    task = get_task("sudoku")
    model, tokenizer = build_tiny(seed=args.seed)
    ids = special_ids(model, tokenizer)
    pool = task.examples("train", args.pool, args.seed)
    held_out = task.examples("test", args.eval_size, EVAL_SEED)
    teacher_reward, row_fill_reward = teacher_rewards(task, held_out, args.teacher_accuracy)
    decoding = Decoding(gen_length=GEN_LENGTH, block_length=GEN_LENGTH, steps=GEN_LENGTH)
    engine = make_engine(decoding, model, ids)
    curve = train_sft(model, tokenizer, ids, task, pool, held_out, engine, decoding, steps=args.steps,
                      steps_after=args.steps_after, lr=args.lr, batch=args.batch, eval_every=args.eval_every,
                      seed=args.seed, teacher_accuracy=args.teacher_accuracy, out=Path(args.out))
    record = {
        "recipe": {k: v for k, v in vars(args).items() if k != "out"},
        "teacher": {"held_out_reward": teacher_reward, "row_fill_held_out_reward": row_fill_reward},
        "saved_at_step": args.steps,
        "saved_eval_reward": next(c["eval_reward"] for c in curve if c["step"] == args.steps),
        "eval": {"split": "test", "n": args.eval_size, "seed": EVAL_SEED, "steps": GEN_LENGTH, "greedy": True},
        "curve": curve,
        "torch": torch.__version__,
    }
    (Path(args.out) / "sft_curve.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"saved {args.out} at step {args.steps} (held-out {record['saved_eval_reward']:.3f})")


if __name__ == "__main__":
    main()
