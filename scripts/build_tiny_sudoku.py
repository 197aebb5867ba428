"""Build the shipped starting checkpoint of the embedded default job: `builtin:tiny-sudoku`.

A 0.8M-parameter built-in masked-diffusion transformer (4 layers, d 128, character tokenizer)
trained with LLaDA's masked-diffusion SFT loss on only `--demos` solved 4x4 Sudoku puzzles.
With so few demonstrations SFT reaches a plateau on held-out puzzles well below what the task
allows (more SFT no longer helps; it starts to overfit), which is the point: whatever the RL
job gains from this start is RL's own, learnt from the verifier on prompts without solutions.

The script trains `--steps` SFT steps, saves the checkpoint, then keeps training to
`--steps-after` to record that further SFT does not help; the whole held-out curve is written to
`sft_curve.json` beside the weights. Deterministic for a given seed on the CPU.

    python scripts/build_tiny_sudoku.py            # writes dlrl/assets/tiny-sudoku (about 4 min)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl.models import build_tiny, save_checkpoint, special_ids  # noqa: E402
from dlrl.tasks import get_task  # noqa: E402
from learner.sft import sft_loss  # noqa: E402
from rollout.completion import SamplingParams, encode_prompt, evaluate, left_pad  # noqa: E402
from rollout.worker import EVAL_SEED  # noqa: E402

GEN_LENGTH = 20  # 19 characters of solution + EOS



def encode_sft(tokenizer, task, examples, ids):
    prompts = [encode_prompt(tokenizer, task, ex, "compact") for ex in examples]
    targets = [tokenizer(task.target(ex, "compact"), add_special_tokens=False)["input_ids"] for ex in examples]
    prompt_ids, attn = left_pad(prompts, ids.pad_id)
    response = torch.full((len(examples), GEN_LENGTH), ids.eos_ids[0])
    for i, t in enumerate(targets):
        response[i, :len(t)] = torch.tensor(t)
    tokens = torch.cat([prompt_ids, response], 1)
    attention = torch.cat([attn, torch.ones_like(response)], 1)
    return tokens, attention, prompt_ids.shape[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "dlrl/assets/tiny-sudoku"))
    p.add_argument("--demos", type=int, default=32, help="solved puzzles SFT may see")
    p.add_argument("--steps", type=int, default=600, help="SFT steps before saving")
    p.add_argument("--steps-after", type=int, default=1200, help="keep training to here, only to record the curve")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--eval-size", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    task = get_task("sudoku")
    model, tokenizer = build_tiny(seed=args.seed)
    ids = special_ids(model, tokenizer)
    demos = task.examples("train", args.demos, args.seed)
    held_out = task.examples("test", args.eval_size, EVAL_SEED)
    params = SamplingParams(gen_length=GEN_LENGTH, block_length=GEN_LENGTH, steps=GEN_LENGTH, batch_size=128)
    tokens, attention, prompt_len = encode_sft(tokenizer, task, demos, ids)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(args.seed)
    curve, t0 = [], time.time()
    for step in range(args.steps_after + 1):
        if step % args.eval_every == 0:
            ev = evaluate(model, tokenizer, task, held_out, ids, params, "compact")
            curve.append({"step": step, "eval_reward": ev["eval_reward"], "eval_solved": ev["eval_solved"]})
            print(f"sft step {step:5d}  held-out reward {ev['eval_reward']:.3f}  solved {ev['eval_solved']:.2f}"
                  f"  ({time.time() - t0:.0f}s)", flush=True)
        if step == args.steps:
            out = Path(args.out)
            shutil.rmtree(out, ignore_errors=True)
            save_checkpoint(model, tokenizer, out)
        if step == args.steps_after:
            break
        rows = torch.randint(len(demos), (args.batch,), generator=gen)
        loss = sft_loss(model, tokens[rows], attention[rows], prompt_len, ids.mask_id, gen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    record = {
        "recipe": {k: v for k, v in vars(args).items() if k != "out"},
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
