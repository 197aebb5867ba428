"""Peak learner memory against the number of MC samples n_t: chunked BGPO vs the naive ELBO ratio,
for a full-attention family (the built-in model) and a block-diffusion one (SDAR, scored on its
BD3-LM [noisy ; clean] layout with Bernoulli(p) masks: dlrl.block_elbo).

Runs the learner's real `accumulate_gradients` (one batch, one backward pass per chunk) on the same
model and batch for every (algorithm, n_t), each in a fresh subprocess so that its peak RSS is its
own. Measures
  - on the CPU: the peak bytes of tensors saved for backward and alive at once (saved-tensor
    hooks, storages counted once), and the process's peak RSS;
  - on CUDA: torch.cuda.max_memory_allocated.
BGPO uses c = 1 (one MC sample per backward); the naive ratio keeps all n_t graphs alive.

The output file holds one entry per family under "families"; a run replaces only its own
family's entry and keeps the others (an older single-family file becomes the "tiny" entry).

    python bench/memory.py                  # CPU, the built-in model, into bench/results/memory.json
    python bench/memory.py --family block   # CPU, a same-sized SDAR model, its own entry in the same file
    python bench/memory.py --device cuda --hidden 1024 --layers 8 --out bench/results/memory_cuda.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl.batch import collate, time_form_for  # noqa: E402
from dlrl.config import TrainSpec  # noqa: E402
from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel  # noqa: E402
from dlrl.models.families import model_family  # noqa: E402
from dlrl.models.sdar import SDARConfig, SDARForCausalLM  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from learner.step import accumulate_gradients, old_policy_terms  # noqa: E402

MASK_ID, PAD_ID, EOS_ID = 2, 0, 1
N_MC = [1, 2, 4, 8, 16]


class SavedTensorMeter:
    """Tracks bytes of autograd-saved tensors alive at once (each storage counted once)."""

    def __init__(self) -> None:
        self.live: dict[int, list[int]] = {}
        self.current = 0
        self.peak = 0

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        return _Held(self, key, tensor)

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda held: held.tensor)


class _Held:
    __slots__ = ("meter", "key", "tensor")

    def __init__(self, meter: SavedTensorMeter, key: int, tensor: torch.Tensor) -> None:
        self.meter, self.key, self.tensor = meter, key, tensor

    def __del__(self) -> None:
        self.meter.release(self.key)


def make_groups(n_groups: int, group_size: int, prompt_len: int, gen_len: int, vocab: int):
    rng = np.random.default_rng(0)
    return [
        TrajectoryGroup(
            group_id=f"g{k}", task="bench", prompt_id=str(k),
            prompt_ids=rng.integers(4, vocab, size=prompt_len),
            completion_ids=rng.integers(4, vocab, size=(group_size, gen_len)),
            rewards=rng.random(group_size), policy_version=0, mask_seed=k,
        )
        for k in range(n_groups)
    ]


def measure(args: argparse.Namespace) -> dict:
    """One (algorithm, n_mc) measurement in this process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    sizes = dict(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8)
    if args.family == "block":
        cfg = SDARConfig(**sizes, num_key_value_heads=args.heads, head_dim=args.hidden // args.heads, block_size=4,
                         mask_token_id=MASK_ID, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None)
        model = SDARForCausalLM(cfg).to(device)
    else:
        model = BidirectionalModel(BidirectionalConfig(**sizes)).to(device)
    n_mc = args.n_mc
    algorithm = args.algorithm
    spec = TrainSpec(
        algorithm=algorithm, n_mc=n_mc, mc_chunk=1, micro_batch=args.batch,
        clip_eps=0.2, dual_clip=3.0,
    )
    time_form = time_form_for(spec, model_family(model))  # the form each family was trained with
    groups = make_groups(max(args.batch // 4, 1), min(args.batch, 4), args.prompt_len, args.gen_len, args.vocab)
    batch = collate(groups, pad_id=PAD_ID, eos_ids=(EOS_ID,), n_mc=n_mc, time_form=time_form).to(device)
    old = old_policy_terms(model, batch, spec, MASK_ID)
    meter = SavedTensorMeter()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with meter.hooks():
        accumulate_gradients(model, batch, old, spec, MASK_ID)
    out = {
        "algorithm": algorithm,
        "n_mc": n_mc,
        "saved_tensor_peak_bytes": meter.peak,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        out["cuda_peak_above_start_bytes"] = torch.cuda.max_memory_allocated() - base
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--family", choices=("tiny", "block"), default="tiny",
                   help="tiny: the built-in full-attention model; block: a same-sized SDAR, block diffusion on "
                        "the BD3-LM layout")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="completions per batch (one micro-batch)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--gen-len", type=int, default=96)
    p.add_argument("--out", default=str(ROOT / "bench/results/memory.json"))
    p.add_argument("--algorithm", help=argparse.SUPPRESS)
    p.add_argument("--n-mc", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.algorithm:  # child: one measurement, JSON on stdout
        print(json.dumps(measure(args)))
        return

    rows = []
    for algorithm in ("bgpo", "naive_elbo"):
        for n_mc in N_MC:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--algorithm", algorithm, "--n-mc", str(n_mc)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            rows.append(res)
            extra = f"  cuda {res['cuda_peak_above_start_bytes'] / 2**20:8.1f} MiB" if "cuda_peak_above_start_bytes" in res else ""
            print(f"{algorithm:11s} n_t={n_mc:2d}  saved {res['saved_tensor_peak_bytes'] / 2**20:8.2f} MiB"
                  f"  rss {res['peak_rss_bytes'] / 2**20:8.1f} MiB{extra}", flush=True)

    key = "cuda_peak_above_start_bytes" if args.device.startswith("cuda") else "saved_tensor_peak_bytes"

    def growth(alg: str) -> float:
        by = {r["n_mc"]: r[key] for r in rows if r["algorithm"] == alg}
        return by[max(N_MC)] / by[1]

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or platform.machine()
    result = {
        "benchmark": "learner peak memory vs n_t (BGPO c=1 vs naive ELBO ratio)",
        "family": args.family,
        "layout": ("[noisy ; clean] cropped to the columns the response depends on (bd3_columns), bd3_mask"
                   if args.family == "block" else "T tokens, full attention"),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"device": args.device, "name": device_name, "cpus": __import__("os").cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "setup": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "batch", "prompt_len", "gen_len")},
        "metric": key,
        "rows": rows,
        "bgpo_growth_16_over_1": growth("bgpo"),
        "naive_growth_16_over_1": growth("naive_elbo"),
        "targets": {"bgpo_growth_max": 1.10, "naive_growth_min": 8.0},
    }
    result["targets_met"] = result["bgpo_growth_16_over_1"] <= 1.10 and result["naive_growth_16_over_1"] >= 8.0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(out.read_text()) if out.is_file() else {}
    families = existing.get("families") or ({"tiny": existing} if existing.get("rows") else {})
    families[args.family] = result
    out.write_text(json.dumps({"benchmark": result["benchmark"], "families": families}, indent=2) + "\n")
    print(f"BGPO growth x{result['bgpo_growth_16_over_1']:.3f}, naive growth x{result['naive_growth_16_over_1']:.2f}"
          f" -> {'targets met' if result['targets_met'] else 'TARGETS MISSED'}; wrote {args.out}")


if __name__ == "__main__":
    main()
