"""Seconds and bytes per weight sync, per transport, learner -> 2 workers on one machine.

Starts its own Ray head (tests.local_cluster.RayHead, stopped at the end); the learner side and
each worker are separate Ray actors (processes). For each state (the tiny Sudoku model's, and a
synthetic float32 state of --mb megabytes) and each transport, it syncs --versions new versions
and reports the median seconds:
  - object_store: dlrl.weights.publish (raw bytes as numpy, zero-copy reads) -> WeightReceiver;
  - object_store_torch: the same state put as a dict of torch tensors (pickled through the store),
    fetched and copied into the worker's tensors: the format dlrl.weights does not use;
  - collective_gloo: dlrl.weights CollectiveSender/Receiver broadcast, default and small buckets.
Worker seconds include writing into the worker's tensors; the learner side is publish (encode +
put) or the broadcast.

    python bench/weight_sync.py            # writes bench/results/weight_sync.json (about a minute)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dlrl  # noqa: E402,F401  (sets Ray's auth mode before ray is imported)
import ray  # noqa: E402

from tests.local_cluster import RayHead  # noqa: E402
from dlrl.weights import CollectiveReceiver, CollectiveSender, WeightReceiver, publish  # noqa: E402


def tiny_state() -> dict[str, torch.Tensor]:
    from dlrl.models import load_model

    model, _ = load_model("builtin:tiny-sudoku")
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def synthetic_state(mb: float, tensors: int = 16) -> dict[str, torch.Tensor]:
    n = int(mb * 2**20 / 4 / tensors)
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(n, generator=g) for i in range(tensors)}


def like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


@ray.remote(num_cpus=0.1)
class Side:
    """One process: the learner's state (sender) or a worker's tensors (receiver)."""

    def __init__(self, state: dict[str, torch.Tensor], receiver: bool) -> None:
        self.state = like(state) if receiver else state
        self.receiver = WeightReceiver(self.state)
        self.link: CollectiveSender | CollectiveReceiver | None = None

    def bump(self) -> None:
        for t in self.state.values():
            t.add_(1.0)

    # object store ---------------------------------------------------------------------------
    def publish(self, version: int):
        return publish(version, self.state)

    def put_torch(self) -> tuple[list, float]:
        t0 = time.perf_counter()
        return [ray.put(self.state)], time.perf_counter() - t0

    def receive(self, handle) -> tuple[float, int]:
        stats = self.receiver.receive(handle)
        return stats.seconds, stats.bytes

    def receive_torch(self, refs: list) -> tuple[float, int]:
        t0 = time.perf_counter()
        incoming = ray.get(refs[0])
        with torch.no_grad():
            for k, v in incoming.items():
                self.state[k].copy_(v)
        return time.perf_counter() - t0, sum(v.numel() * v.element_size() for v in incoming.values())

    # collective -----------------------------------------------------------------------------
    def open(self, world_size: int, bucket_mb: float):
        self.link = CollectiveSender(world_size, bucket_mb=bucket_mb, backend="gloo", timeout_s=60)
        return self.link.address

    def join(self, address=None, rank: int = 0) -> None:
        if address is not None:
            self.link = CollectiveReceiver(address, rank)
        self.link.join()

    def send(self, version: int) -> tuple[float, int]:
        stats = self.link.send(version, self.state)
        return stats.seconds, stats.bytes

    def recv(self, version: int) -> tuple[float, int]:
        stats = self.link.recv_into(self.state, version - 1)
        return stats.seconds, stats.bytes

    def close(self) -> None:
        if self.link is not None:
            self.link.close()

    def digest(self) -> float:
        return float(sum(t.double().sum() for t in self.state.values()))


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def run_state(name: str, state: dict[str, torch.Tensor], versions: int, workers: int,
              small_bucket_mb: float) -> list[dict]:
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    rows = []
    learner = Side.remote(state, receiver=False)
    receivers = [Side.remote(state, receiver=True) for _ in range(workers)]

    pub, recv = [], []
    for v in range(1, versions + 1):
        ray.get(learner.bump.remote())
        handle = ray.get(learner.publish.remote(v))
        pub.append(handle.publish_seconds)
        recv += [s for s, _ in ray.get([r.receive.remote(handle) for r in receivers])]
    rows.append(dict(state=name, transport="object_store", bytes=nbytes, learner_seconds=median(pub),
                     worker_seconds=median(recv)))

    pub, recv = [], []
    for _ in range(versions):
        ray.get(learner.bump.remote())
        refs, put_s = ray.get(learner.put_torch.remote())
        pub.append(put_s)
        recv += [s for s, _ in ray.get([r.receive_torch.remote(refs) for r in receivers])]
    rows.append(dict(state=name, transport="object_store_torch", bytes=nbytes, learner_seconds=median(pub),
                     worker_seconds=median(recv)))

    for bucket_mb in (256.0, small_bucket_mb):
        address = ray.get(learner.open.remote(workers + 1, bucket_mb))
        ray.get([learner.join.remote()] + [r.join.remote(address, i) for i, r in enumerate(receivers, 1)])
        send, recv = [], []
        for v in range(versions + 1, 2 * versions + 1):
            ray.get(learner.bump.remote())
            (s, _), *got = ray.get([learner.send.remote(v)] + [r.recv.remote(v) for r in receivers])
            send.append(s)
            recv += [s for s, _ in got]
        ray.get([a.close.remote() for a in [learner, *receivers]])
        rows.append(dict(state=name, transport=f"collective_gloo bucket_mb={bucket_mb:g}", bytes=nbytes,
                         learner_seconds=median(send), worker_seconds=median(recv)))
    digests = ray.get([a.digest.remote() for a in [learner, *receivers]])
    assert len(set(digests)) == 1, f"workers diverged from the learner: {digests}"
    for a in [learner, *receivers]:
        ray.kill(a)
    for r in rows:
        r["worker_MB_per_s"] = r["bytes"] / 2**20 / r["worker_seconds"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=64.0, help="size of the synthetic state")
    ap.add_argument("--versions", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/weight_sync.json"))
    args = ap.parse_args()

    head = RayHead(object_store_bytes=int(max(400, 6 * args.mb) * 2**20)).start()
    try:
        ray.init(address=head.address, logging_level="ERROR", log_to_driver=False)
        rows = run_state("tiny-sudoku", tiny_state(), args.versions, args.workers, small_bucket_mb=0.25)
        rows += run_state(f"synthetic-{args.mb:g}MB", synthetic_state(args.mb), args.versions, args.workers,
                          small_bucket_mb=4.0)
    finally:
        ray.shutdown()
        head.cleanup()
    for r in rows:
        print(f"{r['state']:>18} {r['transport']:<32} {r['bytes'] / 2**20:8.2f} MB  learner "
              f"{r['learner_seconds'] * 1e3:8.2f} ms  worker {r['worker_seconds'] * 1e3:8.2f} ms  "
              f"{r['worker_MB_per_s']:8.0f} MB/s")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = {
        "benchmark": "weight sync: seconds and bytes per version, learner -> workers on one machine",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"device": "cpu", "name": platform.machine(), "cpus": __import__("os").cpu_count(),
                    "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version()},
        "setup": {"versions": args.versions, "workers": args.workers, "statistic": "median over versions"
                  " (worker: over versions x workers)"},
        "note": "one shared 2-core machine: single timings vary up to 2x between runs; the orderings "
                "object_store < object_store_torch and object_store < collective_gloo hold in every run",
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
