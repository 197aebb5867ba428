"""The block ELBO's learner step on the whole BD3-LM layout and on the cropped one, side by side.

BEFORE forwards the whole published layout [x_t ; x_0], 2T columns (dlrl/block_elbo.py at 1e092e8:
`bd3_columns` patched to keep every column). AFTER is the layout as it is now: cropped to the
noisy columns from the block that holds the first response token and the clean columns before
the last block (`dlrl.block_elbo.bd3_columns`), which gives the same logits at every response
position (tests/test_block_elbo.py). Both run the learner's real step, `accumulate_gradients`
(BGPO's forward + backward, chunk by chunk), on the same model and batch:
  - `tiny-sudoku-block`: the shipped checkpoint at its job's step (deploy/jobs/tiny-sudoku-block.toml:
    128 completions of a 20-token prompt and 20-token answer, block 16, n_mc 2, mc_chunk 1);
  - `sdar-shaped`: a random SDAR-family body (hidden 256, 2 layers) on a math job's proportions
    (a 256-token prompt, 256-token response, block 4, as the TraDo/DiRL recipes), 4 completions.
Measured: the step's median wall time, the peak bytes of live tensors during it (torch's profiler,
as bench/activation_memory.py counts them), the columns forwarded, and the gradient difference.

    python bench/bd3_crop.py            # writes bench/results/bd3_crop.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.activation_memory import profile_step, run_header  # noqa: E402
from dlrl.batch import TrainBatch, collate_for  # noqa: E402
from dlrl.block_elbo import bd3_columns, block_size_of  # noqa: E402
from dlrl.config import TrainSpec  # noqa: E402
from dlrl.models import build_tiny_sdar, load_model, special_ids  # noqa: E402
from dlrl.models.families import model_family  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from learner.step import accumulate_gradients, old_policy_terms  # noqa: E402


def whole_layout(attention: torch.Tensor, first: int, block_size: int) -> tuple[int, int]:
    """The columns before the crop: every noisy and every clean one (the published 2T layout)."""
    return 0, attention.shape[1]


def _batch(model, tok, spec: TrainSpec, groups: int, per_group: int, prompt_len: int, gen_len: int) -> TrainBatch:
    rng = np.random.default_rng(0)
    vocab = len(tok)
    gs = [TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k), prompt_ids=rng.integers(4, vocab, prompt_len),
                          completion_ids=rng.integers(4, vocab, size=(per_group, gen_len)),
                          rewards=rng.random(per_group), policy_version=0, mask_seed=k) for k in range(groups)]
    return collate_for(gs, spec, special_ids(model, tok), model_family(model))


def measure(model, batch: TrainBatch, spec: TrainSpec, mask_id: int, path: str, repeats: int):
    """One path's step: peak tensor bytes (profiled run), wall times (plain runs) and the gradients."""
    patch = mock.patch("dlrl.block_elbo.bd3_columns", whole_layout) if path == "before" else contextlib.nullcontext()
    with patch:
        with torch.no_grad():
            old = old_policy_terms(model, batch, spec, mask_id) - 0.05  # ratios away from 1
        for q in model.parameters():
            q.grad = torch.zeros_like(q)
        result, grads = profile_step(model, lambda: accumulate_gradients(model, batch, old, spec, mask_id), repeats)
    return result, torch.cat([g.flatten() for g in grads])


def case(name: str, model, tok, spec: TrainSpec, groups: int, per_group: int, prompt_len: int, gen_len: int,
         repeats: int) -> dict:
    batch = _batch(model, tok, spec, groups, per_group, prompt_len, gen_len)
    block = block_size_of(model)
    width = batch.tokens.shape[1]
    noisy_from, clean_to = bd3_columns(batch.attention, batch.prompt_len, block)
    before, g_before = measure(model, batch, spec, tok.mask_token_id, "before", repeats)
    after, g_after = measure(model, batch, spec, tok.mask_token_id, "after", repeats)
    row = {
        "case": name, "rows": batch.size, "prompt_len": prompt_len, "gen_len": gen_len, "block": block,
        "n_mc": spec.n_mc, "mc_chunk": spec.mc_chunk,
        "columns_before": 2 * width, "columns_after": width - noisy_from + clean_to,
        "before": before, "after": after,
        "time_ratio_after_over_before": after["step_seconds_median"] / before["step_seconds_median"],
        "peak_ratio_after_over_before": after["peak_step_tensor_bytes"] / before["peak_step_tensor_bytes"],
        "grad_rel_diff": float((g_after - g_before).norm() / g_before.norm()),
    }
    print(f"{name}: columns {row['columns_before']} -> {row['columns_after']}, "
          f"time {before['step_seconds_median']:.3f} s -> {after['step_seconds_median']:.3f} s "
          f"(x{row['time_ratio_after_over_before']:.3f}), peak {before['peak_step_tensor_bytes'] / 2**20:.1f} -> "
          f"{after['peak_step_tensor_bytes'] / 2**20:.1f} MiB (x{row['peak_ratio_after_over_before']:.3f}), "
          f"grad rel diff {row['grad_rel_diff']:.1e}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per path (the median is reported)")
    p.add_argument("--out", default=str(ROOT / "bench/results/bd3_crop.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    load_before = os.getloadavg()
    rows = []
    sudoku, stok = load_model("builtin:tiny-sudoku-block")
    rows.append(case("tiny-sudoku-block", sudoku, stok, TrainSpec(n_mc=2, mc_chunk=1, micro_batch=128,
                                                                  time_form="discrete", mask_coupling="group"),
                     groups=16, per_group=8, prompt_len=20, gen_len=20, repeats=args.repeats))
    body, btok = build_tiny_sdar(hidden=256, layers=2, heads=4, kv_heads=2, block_size=4)
    rows.append(case("sdar-shaped", body, btok, TrainSpec(n_mc=2, mc_chunk=1, micro_batch=4),
                     groups=1, per_group=4, prompt_len=256, gen_len=256, repeats=args.repeats))
    result = {
        **run_header("bd3_crop", load_before),
        "method": "learner.step.accumulate_gradients (BGPO), one micro-batch, float32 on the CPU; before = "
                  "bd3_columns patched to keep all 2T columns; peak = largest running sum of the CPU "
                  "allocator's events in torch's profiler during the step; time = median of plain runs",
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
