"""Peak sampler memory: the reference sampler vs the cached engine, big vocabulary, tiny body.

The reference sampler (rollout/sampler.py) projects every position of every row onto the
vocabulary at every step and draws float64 Gumbel noise and a float32 softmax over all of them:
its temporaries are (B, T, V), T = prompt + gen_length. The cached engine (rollout/engines/cached.py)
projects only the current block and draws noise and softmax only over its masked positions:
(N, V), N <= B x block_length. With LLaDA's 126,464-token vocabulary and a tiny random body
(hidden 64, 2 layers) the head and these temporaries are all the memory there is, so this bench
isolates exactly what the issue is about.

Method (CPU): every measurement is one fresh Python process that builds the same random model and
prompts, runs the engine's `generate` (rollout.engines, the real entry point, temperature 1.0 and
"low_confidence" remasking: the RL rollout's float64 noise plus the softmax, the worst case), and
exits; the parent reads that child's peak resident set size from `os.wait4`'s rusage
(ru_maxrss, the kernel's high-water mark, so every short-lived temporary counts). A "baseline"
child does everything but the generate call (torch, the model, the prompts); the sampler's peak
is the engine's peak minus the baseline's. Each run takes two steps per block, so it contains
each engine's worst step: the reference's steps all have the same (B, T, V) shape, and the
cached engine's worst is a block's refresh, where the whole block is still masked.

The reference at LLaDA's shape (batch 32, prompt 64 + 256, 126,464 vocabulary) needs tens of GB
for its (B, T, V) temporaries: more than this shared 24 GB machine can give. So the cached engine
is measured at that shape directly, and the reference at batch 32 with the same vocabulary and
block but shorter sequences (T = 36, 40, 48: one block of 32 after a 4-16 token prompt); its peak
is linear in B x T (every temporary is (B, T, V)), which the measured points show, and the fit is
evaluated at T = 320 — stated as extrapolated in the JSON. The cached engine is also measured at
the reference's short shapes, so the ratio at equal shape is measured too.

    python bench/sampler_memory.py            # about 5 minutes on one busy core; peak ~9 GB
    python bench/sampler_memory.py --out /tmp/m.json --reference-prompts 8

Adds a "sampler_memory" section to bench/results/rollout_speed.json (machine, date, commit).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VOCAB, BATCH, BLOCK = 126_464, 32, 32
BODY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
LLADA_SHAPE = {"prompt": 64, "gen_length": 256}  # LLaDA's GSM8K-style shape (the target's)


def child(engine: str, batch: int, prompt: int, gen: int, steps: int) -> None:
    """One measurement in this (fresh) process: build, optionally generate, report, exit."""
    import torch

    from dlrl.decoding import Decoding
    from dlrl.models import SpecialIds
    from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
    from rollout.engines import make_engine

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = BidirectionalConfig(vocab_size=VOCAB, max_position_embeddings=prompt + gen, **BODY)
    model = BidirectionalModel(cfg).eval()
    ids = SpecialIds(mask_id=cfg.mask_token_id, pad_id=cfg.pad_token_id, eos_ids=(cfg.eos_token_id,))
    x = torch.randint(4, VOCAB, (batch, prompt))
    seconds = 0.0
    if engine != "baseline":
        decoding = Decoding(gen_length=gen, block_length=BLOCK, steps=steps, temperature=1.0,
                            remasking="low_confidence", engine=engine, cache="dual")
        t0 = time.perf_counter()
        with torch.no_grad():
            sample, _ = make_engine(decoding, model, ids).generate(x, None, decoding, torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - t0
        assert sample.tokens.shape == (batch, prompt + gen)
    print(json.dumps({"seconds": seconds}), flush=True)


def measure(engine: str, batch: int, prompt: int, gen: int, steps: int) -> dict:
    """Peak RSS (bytes) of a fresh child running `child(...)`, from os.wait4's rusage."""
    cmd = [sys.executable, __file__, "--child", engine, str(batch), str(prompt), str(gen), str(steps)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}")
    row = {"engine": engine, "batch": batch, "prompt": prompt, "gen_length": gen, "total_length": prompt + gen,
           "block_length": BLOCK, "steps": steps, "peak_rss_bytes": usage.ru_maxrss * 1024,  # Linux: KiB
           **json.loads(out.strip().splitlines()[-1])}
    print(f"{engine:9s} B {batch} T {prompt}+{gen}  peak RSS {row['peak_rss_bytes'] / 2**30:6.2f} GiB  "
          f"({row['seconds']:.1f} s)", flush=True)
    return row


def run(reference_prompts: list[int], gen_short: int) -> dict:
    rows: dict[str, list[dict]] = {"baseline": [], "reference": [], "cached": []}
    llada_gen = LLADA_SHAPE["gen_length"]
    two_steps = 2 * llada_gen // BLOCK  # two steps a block: each block's refresh and one block step
    rows["baseline"].append(measure("baseline", BATCH, LLADA_SHAPE["prompt"], llada_gen, two_steps))
    rows["cached"].append(measure("cached", BATCH, LLADA_SHAPE["prompt"], llada_gen, two_steps))
    for p in reference_prompts:
        steps = 2 * gen_short // BLOCK
        rows["baseline"].append(measure("baseline", BATCH, p, gen_short, steps))
        rows["reference"].append(measure("reference", BATCH, p, gen_short, steps))
        rows["cached"].append(measure("cached", BATCH, p, gen_short, steps))

    def base(r: dict) -> int:
        return next(b["peak_rss_bytes"] for b in rows["baseline"]
                    if (b["prompt"], b["gen_length"]) == (r["prompt"], r["gen_length"]))

    for name in ("reference", "cached"):
        for r in rows[name]:
            r["sampler_peak_bytes"] = r["peak_rss_bytes"] - base(r)
    # The reference's sampler peak is linear in the number of projected positions B x T.
    ref = rows["reference"]
    n = np.array([r["batch"] * r["total_length"] for r in ref], dtype=float)
    peak = np.array([r["sampler_peak_bytes"] for r in ref], dtype=float)
    slope, intercept = map(float, np.polyfit(n, peak, 1))
    residual = float(np.max(np.abs(peak - (slope * n + intercept)) / peak))
    llada_total = LLADA_SHAPE["prompt"] + llada_gen
    ref_llada = slope * BATCH * llada_total + intercept
    cached_llada = rows["cached"][0]["sampler_peak_bytes"]
    equal = [(r, next(c for c in rows["cached"] if c["total_length"] == r["total_length"])) for r in ref]
    return {
        "method": "peak RSS (os.wait4 rusage ru_maxrss) of one fresh process per measurement running "
                  "rollout.engines engine.generate (temperature 1.0, low_confidence remasking, 2 steps per block); "
                  "sampler peak = that minus the peak of a baseline process that builds the same model and "
                  "prompts and does not generate",
        "model": {"vocab_size": VOCAB, **BODY, "init": "random (seed 0)", "dtype": "float32"},
        "batch": BATCH, "block_length": BLOCK,
        "target_shape": {"batch": BATCH, **LLADA_SHAPE, "block_length": BLOCK},
        "rows": rows,
        "reference_fit": {"sampler_peak_bytes_per_position": slope, "intercept_bytes": intercept,
                          "bytes_per_position_per_vocab_entry": slope / VOCAB,
                          "max_relative_residual": residual,
                          "positions_measured": n.astype(int).tolist()},
        "at_target_shape": {
            "reference_sampler_peak_bytes": ref_llada,
            "reference_source": f"extrapolated: linear fit over the measured B x T above, at B x T = "
                                f"{BATCH * llada_total} (too big to measure on this machine)",
            "cached_sampler_peak_bytes": cached_llada,
            "cached_source": "measured at the target shape",
            "ratio": ref_llada / cached_llada,
        },
        "at_equal_shape_ratio": {f"T={r['total_length']}": r["sampler_peak_bytes"] / c["sampler_peak_bytes"]
                                 for r, c in equal},
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        engine, *shape = sys.argv[2:]
        child(engine, *map(int, shape))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-prompts", type=int, nargs="+", default=[4, 8, 16],
                   help="prompt lengths of the reference's measured shapes (each + --gen-short)")
    p.add_argument("--gen-short", type=int, default=BLOCK, help="gen_length of the reference's shapes")
    p.add_argument("--out", default=str(ROOT / "bench/results/rollout_speed.json"))
    args = p.parse_args()
    section = run(args.reference_prompts, args.gen_short)
    section["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    section["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                       text=True).stdout.strip()
    section["machine"] = {"device": "cpu", "cpus": os.cpu_count(), "threads": 1,
                          "processor": platform.processor() or platform.machine(),
                          "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                          "python": platform.python_version(), "load_average_at_end": os.getloadavg()}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["sampler_memory"] = section
    ratio = section["at_target_shape"]["ratio"]
    result.setdefault("targets", {})["sampler_memory_10x_lower_at_batch_32"] = bool(ratio >= 10)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"reference {section['at_target_shape']['reference_sampler_peak_bytes'] / 2**30:.2f} GiB (extrapolated) vs "
          f"cached {section['at_target_shape']['cached_sampler_peak_bytes'] / 2**30:.2f} GiB: {ratio:.1f}x lower")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
