"""Issue 19 on a lent GPU, in one run: what the lean changes buy at scale.

1. learner: the real learner step (learner.step.train_step, fp32 masters + bf16 autocast, mc_chunk 1)
   on gpu_learner.py's 1.6 B LLaDA shape (vocabulary 126,464), BEFORE and AFTER the masked-row
   ELBO head (item 2), at n_t 1 and 16: MFU and peak memory side by side, with ratios. BEFORE is
   the full-logit pass restated in bench/elbo_logits.py (`full_logit_elbo_chunk`), patched in
   wherever the step calls the ELBO pass by name: dlrl.elbo_terms.elbo_chunk (the old-policy
   pass, through piece_terms) and learner.objectives.bgpo.elbo_chunk (BGPO's backward); no
   other module imports elbo_chunk. MFU is gpu_learner.py's: model FLOPs with the head applied to
   every position, the same nominal work for both paths, so AFTER / BEFORE MFU is BEFORE / AFTER
   time (AFTER's head really projects only the masked rows: the saving shows as time).
2. rollout: the cached engine (dual cache; and with parallel decoding at threshold 0.9) against
   the reference engine, end to end through make_engine + sample_completions, the model in
   bf16, at batch 1 / 8 / 32 from the same prompts at temperature 0: tokens/s and agreement (the
   share of identical tokens in the two engines' outputs). On a random-init LLaDA-8B-shaped
   built-in model (rollout_speed.py's "llada-8b" shape) for speed; its argmaxes are not a trained
   model's, so agreement is also measured on the trained tiny Sudoku start (builtin:tiny-sudoku).
3. weight sync: one version leaving the learner, fp32 (as held) vs bf16 (dlrl.precision's
   rollout dtype, cast once per version by dlrl.weights): bytes and seconds of the object
   store's device-to-host leg (dlrl.weights.encode) and, with >= 2 GPUs, the NCCL broadcast
   (gpu_learner.weight_transfer).

Every part starts only while `--budget-s` lasts; later rows are recorded as skipped. Imports no
Ray (dlrl.weights imports Ray only where it uses it). Prints one table; writes one JSON.

    bash bench/gpu_lean.sh                   # a lent H100/H200, under 8 minutes
    python bench/gpu_lean.py --dry-run       # tiny shapes on the CPU, gloo broadcast, < 2 minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from bench import gpu_learner as gl  # noqa: E402
from bench.elbo_logits import full_logit_elbo_chunk  # noqa: E402
from bench.rollout_speed import SHAPES, shaped_model  # noqa: E402
from dlrl import footprint as fp  # noqa: E402
from dlrl.decoding import Decoding  # noqa: E402
from dlrl.models import LLaDAConfig, LLaDAModelLM, load_model, special_ids  # noqa: E402
from dlrl.models.special_ids import SpecialIds  # noqa: E402
from dlrl.precision import rollout_dtype  # noqa: E402
from rollout.completion import sample_completions  # noqa: E402
from rollout.engines import make_engine  # noqa: E402

ELBO_CALLERS = ("dlrl.elbo_terms.elbo_chunk", "learner.objectives.bgpo.elbo_chunk")
"""Every name the learner step reaches the ELBO pass by (grep elbo_chunk): BEFORE patches both."""
ENGINES = {"reference": {}, "cached_dual": {"engine": "cached", "cache": "dual"},
           "cached_dual_threshold0.9": {"engine": "cached", "cache": "dual", "threshold": 0.9}}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def spent(self) -> bool:
        return time.perf_counter() - self.t0 > self.seconds

    def skipped(self) -> str:
        return f"time budget of {self.seconds:.0f} s spent"


def elbo_path(path: str) -> ExitStack:
    """BEFORE: the full-logit ELBO pass in every place the step calls it; AFTER: the code as it is."""
    stack = ExitStack()
    if path == "before":
        for target in ELBO_CALLERS:
            stack.enter_context(mock.patch(target, full_logit_elbo_chunk))
    return stack


def learner_part(args, device: torch.device, budget: Budget, peak: float | None) -> tuple[dict, LLaDAModelLM | None]:
    cfg = LLaDAConfig(**(gl.TINY if args.dry_run else gl.LLADA_1B))
    shape = fp.shape_from_config(cfg.to_dict())
    torch.manual_seed(0)
    with torch.device(device):
        model = LLaDAModelLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.01)
    rows, pairs = [], []
    for n_mc in args.n_mc:
        pair = {"n_mc": n_mc}
        for path in ("before", "after"):  # same model, same batch (make_batch seeds by n_mc)
            if budget.spent():
                pair[path] = {"skipped": budget.skipped()}
                continue
            gl.release(device)
            with elbo_path(path):
                row = gl.measure_row(model, optimizer, cfg, shape, args, device, "fp32_masters_bf16_autocast",
                                     n_mc, False, peak)
            row["elbo_pass"] = path
            pair[path] = row
            rows.append(row)
            print(f"  learner {path:6s} n_t={n_mc:2d} {row['step_seconds']:7.3f} s/step", flush=True)
        b, a = pair.get("before", {}), pair.get("after", {})
        if "step_seconds" in b and "step_seconds" in a:
            pair["time_ratio_after_over_before"] = a["step_seconds"] / b["step_seconds"]
            if b["peak_memory_bytes"]:
                pair["peak_memory_ratio_after_over_before"] = a["peak_memory_bytes"] / b["peak_memory_bytes"]
            if b["mfu"]:
                pair["mfu_ratio_after_over_before"] = a["mfu"] / b["mfu"]
            pair["loss_abs_diff"] = abs(a["loss"] - b["loss"])
        pairs.append(pair)
    del optimizer
    gl.release(device)
    return {"model": {"config": {k: getattr(cfg, k) for k in (gl.TINY if args.dry_run else gl.LLADA_1B)},
                      "params": shape.params()},
            "setup": {"rows": args.rows, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "mc_chunk": 1,
                      "precision": "fp32 masters, bf16 autocast", "warmup_steps": args.warmup,
                      "timed_steps": args.steps, "before": "full-logit ELBO pass patched into " +
                      ", ".join(ELBO_CALLERS),
                      "mfu": "gpu_learner.step_flops (head over every position) for both paths"},
            "pairs": pairs}, model


def decode(engine_name: str, model, ids: SpecialIds, prompts: list[list[int]], gen: int, block: int,
           device: torch.device) -> tuple[float, np.ndarray]:
    """Seconds (after one untimed warm-up on a prompt) and completions of a greedy decode."""
    decoding = Decoding(gen_length=gen, block_length=block, steps=gen, temperature=0.0, **ENGINES[engine_name])
    engine = make_engine(decoding, model, ids)
    sample_completions(engine, prompts[:1], decoding, len(prompts))
    gl.sync(device)
    t0 = time.perf_counter()
    completions, _, _ = sample_completions(engine, prompts, decoding, len(prompts))
    gl.sync(device)
    return time.perf_counter() - t0, completions


def engine_rows(model, ids: SpecialIds, prompt_pool: list[list[int]], batches: list[int], gen: int, block: int,
                device: torch.device, budget: Budget, label: str) -> list[dict]:
    rows = []
    for b in batches:
        if budget.spent():
            rows.append({"model": label, "batch": b, "skipped": budget.skipped()})
            continue
        prompts = prompt_pool[:b]
        row = {"model": label, "batch": b, "gen_length": gen, "block_length": block, "tokens_per_s": {},
               "agreement_with_reference": {}}
        reference = None
        for name in ENGINES:
            seconds, out = decode(name, model, ids, prompts, gen, block, device)
            row["tokens_per_s"][name] = out.size / seconds
            if reference is None:
                reference = out
            row["agreement_with_reference"][name] = float((out == reference).mean())
        row["speedup_over_reference"] = {k: v / row["tokens_per_s"]["reference"] for k, v in row["tokens_per_s"].items()}
        rows.append(row)
        print(f"  rollout {label} batch {b:3d}  " + "  ".join(
            f"{k} {v:8.1f} tok/s agree {row['agreement_with_reference'][k]:.3f}"
            for k, v in row["tokens_per_s"].items()), flush=True)
    return rows


def rollout_part(args, device: torch.device, budget: Budget) -> dict:
    if budget.spent():  # not even the 16 GB model is built
        return {"skipped": budget.skipped()}
    dtype = torch.bfloat16
    rng = np.random.default_rng(0)
    # a random-init model of LLaDA-8B's shape, bf16, random prompts
    shape = "tiny" if args.dry_run else args.rollout_shape
    dims = SHAPES[shape]
    model = shaped_model(shape, str(device), dtype)
    mask = model.config.mask_token_id
    ids = SpecialIds(mask_id=mask, pad_id=0, eos_ids=(1,))
    pool = [rng.integers(4, dims["vocab_size"], size=args.rollout_prompt_len).tolist() for _ in range(max(args.batches))]
    big = engine_rows(model, ids, pool, args.batches, args.rollout_gen_len, args.block, device, budget, shape)
    params = sum(p.numel() for p in model.parameters())
    del model
    gl.release(device)
    # the trained tiny Sudoku start, bf16: agreement of a model that knows its task
    tiny = {"skipped": budget.skipped()} if budget.spent() else None
    if tiny is None:
        from dlrl.config import JobSpec
        from dlrl.tasks import get_task
        from rollout.completion import encode_prompt
        from rollout.completion import EVAL_SEED
        spec = JobSpec.from_toml(ROOT / "deploy/jobs/tiny-sudoku.toml")
        model, tokenizer = load_model(spec.model.path, device=device, dtype=dtype)
        model.eval()
        task = get_task(spec.task.name, **spec.task.options)
        held_out = task.examples("test", max(64, max(args.batches)), EVAL_SEED)
        prompts = [encode_prompt(tokenizer, task, ex, spec.task.style) for ex in held_out]
        r = spec.rollout
        tiny = {"model": spec.model.path, "rows": engine_rows(model, special_ids(model, tokenizer), prompts,
                                                             args.batches, r.gen_length, r.block_length, device,
                                                             budget, "tiny-sudoku")}
        del model
        gl.release(device)
    return {"dtype": "bfloat16", "gpu_job_rollout_dtype": str(rollout_dtype("float32", "auto", "cuda")),
            "shape": shape, "model": {"params": params, **dims}, "prompt_length": args.rollout_prompt_len,
            "method": "end to end: make_engine + sample_completions at temperature 0, steps = gen_length, after "
                      "one untimed warm-up decode; agreement = share of identical tokens with the reference "
                      "engine's output from the same prompts",
            "rows": big, "tiny_sudoku": tiny}


def sync_part(model, device: torch.device, budget: Budget, repeats: int) -> dict:
    if model is None or budget.spent():
        return {"skipped": budget.skipped()}
    wire = rollout_dtype("float32", "auto", "cuda")  # what a GPU job's workers hold: bf16
    out = {"fp32": gl.weight_transfer(model, device, repeats, None),
           "bf16": gl.weight_transfer(model, device, repeats, wire)}
    for leg in ("device_to_host", "broadcast"):
        f, b = out["fp32"].get(leg), out["bf16"].get(leg)
        if f and b:
            out[f"{leg}_bytes_ratio_bf16_over_fp32"] = b["bytes"] / f["bytes"]
            out[f"{leg}_seconds_ratio_bf16_over_fp32"] = b["seconds"] / f["seconds"]
    return out


def run(args) -> dict:
    budget = Budget(args.budget_s)
    device = torch.device("cpu" if args.dry_run else "cuda")
    card = gl.card_name(device)
    peak = None if device.type == "cpu" else gl.peak_flops(card)
    learner, model = learner_part(args, device, budget, peak)
    sync = sync_part(model, device, budget, args.transfer_repeats)  # the learner's fp32 masters, still held
    del model
    gl.release(device)
    rollout = rollout_part(args, device, budget)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"benchmark": "issue 19 at scale: learner ELBO before/after, cached vs reference engine in bf16, "
                         "weight sync fp32 vs bf16",
            "dry_run": args.dry_run,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "machine": {"card": card, "device": device.type, "cpus": os.cpu_count(),
                        "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                        "torch": torch.__version__, "cuda": torch.version.cuda,
                        "python": platform.python_version()},
            "peak_bf16_tflops": peak / 1e12 if peak else None,
            "budget_s": args.budget_s,
            "learner": learner, "rollout": rollout, "weight_sync": sync,
            "seconds": time.perf_counter() - budget.t0}


def _f(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(r: dict) -> str:
    m = r["machine"]
    lines = [f"{m['card']} ({m['device']}), torch {m['torch']}, {r['date']}, commit {r['commit'][:10]}",
             "learner step, fp32 masters + bf16 autocast, mc_chunk 1 (before = full-logit ELBO, after = masked rows)",
             f"{'n_t':>3} {'s/step b->a':>17} {'MFU b->a':>15} {'peak GB b->a':>15} {'time x':>7} {'mem x':>6}"]
    for p in r["learner"]["pairs"]:
        b, a = p.get("before", {}), p.get("after", {})
        if "step_seconds" not in b or "step_seconds" not in a:
            lines.append(f"{p['n_mc']:3d} skipped: {b.get('skipped') or a.get('skipped')}")
            continue
        gb = [x["peak_memory_bytes"] / 1e9 if x["peak_memory_bytes"] else None for x in (b, a)]
        mfu = [f"{x['mfu']:.1%}" if x["mfu"] is not None else "-" for x in (b, a)]
        lines.append(f"{p['n_mc']:3d} {b['step_seconds']:8.3f}->{a['step_seconds']:7.3f} "
                     f"{mfu[0]:>7}->{mfu[1]:>6} {_f(gb[0], '7.1f')}->{_f(gb[1], '6.1f')} "
                     f"{p['time_ratio_after_over_before']:7.2f} {_f(p.get('peak_memory_ratio_after_over_before'), '6.2f')}")
    ro = r["rollout"]
    if "skipped" in ro:
        lines.append(f"rollout: skipped: {ro['skipped']}")
        ro = {"rows": [], "tiny_sudoku": None}
    else:
        lines.append(f"rollout, bf16, greedy, tokens/s (agreement with reference): {ro['shape']} "
                     f"{ro['model']['params'] / 1e9:.2f} B random-init; tiny-sudoku trained")
    names = list(ENGINES)
    lines.append(f"{'model':>11} {'batch':>5} " + " ".join(f"{n:>26}" for n in names))
    tiny_rows = (ro["tiny_sudoku"] or {}).get("rows", [])
    for row in ro["rows"] + tiny_rows:
        if "skipped" in row:
            lines.append(f"{row['model'][:11]:>11} {row['batch']:5d} skipped")
            continue
        cells = [f"{row['tokens_per_s'][n]:10.1f} ({row['agreement_with_reference'][n]:.3f})" for n in names]
        lines.append(f"{row['model'][:11]:>11} {row['batch']:5d} " + " ".join(f"{c:>26}" for c in cells))
    ws = r["weight_sync"]
    if "skipped" in ws:
        lines.append(f"weight sync: skipped: {ws['skipped']}")
    else:
        lines.append(f"{'weight sync per version':28s} {'fp32 MB':>9} {'s':>7} {'bf16 MB':>9} {'s':>7} {'bytes x':>7}")
        for leg in ("device_to_host", "broadcast"):
            f, b = ws["fp32"].get(leg), ws["bf16"].get(leg)
            if f and b:
                name = leg if leg == "device_to_host" else f"broadcast ({f['backend']})"
                lines.append(f"{name:28s} {f['bytes'] / 1e6:9.1f} {f['seconds']:7.3f} {b['bytes'] / 1e6:9.1f} "
                             f"{b['seconds']:7.3f} {b['bytes'] / f['bytes']:7.2f}")
            elif leg == "broadcast":
                lines.append(f"broadcast: {ws['fp32'].get('broadcast_note')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, gloo broadcast (CI)")
    p.add_argument("--out", help="JSON path (default bench/results/gpu_lean.json; dry run: the temp dir)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="parts and rows not started by then are recorded as skipped")
    p.add_argument("--n-mc", type=int, nargs="+", help="learner n_t values (default 1 16; dry run 1 4)")
    p.add_argument("--rows", type=int, help="learner completions per step (one micro-batch, multiple of 4)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--gen-len", type=int)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, help="timed learner steps per row")
    p.add_argument("--batches", type=int, nargs="+", help="rollout batches (default 1 8 32; dry run 1 2 4)")
    p.add_argument("--rollout-shape", choices=sorted(SHAPES), default="llada-8b")
    p.add_argument("--rollout-prompt-len", type=int)
    p.add_argument("--rollout-gen-len", type=int)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--transfer-repeats", type=int, default=2)
    args = p.parse_args(argv)
    small = args.dry_run
    args.n_mc = args.n_mc or ([1, 4] if small else [1, 16])
    args.rows = args.rows or (4 if small else 8)
    args.prompt_len = args.prompt_len or (16 if small else 256)
    args.gen_len = args.gen_len or (32 if small else 256)
    args.steps = args.steps or (1 if small else 2)
    args.batches = args.batches or ([1, 2, 4] if small else [1, 8, 32])
    args.rollout_prompt_len = args.rollout_prompt_len or (16 if small else 128)
    args.rollout_gen_len = args.rollout_gen_len or (32 if small else 128)
    if small:
        args.block = min(args.block, 16)
    if args.rows % 4:
        p.error("--rows must be a multiple of 4 (groups of 4 completions)")
    if not small and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or --dry-run for the CPU")
    out = Path(args.out or (Path(tempfile.gettempdir()) / "gpu_lean_dry_run.json" if small
                            else ROOT / "bench/results/gpu_lean.json"))
    if small:
        torch.set_num_threads(1)
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("---------------------------------------------")
    print(table(result))
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
