"""Host memory of a learner group's model load: peak RSS per rank of a 2-rank gloo group on the CPU,
BEFORE (every rank loads the whole checkpoint with `load_model`, then FSDP2 shards it: the path the
group took until issue 19) and AFTER (every rank builds the model empty, shards it and reads only
its own rows: `load_empty_model` + `DeferredWeights.load`, what learner.train.Learner now does).

The checkpoint is a random LLaDA-shaped model written with the project's `save_checkpoint`, large
enough (~420 MB as float32 masters by default) that it, not the interpreter and its libraries,
dominates each process's RSS, and stored twice: in bfloat16 (as LLaDA-8B-Instruct is published; the
learner's float32 masters are a cast copy) and in float32 (a learner's own checkpoint). Each (mode, rank) is a fresh spawned process, so its high-water mark is its own:
VmHWM from /proc/self/status at the end, less VmRSS just before the load (the imports, the same in
both modes), is what the load cost. A sampling thread also records the peak of RssAnon (the
process's own tensors) and RssFile (safetensors' mmapped pages, shared with the page cache) apart.

    python bench/load_rss.py     # ~3 min on 2 cores, writes bench/results/load_rss.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl.models import LLaDAConfig, LLaDAModelLM, build_char_tokenizer, load_empty_model, load_model  # noqa: E402
from dlrl.models import save_checkpoint  # noqa: E402
from learner import sharding  # noqa: E402
from learner.sharding import Rank  # noqa: E402

MODES = ("before", "after")
STORED = ("bfloat16", "float32")
"""Checkpoint dtypes measured: bfloat16 is how LLaDA-8B-Instruct is published (the paper job loads it
into float32 masters, a cast copy); float32 is a learner's own checkpoint (the whole load maps the
file and copies nothing)."""
MB = 2**20


def status_kb(*fields: str) -> dict[str, int]:
    """Fields of /proc/self/status, in kB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


class Sampler(threading.Thread):
    """Peak RssAnon and RssFile, sampled every millisecond (VmHWM has only their sum)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = status_kb("RssAnon", "RssFile")
        self.running = True

    def run(self) -> None:
        while self.running:
            for key, kb in status_kb("RssAnon", "RssFile").items():
                self.peak[key] = max(self.peak[key], kb)
            time.sleep(0.001)


def load(mode: str, path: str) -> torch.nn.Module:
    """The group rank's load in `mode`, ending with the model sharded and filled."""
    device = torch.device("cpu")
    if mode == "before":
        model, _ = load_model(path, dtype=torch.float32, device=device)
        sharding.shard(model, "float32", device)
        return model
    model, _, deferred = load_empty_model(path, dtype=torch.float32, device=device)
    sharding.shard(model, "float32", device)
    deferred.load(model, device)
    return model


def rank_main(rank: int, world: int, port: int, mode: str, path: str, out: str) -> None:
    torch.set_num_threads(1)
    sharding.join(Rank(rank, world), "127.0.0.1", port, torch.device("cpu"))
    try:
        sharding.barrier()
        start = status_kb("VmRSS", "RssAnon", "RssFile")
        sampler = Sampler()
        sampler.start()
        t0 = time.perf_counter()
        model = load(mode, path)
        sharding.barrier()
        seconds = time.perf_counter() - t0
        sampler.running = False
        sampler.join()
        end = status_kb("VmRSS", "VmHWM")
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                    for p in model.parameters())
        Path(out, f"{mode}-{rank}.json").write_text(json.dumps({
            "rank": rank, "rss_before_load_mb": start["VmRSS"] / 1024, "vmhwm_mb": end["VmHWM"] / 1024,
            "load_peak_mb": (end["VmHWM"] - start["VmRSS"]) / 1024,
            "private_peak_mb": (sampler.peak["RssAnon"] - start["RssAnon"]) / 1024,
            "file_peak_mb": (sampler.peak["RssFile"] - start["RssFile"]) / 1024,
            "rss_after_load_mb": end["VmRSS"] / 1024, "own_weights_mb": local / MB, "load_seconds": round(seconds, 2),
        }))
    finally:
        sharding.leave()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(path: Path, hidden: int, layers: int, vocab: int, dtype: torch.dtype) -> int:
    """A random LLaDA-shaped checkpoint stored in `dtype` at `path`; its weight bytes."""
    config = LLaDAConfig(d_model=hidden, n_heads=hidden // 64, n_kv_heads=hidden // 64, n_layers=layers,
                         mlp_hidden_size=hidden * 11 // 4, vocab_size=vocab, embedding_size=vocab,
                         mask_token_id=3, pad_token_id=0, eos_token_id=1)
    model = LLaDAModelLM(config).to(dtype)
    save_checkpoint(model, build_char_tokenizer(), path)
    del model
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def measure(path: Path, ranks: int, work: Path) -> dict:
    """Both modes on the checkpoint at `path`: per-rank rows, their sums and the after/before ratios."""
    rows = {}
    for mode in MODES:
        mp.start_processes(rank_main, args=(ranks, free_port(), mode, str(path), str(work)),
                           nprocs=ranks, join=True, start_method="spawn")
        per_rank = [json.loads((work / f"{mode}-{r}.json").read_text()) for r in range(ranks)]
        rows[mode] = {"ranks": per_rank,
                      "sum_load_peak_mb": sum(r["load_peak_mb"] for r in per_rank),
                      "sum_private_peak_mb": sum(r["private_peak_mb"] for r in per_rank)}
    rows["ratios_after_over_before"] = {
        "load_peak_per_rank": [a["load_peak_mb"] / b["load_peak_mb"]
                               for a, b in zip(rows["after"]["ranks"], rows["before"]["ranks"])],
        "vmhwm_per_rank": [a["vmhwm_mb"] / b["vmhwm_mb"] for a, b in zip(rows["after"]["ranks"], rows["before"]["ranks"])],
        "sum_load_peak": rows["after"]["sum_load_peak_mb"] / rows["before"]["sum_load_peak_mb"],
        "sum_private_peak": rows["after"]["sum_private_peak_mb"] / rows["before"]["sum_private_peak_mb"],
    }
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "bench/results/load_rss.json"))
    args = p.parse_args()

    cases = {}
    for stored in STORED:
        work = Path(tempfile.mkdtemp(prefix="load_rss-"))
        try:
            ckpt_mb = write_checkpoint(work / "ckpt", args.hidden, args.layers, args.vocab, getattr(torch, stored)) / MB
            print(f"\ncheckpoint: {ckpt_mb:.0f} MB of {stored} (LLaDA-shaped: d_model {args.hidden}, {args.layers} "
                  f"layers, vocab {args.vocab}), loaded as float32 masters by {args.ranks} ranks")
            case = {"checkpoint_dtype": stored, "checkpoint_mb": ckpt_mb, "float32_model_mb": ckpt_mb * 4 / _bytes(stored),
                    **measure(work / "ckpt", args.ranks, work)}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        for mode in MODES:
            case[mode]["sum_load_peak_over_checkpoint"] = case[mode]["sum_load_peak_mb"] / ckpt_mb
            case[mode]["sum_private_peak_over_checkpoint"] = case[mode]["sum_private_peak_mb"] / ckpt_mb
            case[mode]["sum_private_peak_over_float32_model"] = case[mode]["sum_private_peak_mb"] / case["float32_model_mb"]
        cases[stored] = case
        print(f"{'':8}{'rank':>5}{'VmHWM':>8}{'load peak':>11}{'private':>9}{'mmapped':>9}{'RSS after':>11}"
              f"{'own weights':>13}{'s':>6}   (MB)")
        for mode in MODES:
            for r in case[mode]["ranks"]:
                print(f"{mode:8}{r['rank']:>5}{r['vmhwm_mb']:>8.0f}{r['load_peak_mb']:>11.0f}{r['private_peak_mb']:>9.0f}"
                      f"{r['file_peak_mb']:>9.0f}{r['rss_after_load_mb']:>11.0f}{r['own_weights_mb']:>13.0f}"
                      f"{r['load_seconds']:>6.1f}")
        for mode in MODES:
            c = case[mode]
            print(f"{mode}: load peaks sum to {c['sum_load_peak_mb']:.0f} MB = {c['sum_load_peak_over_checkpoint']:.2f} x "
                  f"the checkpoint; private (anonymous) peaks to {c['sum_private_peak_mb']:.0f} MB = "
                  f"{c['sum_private_peak_over_checkpoint']:.2f} x the checkpoint = "
                  f"{c['sum_private_peak_over_float32_model']:.2f} x the float32 model")
        ratios = case["ratios_after_over_before"]
        print("after / before: load peak per rank " + ", ".join(f"{x:.2f}" for x in ratios["load_peak_per_rank"])
              + f"; summed private peaks {ratios['sum_private_peak']:.2f}")

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    result = {
        "what": "host RSS of a learner group's model load per rank, before (whole load, then shard) and after "
                "(empty model, shard, read own rows). load_peak = VmHWM at the end - VmRSS before the load; "
                "private = peak RssAnon - RssAnon before (the rank's own memory); mmapped = peak RssFile - RssFile "
                "before (safetensors' mapped file pages: page cache, shared by the ranks of a node)",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"device": "cpu", "name": platform.processor() or platform.machine(), "cpus": mp.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "model": {"family": LLaDAConfig.model_type, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab,
                  "masters": "float32"},
        "ranks": args.ranks,
        "cases": cases,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _bytes(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


if __name__ == "__main__":
    main()
