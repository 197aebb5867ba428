"""What per-block activation checkpointing saves: peak tensor memory of the learner's real
`accumulate_gradients` with and without it, on a LLaDA-shaped model on the CPU.

The peak is of live tensors (torch's CPU allocator, every allocation and free recorded by the
profiler, as tests/test_plan.py measures it), above the weights and gradients present before the
step: the activations and logits of one chunk's forward and backward. Printed beside
dlrl.footprint's activation estimate for the same shapes.

    python bench/activation_memory.py     # ~1 min on 2 cores, writes bench/results/activation_memory.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl import footprint as fp  # noqa: E402
from dlrl.batch import collate  # noqa: E402
from dlrl.config import TrainSpec  # noqa: E402
from dlrl.models import LLaDAConfig, LLaDAModelLM  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from learner.memory import apply_activation_checkpointing  # noqa: E402
from learner.step import accumulate_gradients, old_policy_terms  # noqa: E402

MASK = 3


def peak_tensor_bytes(fn) -> int:
    """Largest running sum of the CPU allocator's +/- events while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def run_header(bench: str, load_before: tuple[float, float, float]) -> dict:
    """The fields every side-by-side CPU bench's JSON opens with: its name, date, commit and machine
    (with the load average before the run and now, since 2 shared cores make times noisy)."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "bench": bench,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_1_5_15_before": load_before, "load_average_1_5_15_after": os.getloadavg()},
    }


def profile_step(model: torch.nn.Module, step, repeats: int) -> tuple[dict, list[torch.Tensor]]:
    """A learner step `step()` measured as the side-by-side benches report it: the peak tensor bytes
    of one profiled run, the gradients it accumulated (cloned), and the wall times of `repeats`
    plain runs (their median too). The caller sets the path up (a patch) around this call."""
    peak = peak_tensor_bytes(step)
    grads = [q.grad.clone() for q in model.parameters() if q.grad is not None]
    seconds = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=False)
        t0 = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - t0)
    return {"peak_step_tensor_bytes": peak, "step_seconds_median": statistics.median(seconds),
            "step_seconds": seconds}, grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rows", type=int, default=8, help="completions per micro-batch (mc_chunk 1)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=192)
    p.add_argument("--out", default=str(ROOT / "bench/results/activation_memory.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=args.hidden, n_heads=args.hidden // 64, n_kv_heads=args.hidden // 64,
                      n_layers=args.layers, mlp_hidden_size=args.hidden * 8 // 3 // 8 * 8,
                      vocab_size=args.vocab, embedding_size=args.vocab, mask_token_id=MASK,
                      pad_token_id=0, eos_token_id=1)
    spec = TrainSpec(n_mc=2, mc_chunk=1, micro_batch=args.rows, compute_dtype="float32")
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="bench", prompt_id=str(k),
                              prompt_ids=rng.integers(4, args.vocab, size=args.prompt_len),
                              completion_ids=rng.integers(4, args.vocab, size=(4, args.gen_len)),
                              rewards=rng.random(4), policy_version=0, mask_seed=k)
              for k in range(max(args.rows // 4, 1))]
    batch = collate(groups, pad_id=0, eos_ids=(1,), n_mc=spec.n_mc)
    rows = []
    grads = {}
    weights = LLaDAModelLM(cfg).state_dict()
    for checkpointing in (False, True):
        model = LLaDAModelLM(cfg)
        model.load_state_dict(weights)
        if checkpointing:
            apply_activation_checkpointing(model)
        old = old_policy_terms(model, batch, spec, MASK)
        accumulate_gradients(model, batch, old, spec, MASK)  # gradients exist before the measured step
        t0 = time.perf_counter()
        peak = peak_tensor_bytes(lambda: accumulate_gradients(model, batch, old, spec, MASK))
        seconds = time.perf_counter() - t0
        grads[checkpointing] = [q.grad.clone() for q in model.parameters()]
        shape = fp.shape_from_config(cfg.to_dict())
        T = args.prompt_len + args.gen_len
        rows.append({
            "activation_checkpointing": checkpointing,
            "peak_step_tensor_bytes": peak,
            "step_seconds_profiled": seconds,
            "footprint_activation_bytes": fp.activation_bytes(shape, args.rows, T, 4, checkpointing),
            "footprint_logits_bytes": fp.logits_bytes(shape, args.rows, args.gen_len, 4),
        })
        print(f"checkpointing {'on ' if checkpointing else 'off'}: step peak {peak / 2**20:8.1f} MiB "
              f"(footprint: activations {rows[-1]['footprint_activation_bytes'] / 2**20:7.1f} MiB + logits "
              f"{rows[-1]['footprint_logits_bytes'] / 2**20:6.1f} MiB), {seconds:.1f} s", flush=True)
    same = max(float((a - b).abs().max()) for a, b in zip(grads[False], grads[True]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "benchmark": "learner step peak tensor memory with and without per-block activation checkpointing (CPU)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"device": "cpu", "name": platform.processor() or platform.machine(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "setup": vars(args) | {"params": sum(q.numel() for q in model.parameters()), "dtype": "float32"},
        "rows": rows,
        "peak_ratio_on_over_off": rows[1]["peak_step_tensor_bytes"] / rows[0]["peak_step_tensor_bytes"],
        "max_abs_grad_difference": same,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"peak with checkpointing = {result['peak_ratio_on_over_off']:.3f} x without; "
          f"max |grad difference| {same:.2e}; wrote {args.out}")


if __name__ == "__main__":
    main()
