"""The learner group: N learner processes (one per GPU) that train one model sharded with FSDP2.

Why shard: LLaDA-8B in float32 master weights with AdamW is ~128 GB of weights, gradients and
moments before any activation; no one GPU holds it. `fully_shard` (FSDP2) splits every parameter,
its gradient and its optimizer state 1/N per rank along dim 0, so each rank holds ~128/N GB, and
all-gathers one transformer block's full weights just before that block runs (freeing them after),
so at most a block or two of full weights exist at a time (dlrl.models.blocks says which modules
are blocks).

No rank loads the whole model: each builds it empty (parameters on the meta device), shards it,
and reads only its own rows of every tensor from the checkpoint (dlrl.models.shard_load), so a
node holds about one copy of the weights whatever N (bench/load_rss.py).

Mixed precision here is FSDP's `MixedPrecisionPolicy`: the sharded masters stay float32 and are
cast to bf16 once per all-gather (half the bytes on the wire), gradients are reduce-scattered in
float32 (`reduce_dtype`) into the float32 shards. Autocast (dlrl.precision) still runs around
the forward so softmax-like ops and the ELBO sums stay in float32.

The gradient of a rank is the sum of its rows' shares of the *global* batch loss (learner.step
scales every piece by rows/N_global), and the reduce-scatter sums ranks (divide factor 1, not
FSDP's default mean), so the gradient equals the single-process full-batch gradient whatever N,
micro-batch and MC chunk (tests/test_learner_group.py). Every rank must run the same sequence of
collectives: a rank with fewer rows runs the same number of forward/backward passes, the extra ones
on a zero-weighted row (`PassPlan`).

Rank 0 ("the lead") alone talks to the queue; it broadcasts each step's groups to the other ranks
in the wire schema (dlrl.trajectory), over a gloo group so that it works beside NCCL too, and
every rank collates the same global batch. Nothing is pickled between ranks.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from dlrl.models.blocks import transformer_blocks
from dlrl.precision import autocast_dtype
from dlrl.weights.update import materialize, wire_tensor

GROUP_TIMEOUT_S = 1800.0
"""Longest a collective waits for a peer (a dead rank fails the others after this at worst; the
driver sees the dead rank's actor die at once and rebuilds the group)."""


@dataclass(frozen=True)
class Rank:
    """Where this process is in the learner group. `Rank()` is the single-process learner."""

    rank: int = 0
    world: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n rows (the first n % world ranks get one more)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def passes(self, n: int, per_pass: int) -> int:
        """Forward passes every rank runs over n global rows, per_pass rows at a time: the most any
        rank needs (rank 0 has the most rows), so all ranks issue the same collectives."""
        most = -(-n // self.world)
        return max(1, -(-most // per_pass))


def free_address() -> tuple[str, int]:
    """This node's address and a free TCP port for the group's rendezvous (rank 0 calls it)."""
    host = os.environ.get("DLRL_LEARNER_HOST") or _node_ip()
    with socket.socket() as s:
        s.bind((host, 0))
        return host, s.getsockname()[1]


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - outside Ray: loopback
        pass
    return "127.0.0.1"


def join(rank: Rank, host: str, port: int, device: torch.device) -> None:
    """Join the learner group's process group (NCCL on CUDA, gloo on the CPU), plus a gloo group
    for the lead's broadcast of each step's groups."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank.rank,
                            world_size=rank.world, timeout=timedelta(seconds=GROUP_TIMEOUT_S))


_CONTROL: dist.ProcessGroup | None = None


def control_group() -> dist.ProcessGroup:
    """A gloo group over the same ranks: CPU tensors (the groups' bytes) move over it beside NCCL."""
    global _CONTROL
    if _CONTROL is None:
        _CONTROL = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _CONTROL


def leave() -> None:
    global _CONTROL
    if dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL = None


def shard(model: nn.Module, compute_dtype: str, device: torch.device) -> nn.Module:
    """fully_shard every transformer block, then the root (embeddings, final norm, head); in place.

    Gradients are summed over ranks, not averaged (see the module docstring)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    low = autocast_dtype(compute_dtype, device.type)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32 if low else None)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor") and hasattr(module, "reshard"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


full = materialize
"""The whole tensor of a shard (an all-gather every rank must join, in the same order), or the
tensor itself when it is not sharded."""


def follow_gather(state: dict[str, torch.Tensor], skip_empty: bool, cast: torch.dtype | None = None) -> None:
    """What a non-lead rank runs while the lead gathers `state` tensor by tensor to publish it:
    the same all-gathers in manifest order (the object store's encode takes every tensor; the
    broadcast's bucket plan skips empty ones: `skip_empty`), of shards cast to `cast` as the lead
    casts them (dlrl.weights.update.wire_tensor), so every rank gathers the same dtype."""
    for value in state.values():
        if value.numel() or not skip_empty:
            wire_tensor(value, cast)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over sharded gradients: the norm of the whole gradient, on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    norm = full(norm)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum per-rank metric counters over the group."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_min(value: int, device: torch.device) -> int:
    """The smallest of the ranks' values."""
    t = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_blobs(blobs: list[bytes] | None) -> list[bytes]:
    """The lead's list of byte strings on every rank (the lead passes it, the others None)."""
    group = control_group()
    lead = dist.get_rank() == 0
    count = torch.tensor([len(blobs) if lead else 0], dtype=torch.long)
    dist.broadcast(count, 0, group=group)
    sizes = torch.tensor([len(b) for b in blobs] if lead else [0] * int(count), dtype=torch.long)
    dist.broadcast(sizes, 0, group=group)
    data = (torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if lead and int(sizes.sum())
            else torch.empty(int(sizes.sum()), dtype=torch.uint8))
    if data.numel():
        dist.broadcast(data, 0, group=group)
    if lead:
        return blobs
    raw = data.numpy().tobytes()
    out, at = [], 0
    for n in sizes.tolist():
        out.append(raw[at:at + n])
        at += n
    return out


def barrier() -> None:
    dist.barrier(group=control_group())
