"""GPU learner benchmark: step time, MFU and peak memory of the real learner step on a 1.6 B
LLaDA-shaped model with random weights, and how fast its weights leave the learner.

Rows, each for n_t = train.n_mc in 1 / 4 / 16 (mc_chunk 1: one MC sample per forward+backward):
  - "fp32_masters_bf16_autocast": float32 weights and AdamW state, matmuls in bf16
    (dlrl.precision), through learner.step.train_step as the Learner runs it;
  - "bf16_weights": the weights themselves in bf16 (what the learner did before fp32 masters).
    train_step refuses to train bf16 masters, so this row calls old_policy_terms +
    accumulate_gradients + clip + AdamW directly, the same calls train_step makes;
  - one fp32-masters row at n_t 16 with per-block activation checkpointing (learner.memory).
Weight transfer: with >= 2 GPUs, dlrl.weights' bucketed NCCL broadcast of the full state to a
second process on GPU 1; with one GPU, the device-to-host copy of the full state that the
object-store path starts with (Learner.weights), and the JSON says that NCCL needs 2 GPUs. The
dry run broadcasts with gloo between two CPU processes, so that path runs too.

MFU = model FLOPs / step seconds / the card's dense bf16 peak (PEAK_BF16, looked up by the name
torch reports). Model FLOPs of one step, N rows of T tokens, P = matmul parameters (blocks and
output head, not the embedding lookup), n layers, d = d_model:
    per MC sample: old-policy forward (2 P + 4 n T d) N T  +  training forward+backward (6 P + 12 n T d) N T
the attention term being QK^T and AV (2 T d each per layer and token, x3 for the backward).
Activation checkpointing's recompute is not counted (model FLOPs, not hardware FLOPs).

    python bench/gpu_learner.py             # CUDA, ~2-3 min on an H100/H200, writes bench/results/gpu_learner.json
    python bench/gpu_learner.py --dry-run   # tiny shapes on the CPU, < 1 min, writes to the temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


from dlrl import footprint as fp  # noqa: E402
from dlrl.batch import collate  # noqa: E402
from dlrl.config import TrainSpec  # noqa: E402
from dlrl.models import LLaDAConfig, LLaDAModelLM  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from dlrl.weights import CollectiveReceiver, CollectiveSender, WeightUpdate, encode  # noqa: E402
from learner.memory import apply_activation_checkpointing  # noqa: E402
from learner.step import accumulate_gradients, old_policy_terms, train_step  # noqa: E402

LLADA_1B = dict(d_model=2048, n_heads=16, n_kv_heads=16, n_layers=20, mlp_hidden_size=6144,
                vocab_size=126464, embedding_size=126464, mask_token_id=126336, pad_token_id=126081,
                eos_token_id=126081)
"""LLaDA-8B-Instruct's config.json (d_model 4096, 32 heads, 32 layers, MLP 12288 = 3 d, vocab
126464) at half the width and 20 layers: 1.61 B parameters, 1.09 B of them in the blocks."""
TINY = dict(d_model=64, n_heads=4, n_kv_heads=4, n_layers=2, mlp_hidden_size=192, vocab_size=512,
            embedding_size=512, mask_token_id=3, pad_token_id=0, eos_token_id=1)
"""The dry run's shape: the same architecture, small enough for a CI CPU."""
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12),
             ("GH200", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12)]
"""Dense (no sparsity) bf16 tensor-core peak FLOP/s by card name, first match wins (NVIDIA data
sheets; the SXM figure for H100/H200 without a form factor in the name)."""
N_MC = (1, 4, 16)
DRY_N_MC = (1, 2, 4)
"""The dry run's n_t: the same rows, fewer passes each (a CI CPU is shared)."""
PRECISIONS = ("fp32_masters_bf16_autocast", "bf16_weights")


def peak_flops(card: str) -> float | None:
    for name, flops in PEAK_BF16:
        if name in card:
            return flops
    return None


def step_flops(shape: fp.ModelShape, rows: int, seq_len: int, n_mc: int) -> float:
    """Model FLOPs of one learner step (see the module docstring)."""
    p = shape.layers * shape.block_params() + shape.vocab * shape.hidden
    attn = shape.layers * seq_len * shape.hidden
    tokens = rows * seq_len
    return n_mc * tokens * ((2 * p + 4 * attn) + (6 * p + 12 * attn))


def make_batch(cfg: LLaDAConfig, rows: int, prompt_len: int, gen_len: int, n_mc: int, device):
    rng = np.random.default_rng(n_mc)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="bench", prompt_id=str(k),
                              prompt_ids=rng.integers(4, cfg.vocab_size, size=prompt_len),
                              completion_ids=rng.integers(4, cfg.vocab_size, size=(4, gen_len)),
                              rewards=rng.random(4), policy_version=0, mask_seed=k)
              for k in range(rows // 4)]
    return collate(groups, pad_id=cfg.pad_token_id, eos_ids=(cfg.eos_token_id,), n_mc=n_mc).to(device)


def step_bf16_weights(model, optimizer, batch, spec: TrainSpec, mask_id: int) -> dict[str, float]:
    """train_step's calls for one update, without its refusal of low-precision masters."""
    model.train()
    old = old_policy_terms(model, batch, spec, mask_id)
    optimizer.zero_grad(set_to_none=True)
    metrics = accumulate_gradients(model, batch, old, spec, mask_id)
    params = [p for p in model.parameters() if p.requires_grad]
    metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip))
    optimizer.step()
    return metrics


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_row(model, optimizer, cfg, shape, args, device, precision: str, n_mc: int,
                checkpointing: bool, peak: float | None) -> dict:
    """Warm-up step(s), then `args.steps` timed steps; peak memory over the timed steps."""
    spec = TrainSpec(n_mc=n_mc, mc_chunk=1, micro_batch=args.rows, lr=1e-6, compute_dtype="bfloat16")
    batch = make_batch(cfg, args.rows, args.prompt_len, args.gen_len, n_mc, device)
    step = train_step if precision == "fp32_masters_bf16_autocast" else step_bf16_weights
    for _ in range(args.warmup):
        step(model, optimizer, batch, spec, cfg.mask_token_id)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, metrics = [], {}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        metrics = step(model, optimizer, batch, spec, cfg.mask_token_id)
        sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    seq_len = args.prompt_len + args.gen_len
    flops = step_flops(shape, args.rows, seq_len, n_mc)
    return {
        "precision": precision, "n_mc": n_mc, "activation_checkpointing": checkpointing,
        "step_seconds": seconds, "step_seconds_all": times,
        "train_tokens_per_s": args.rows * seq_len * n_mc / seconds,
        "model_tflops_per_step": flops / 1e12,
        "achieved_tflops_per_s": flops / seconds / 1e12,
        "mfu": flops / seconds / peak if peak else None,
        "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
        "finite": bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])),
    }


def _receiver(address, manifest: list[tuple[str, list[int], str]], device: str, versions: int, out) -> None:
    """Rank 1 of the weight-broadcast benchmark, in its own process: receive `versions` versions."""
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        state = {name: torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                 for name, shape, dtype in manifest}
        receiver = CollectiveReceiver(address, 1)
        receiver.join()
        for v in range(1, versions + 1):
            receiver.recv_into(state, v - 1)
        receiver.close()
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - reported by the parent, which owns the JSON
        out.put(f"{type(exc).__name__}: {exc}")


def broadcast_gbps(state: dict[str, torch.Tensor], backend: str, receiver_device: str, repeats: int,
                   cast: torch.dtype | None = None) -> dict:
    """dlrl.weights' collective broadcast of `state` (rank 0, here) to one receiver process, its
    floating-point tensors cast to `cast` on the way (the receiver holds that dtype)."""
    ctx = mp.get_context("spawn")
    sender = CollectiveSender(2, backend=backend, timeout_s=120)
    out = ctx.Queue()
    manifest = [(s.name, list(s.shape), s.dtype) for s in WeightUpdate.of(0, state, "collective", cast=cast).manifest]
    child = ctx.Process(target=_receiver, args=(sender.address, manifest, receiver_device, repeats + 1, out))
    child.start()
    try:
        sender.join()
        sender.send(1, state, cast=cast)  # warm-up: NCCL's channels and buffers
        seconds = []
        for v in range(2, repeats + 2):
            t0 = time.perf_counter()
            stats = sender.send(v, state, cast=cast)
            if backend == "nccl":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t0)
        status = out.get(timeout=120)
    finally:
        sender.close()
        child.join(timeout=60)
    if status != "ok":
        raise RuntimeError(f"broadcast receiver failed: {status}")
    best = min(seconds)
    return {"backend": backend, "bytes": stats.bytes, "seconds": best, "gb_per_s": stats.bytes / best / 1e9,
            "receiver": receiver_device, "repeats": repeats, "wire_dtype": wire_name(cast)}


def wire_name(cast: torch.dtype | None) -> str:
    return "as held (float32 masters)" if cast is None else str(cast).removeprefix("torch.")


def device_to_host_gbps(model, repeats: int, cast: torch.dtype | None = None) -> dict:
    """The object-store path's first leg: dlrl.weights.encode, which casts each floating-point
    tensor to `cast` on its device and copies it to host memory, as the learner's weight payload
    does before the object store takes it (ray.put, not timed: no Ray here)."""
    seconds, nbytes = [], 0
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for _ in range(repeats):
        t0 = time.perf_counter()
        update, host = encode(0, state, cast=cast)
        seconds.append(time.perf_counter() - t0)
        nbytes = sum(a.nbytes for a in host)
        assert nbytes == update.nbytes, (nbytes, update.nbytes)
        del host
    best = min(seconds)
    return {"bytes": nbytes, "seconds": best, "gb_per_s": nbytes / best / 1e9, "repeats": repeats,
            "wire_dtype": wire_name(cast)}


def weight_transfer(model, device: torch.device, repeats: int, cast: torch.dtype | None = None) -> dict:
    """One weights version leaving the learner, its floating-point tensors cast to `cast` (None:
    as held): the object store's device-to-host leg, and the collective broadcast where it can run."""
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    out = {"state": f"the full model state as the learner publishes it, in {wire_name(cast)}",
           "device_to_host": device_to_host_gbps(model, repeats, cast)}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if device.type == "cpu":
        out["broadcast"] = broadcast_gbps(state, "gloo", "cpu", repeats, cast)
        out["broadcast_note"] = "dry run: gloo between two CPU processes (the NCCL path's code, not its speed)"
    elif gpus >= 2:
        out["broadcast"] = broadcast_gbps(state, "nccl", "cuda:1", repeats, cast)
    else:
        out["broadcast"] = None
        out["broadcast_note"] = f"NCCL broadcast needs 2 GPUs; {gpus} visible: only the device-to-host copy was measured"
    return out


def card_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    cfg = LLaDAConfig(**(TINY if args.dry_run else LLADA_1B))
    shape = fp.shape_from_config(cfg.to_dict())
    card = card_name(device)
    peak = None if device.type == "cpu" else peak_flops(card)
    n_mcs = DRY_N_MC if args.dry_run else N_MC
    plan = [(precision, n, False) for precision in PRECISIONS for n in n_mcs]
    plan.insert(len(n_mcs), ("fp32_masters_bf16_autocast", n_mcs[-1], True))  # before the model goes bf16
    rows, transfer = [], None
    model = optimizer = None
    current = None
    for precision, n_mc, checkpointing in plan:
        if time.perf_counter() - t_start > args.budget_s:
            rows.append({"precision": precision, "n_mc": n_mc, "activation_checkpointing": checkpointing,
                         "skipped": f"time budget of {args.budget_s:.0f} s spent"})
            continue
        if precision != current:
            model = optimizer = None
            release(device)
            torch.manual_seed(0)
            with torch.device(device):
                model = LLaDAModelLM(cfg)
            if precision == "bf16_weights":
                model = model.to(torch.bfloat16)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.99), weight_decay=0.01)
            current = precision
        if checkpointing:
            apply_activation_checkpointing(model)
        row = measure_row(model, optimizer, cfg, shape, args, device, precision, n_mc, checkpointing, peak)
        rows.append(row)
        print(f"  {precision:27s} n_t={n_mc:2d} ckpt={'on ' if checkpointing else 'off'} "
              f"{row['step_seconds']:7.3f} s/step", flush=True)
        if transfer is None and precision == "fp32_masters_bf16_autocast":
            transfer = weight_transfer(model, device, args.transfer_repeats)
    model = optimizer = None
    release(device)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {
        "benchmark": "learner step time, MFU, peak memory; weight transfer",
        "dry_run": args.dry_run,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"hostname": socket.gethostname(), "cpus": os.cpu_count(), "device": device.type,
                    "card": card, "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "model": {"config": {k: getattr(cfg, k) for k in (TINY if args.dry_run else LLADA_1B)},
                  "params": shape.params(), "matmul_params": shape.layers * shape.block_params() + shape.vocab * shape.hidden},
        "setup": {"rows": args.rows, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "mc_chunk": 1,
                  "warmup_steps": args.warmup, "timed_steps": args.steps, "optimizer": "AdamW",
                  "compute_dtype": "bfloat16"},
        "flops_formula": "per step: n_mc * N * T * ((2P + 4 n T d) + (6P + 12 n T d)); P = matmul params "
                         "(blocks + head), n layers, d = d_model, N rows of T tokens; recompute not counted",
        "peak_bf16_tflops": peak / 1e12 if peak else None,
        "rows": rows,
        "weight_transfer": transfer,
        "seconds": time.perf_counter() - t_start,
    }


def table(result: dict) -> str:
    lines = [f"{result['machine']['card']} ({result['machine']['device']}), torch {result['machine']['torch']}, "
             f"{result['model']['params'] / 1e9:.2f} B params, peak bf16 "
             f"{result['peak_bf16_tflops'] or 'unknown'} TFLOP/s",
             f"{'precision':27s} {'n_t':>3s} {'ckpt':>4s} {'s/step':>8s} {'tok/s':>9s} {'TFLOP/s':>8s} "
             f"{'MFU':>6s} {'peak GB':>8s}"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"{r['precision']:27s} {r['n_mc']:3d} {'on' if r['activation_checkpointing'] else 'off':>4s} "
                         f"skipped: {r['skipped']}")
            continue
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        mem = f"{r['peak_memory_bytes'] / 1e9:.1f}" if r["peak_memory_bytes"] is not None else "-"
        lines.append(f"{r['precision']:27s} {r['n_mc']:3d} {'on' if r['activation_checkpointing'] else 'off':>4s} "
                     f"{r['step_seconds']:8.3f} {r['train_tokens_per_s']:9.0f} {r['achieved_tflops_per_s']:8.3g} "
                     f"{mfu:>6s} {mem:>8s}")
    w = result["weight_transfer"]
    if w:
        d2h = w["device_to_host"]
        lines.append(f"weights device->host: {d2h['bytes'] / 1e9:.2f} GB at {d2h['gb_per_s']:.1f} GB/s")
        if w["broadcast"]:
            b = w["broadcast"]
            lines.append(f"weights broadcast ({b['backend']}): {b['bytes'] / 1e9:.2f} GB at {b['gb_per_s']:.1f} GB/s")
        if w.get("broadcast_note"):
            lines.append(w["broadcast_note"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (CI), same code path")
    p.add_argument("--out", help="JSON path (default bench/results/gpu_learner.json; dry run: the temp dir)")
    p.add_argument("--rows", type=int, help="completions per step (one micro-batch)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--gen-len", type=int)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, help="timed steps per row")
    p.add_argument("--transfer-repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="rows not started by then are recorded as skipped (the whole run stays under ~6 min)")
    args = p.parse_args(argv)
    small = args.dry_run
    args.rows = args.rows or (4 if small else 8)
    args.prompt_len = args.prompt_len or (16 if small else 256)
    args.gen_len = args.gen_len or (32 if small else 256)
    args.steps = args.steps or (1 if small else 3)
    if args.rows % 4:
        p.error("--rows must be a multiple of 4 (groups of 4 completions)")
    out = Path(args.out or (Path(tempfile.gettempdir()) / "gpu_learner_dry_run.json" if small
                            else ROOT / "bench/results/gpu_learner.json"))
    if not small and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or --dry-run for the CPU")
    if small:
        torch.set_num_threads(1)  # tiny matmuls: more threads only contend on a shared CI machine
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
