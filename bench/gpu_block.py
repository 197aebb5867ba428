"""GPU benchmark of the block-diffusion path: the block engine's tokens/s and the block learner
step's time and peak memory, on a random-init SDAR-1.7B-shaped model (JetLM/SDAR-1.7B-Chat's
config.json: 2.03 B parameters, Qwen3 body, vocabulary 151,936, block 4).

Rows:
  - engine: rollout/engines/block.py in bfloat16 weights, prompt 128 + 256 generated, block 4,
    4 denoising steps per block, low-confidence dynamic remasking at threshold 0.9, T 1.0, top-k 50
    (the TraDo / DARE rollout settings), batch 1 / 8 / 32: tokens/s, forwards, peak memory;
  - learner: learner.step.train_step (BGPO, fp32 masters, bf16 autocast) on the BD3-LM layout
    [x_t ; x_0] (dlrl/block_elbo.py), 4 completions of 128 + 256 tokens, n_t 1 / 16 with mc_chunk 1:
    step seconds, tokens/s and peak memory. BGPO's claim is that the peak stays flat in n_t.

    python bench/gpu_block.py             # CUDA, ~3 min on an H100/H200, writes bench/results/gpu_block.json
    python bench/gpu_block.py --dry-run   # a tiny SDAR model on the CPU, < 1 min, writes to the temp dir
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
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
from dlrl.batch import collate_for  # noqa: E402
from dlrl.block_elbo import bd3_columns, block_size_of  # noqa: E402
from dlrl.config import TrainSpec  # noqa: E402
from dlrl.decoding import Decoding  # noqa: E402
from dlrl.models import SDARConfig, SDARForCausalLM, build_tiny_sdar, special_ids  # noqa: E402
from dlrl.models.families import model_family  # noqa: E402
from dlrl.models.special_ids import SpecialIds  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from learner.step import train_step  # noqa: E402
from rollout.engines import make_engine  # noqa: E402

SDAR_1_7B = fp.MODEL_CONFIGS / "JetLM--SDAR-1.7B-Chat.json"
BATCHES, DRY_BATCHES = (1, 8, 32), (1, 2, 4)
N_MC, DRY_N_MC = (1, 16), (1, 4)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def build(dry: bool, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, SpecialIds]:
    """The model (random weights) and its special ids."""
    if dry:
        model, tokenizer = build_tiny_sdar()
        return model.to(device=device, dtype=dtype), special_ids(model, tokenizer)
    cfg = json.loads(SDAR_1_7B.read_text())
    config = SDARConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")})
    torch.manual_seed(0)
    with torch.device(device):
        model = SDARForCausalLM(config).to(dtype)
    eos = (151645, 151643)  # generation_config.json: <|im_end|>, <|endoftext|>
    return model, SpecialIds(mask_id=151669, pad_id=151643, eos_ids=eos)


def engine_rows(model, ids: SpecialIds, device, batches, prompt_len: int, gen_len: int) -> list[dict]:
    decoding = Decoding(engine="block", gen_length=gen_len, block_length=4, steps=4,
                        block_remasking="low_confidence_dynamic", threshold=0.9, temperature=1.0, top_k=50)
    engine = make_engine(decoding, model, ids)
    vocab = model.config.vocab_size
    rows = []
    for b in batches:
        gen = torch.Generator(device="cpu").manual_seed(b)
        prompt = torch.randint(4, min(vocab, 150_000), (b, prompt_len), generator=gen).to(device)
        with torch.no_grad():
            engine.generate(prompt, None, decoding, torch.Generator(device="cpu").manual_seed(0))  # warm-up
            sync(device)
            reset_peak(device)
            t0 = time.perf_counter()
            sample, stats = engine.generate(prompt, None, decoding, torch.Generator(device="cpu").manual_seed(1))
            sync(device)
        seconds = time.perf_counter() - t0
        rows.append({"batch": b, "prompt_len": prompt_len, "gen_len": gen_len, "seconds": seconds,
                     "tokens_per_s": b * gen_len / seconds, "forwards": stats.forwards,
                     "committed": stats.committed, "peak_memory_bytes": peak(device),
                     "tokens_shape": list(sample.tokens.shape)})
    return rows


def make_batch(ids: SpecialIds, vocab: int, spec: TrainSpec, family, prompt_len: int, gen_len: int, device):
    rng = np.random.default_rng(spec.n_mc)
    group = TrajectoryGroup(group_id="g0", task="bench", prompt_id="0",
                            prompt_ids=rng.integers(4, min(vocab, 150_000), size=prompt_len),
                            completion_ids=rng.integers(4, min(vocab, 150_000), size=(4, gen_len)),
                            rewards=np.array([1.0, 0.0, 0.5, 0.0]), policy_version=0, mask_seed=0)
    return collate_for([group], spec, ids, family).to(device)


def learner_rows(model, ids: SpecialIds, device, n_mcs, prompt_len: int, gen_len: int, steps: int) -> list[dict]:
    family = model_family(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=False)
    rows = []
    for n_mc in n_mcs:
        spec = TrainSpec(n_mc=n_mc, mc_chunk=1, micro_batch=4, lr=1e-6, compute_dtype="bfloat16")
        batch = make_batch(ids, model.config.vocab_size, spec, family, prompt_len, gen_len, device)
        train_step(model, optimizer, batch, spec, ids.mask_id)  # warm-up (AdamW states allocated)
        sync(device)
        reset_peak(device)
        times, metrics = [], {}
        for _ in range(steps):
            t0 = time.perf_counter()
            metrics = train_step(model, optimizer, batch, spec, ids.mask_id)
            sync(device)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        noisy_from, clean_to = bd3_columns(batch.attention, batch.prompt_len, block_size_of(model))
        rows.append({"n_mc": n_mc, "rows": 4, "prompt_len": prompt_len, "gen_len": gen_len,
                     "input_tokens_per_forward": prompt_len + gen_len - noisy_from + clean_to,  # the cropped layout
                     "step_seconds": seconds,
                     "train_tokens_per_s": 4 * (prompt_len + gen_len) * n_mc / seconds,
                     "peak_memory_bytes": peak(device), "loss": metrics["loss"],
                     "grad_norm": metrics["grad_norm"],
                     "finite": bool(np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"]))})
    return rows


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny SDAR on the CPU (the same calls)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=2, help="timed learner steps per row")
    args = ap.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    out = args.out or (Path(tempfile.gettempdir()) / "gpu_block.json" if dry else ROOT / "bench/results/gpu_block.json")
    prompt_len, gen_len = (12, 16) if dry else (128, 256)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"

    model, ids = build(dry, device, torch.float32 if dry else torch.bfloat16)
    engine = engine_rows(model, ids, device, DRY_BATCHES if dry else BATCHES, prompt_len, gen_len)
    model = model.float()  # the learner keeps fp32 masters (dlrl/precision.py)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    learner = learner_rows(model, ids, device, DRY_N_MC if dry else N_MC, prompt_len, gen_len, args.steps)
    shape = fp.shape_from_config(model.config.to_dict())
    report = {
        "benchmark": "gpu_block", "dry_run": dry, "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": {"hostname": socket.gethostname(), "card": card, "device": device.type,
                    "torch": torch.__version__},
        "model": {"config": "tiny SDAR" if dry else str(SDAR_1_7B.relative_to(ROOT)), "params": shape.params(),
                  "block_size": 4},
        "engine": engine, "learner": learner,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    gib = 2**30
    print(f"{card}: SDAR-shaped, {shape.params() / 1e6:,.1f} M params, block 4")
    print(f"{'engine batch':>12} {'tokens/s':>10} {'forwards':>9} {'peak GiB':>9}")
    for r in engine:
        mem = f"{r['peak_memory_bytes'] / gib:9.1f}" if r["peak_memory_bytes"] else f"{'-':>9}"
        print(f"{r['batch']:>12} {r['tokens_per_s']:10.1f} {r['forwards']:9d} {mem}")
    print(f"{'learner n_t':>12} {'s/step':>10} {'tok/s':>9} {'peak GiB':>9}")
    for r in learner:
        mem = f"{r['peak_memory_bytes'] / gib:9.1f}" if r["peak_memory_bytes"] else f"{'-':>9}"
        print(f"{r['n_mc']:>12} {r['step_seconds']:10.2f} {r['train_tokens_per_s']:9.0f} {mem}")
    print(f"wrote {out}")
    return 0 if all(r["finite"] for r in learner) else 1


if __name__ == "__main__":
    sys.exit(main())
