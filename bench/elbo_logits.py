"""One learner ELBO step at LLaDA's vocabulary size, before and after projecting only the masked rows.

BEFORE is the full-logit ELBO pass the learner ran until the masked-row head (restated below as
`full_logit_elbo_chunk`: every position of the (m * c, P + L) forward projected onto the vocabulary,
the response sliced, then the masked positions scored). AFTER is `dlrl.elbo_terms.elbo_chunk`
(the model without its head, the masked response rows gathered and projected in chunks of
`footprint.LOGIT_CHUNK` logits: dlrl.models.output_head). Both run the learner's real step,
`accumulate_gradients` (BGPO's forward + backward of one piece, chunk by chunk), on the same
LLaDA-shaped body (native LLaDA code, float32 on the CPU) with LLaDA's 126,464-token untied head, for
n_mc 1 and a chunked n_mc > 1. Measured:
  - peak bytes of live tensors during the step (the CPU allocator's +/- events from torch's
    profiler, as bench/activation_memory.py and tests/test_plan.py count them; weights, gradients
    and the old terms exist before the step and are not in it);
  - the step's wall time (the median of `--repeats` unprofiled runs);
  - that both paths give the same gradient (max abs difference).

    python bench/elbo_logits.py            # writes bench/results/elbo_logits.json
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
from bench.gpu_learner import LLADA_1B  # noqa: E402
from dlrl import diffusion  # noqa: E402
from dlrl import footprint as fp  # noqa: E402
from dlrl.batch import TrainBatch, collate  # noqa: E402
from dlrl.block_elbo import bd3_logits, block_size_of  # noqa: E402
from dlrl.config import TrainSpec  # noqa: E402
from dlrl.models import LLaDAConfig, LLaDAModelLM  # noqa: E402
from dlrl.models.families import model_family  # noqa: E402
from dlrl.models.forward import diffusion_logits  # noqa: E402
from dlrl.precision import autocast  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from learner.step import accumulate_gradients, old_policy_terms  # noqa: E402

# LLaDA-8B's vocabulary and special ids, as gpu_learner.py's LLaDA shape states them; the step reads
# its ids back from the model's config.
LLADA_VOCAB_AND_IDS = {k: LLADA_1B[k] for k in ("vocab_size", "embedding_size", "mask_token_id", "pad_token_id",
                                                 "eos_token_id")}
VOCAB = LLADA_1B["embedding_size"]


def full_logit_elbo_chunk(model: torch.nn.Module, batch: TrainBatch, js: slice, mask_id: int, normalize: str,
                          compute_dtype: str = "auto") -> torch.Tensor:
    """The ELBO pass before the masked-row head (dlrl/elbo_terms.py at 8f47b89), restated."""
    P = batch.prompt_len
    m = batch.size
    masks = batch.masks[:, js]
    c = masks.shape[1]
    response = batch.tokens[:, P:]
    noisy = diffusion.apply_mask(response[:, None].expand(-1, c, -1), masks, mask_id)
    inputs = torch.cat([batch.tokens[:, None, :P].expand(-1, c, -1), noisy], -1).flatten(0, 1)
    attention = batch.attention[:, None].expand(-1, c, -1).flatten(0, 1)
    block = block_size_of(model)
    with autocast(inputs.device, compute_dtype):
        if block is None:
            logits = diffusion_logits(model, inputs, attention)[:, P:]  # (m * c, L, V)
        else:
            clean = batch.tokens.repeat_interleave(c, 0)
            logits = bd3_logits(model, inputs, clean, attention, block, slice(P, batch.tokens.shape[1]))
    terms = diffusion.elbo_term(logits, response.repeat_interleave(c, 0), masks.flatten(0, 1),
                                batch.weights[:, js].flatten(), normalize)
    return terms.view(m, c)


def _batch(config, rows: int, prompt_len: int, gen_len: int, n_mc: int) -> TrainBatch:
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id="g0", task="t", prompt_id="0",
                              prompt_ids=rng.integers(0, 126_000, size=prompt_len),
                              completion_ids=rng.integers(0, 126_000, size=(rows, gen_len)),
                              rewards=np.linspace(0.0, 1.0, rows), policy_version=0, mask_seed=7)]
    return collate(groups, pad_id=config.pad_token_id, eos_ids=(config.eos_token_id,), n_mc=n_mc)


def measure(model, batch, spec: TrainSpec, path: str, repeats: int) -> tuple[dict, list[torch.Tensor]]:
    """One path's step: peak tensor bytes (profiled run) and median wall time (plain runs)."""
    # BGPO's backward calls the ELBO pass by its name in learner.objectives.bgpo.
    patch = (mock.patch("learner.objectives.bgpo.elbo_chunk", full_logit_elbo_chunk) if path == "before"
             else contextlib.nullcontext())
    mask_id = model.config.mask_token_id
    with torch.no_grad():
        old = old_policy_terms(model, batch, spec, mask_id) - 0.05  # ratios away from 1
    for q in model.parameters():  # gradients exist before the measured step, as in a training run
        q.grad = torch.zeros_like(q)
    with patch:
        return profile_step(model, lambda: accumulate_gradients(model, batch, old, spec, mask_id), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=2, help="completions in the micro-batch (>= 2: one completion's "
                   "group-normalised advantage is 0, and so its gradient)")
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per path (the median is reported)")
    p.add_argument("--out", default=str(ROOT / "bench/results/elbo_logits.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=args.hidden, n_heads=args.hidden // 64, n_kv_heads=args.hidden // 64,
                      n_layers=args.layers, mlp_hidden_size=args.hidden * 8 // 3 // 8 * 8, weight_tying=False,
                      **LLADA_VOCAB_AND_IDS)
    model = LLaDAModelLM(cfg)
    shape = fp.shape_from_config(cfg.to_dict())
    load_before = os.getloadavg()
    rows = []
    out = Path(args.out)
    for n_mc, mc_chunk, m in ((1, 1, args.rows), (4, 2, args.rows)):
        spec = TrainSpec(n_mc=n_mc, mc_chunk=mc_chunk, micro_batch=m)
        batch = _batch(cfg, m, args.prompt_len, args.gen_len, n_mc)
        before, g_before = measure(model, batch, spec, "before", args.repeats)
        after, g_after = measure(model, batch, spec, "after", args.repeats)
        diff = max(float((a - b).abs().max()) for a, b in zip(g_before, g_after))
        scale = max(float(a.abs().max()) for a in g_before)
        row = {
            "n_mc": n_mc, "mc_chunk": mc_chunk, "rows": m, "forward_rows": m * mc_chunk,
            "masked_positions": int(batch.masks.sum()), "response_positions": m * n_mc * args.gen_len,
            "before": before, "after": after,
            "peak_ratio_after_over_before": after["peak_step_tensor_bytes"] / before["peak_step_tensor_bytes"],
            "time_ratio_after_over_before": after["step_seconds_median"] / before["step_seconds_median"],
            "grad_max_abs_diff": diff, "grad_max_abs": scale,
            "footprint_logits_bytes_after": fp.logits_bytes(shape, m * mc_chunk, args.gen_len, 4),
        }
        rows.append(row)
        print(f"n_mc {n_mc} mc_chunk {mc_chunk} rows {m}: peak {before['peak_step_tensor_bytes'] / 2**20:8.1f} MiB -> "
              f"{after['peak_step_tensor_bytes'] / 2**20:8.1f} MiB (x{row['peak_ratio_after_over_before']:.3f}), "
              f"time {before['step_seconds_median']:.2f} s -> {after['step_seconds_median']:.2f} s "
              f"(x{row['time_ratio_after_over_before']:.3f}), grad diff {diff:.2e} of {scale:.2e}", flush=True)
        write(out, args, model, load_before, rows)
    print(f"wrote {out}")


def write(out: Path, args, model, load_before, rows: list[dict]) -> None:
    """The result so far (rewritten after each configuration)."""
    header = run_header("elbo_logits", load_before)
    header["machine"]["note"] = ("shared machine: 2 cores used by several concurrent jobs (a tiny training ran "
                                 "beside this); times are noisy, peak bytes are not")
    result = {
        **header,
        "model": {"family": model_family(model).name, "hidden": args.hidden, "layers": args.layers, "vocab": VOCAB,
                  "params": sum(q.numel() for q in model.parameters()), "dtype": "float32",
                  "prompt_len": args.prompt_len, "gen_len": args.gen_len},
        "logit_chunk_rows": fp.logit_chunk_rows(VOCAB),
        "method": "learner.step.accumulate_gradients (BGPO), one micro-batch; peak = largest running sum of "
                  "the CPU allocator's events in torch's profiler during the step; time = median of plain runs",
        "rows": rows,
        "peak_note": "both peaks include what any path allocates in the step: the embedding's and the head's "
                     "(V, d) float32 gradient temporaries before they are added to .grad (2 x 129.5 MB here)",
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
