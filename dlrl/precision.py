"""Mixed precision: float32 master weights and optimizer state in the learner, bf16 compute, and
rollout weights in the compute dtype.

Why not train in bf16 outright: bf16 keeps 8 significant bits, so a weight w moves only if an
update exceeds about |w| * 2^-9. AdamW's update is about lr per step (sign-like), so at the paper's
lr 5e-7 a weight of typical size 1e-2 would need updates ~40x larger: almost every update is
rounded away and the run does not learn (tests/test_precision.py measures it). The standard
remedy (Micikevicius et al. 2018, "Mixed Precision Training") keeps the weights the optimizer
updates (the masters) in float32 and runs only the matmuls in bf16: `torch.autocast` casts each
weight to bf16 on its way into a matmul (the cast is cached for the forward), gradients flow back
into the float32 masters, and AdamW's moments live in float32 beside them.

Spelled in the spec as `model.dtype` (the masters) and `train.compute_dtype` (what autocast
computes in). Full fine-tuning with bf16/fp16 masters is refused when the spec is validated
(dlrl.config); LoRA over a bf16 base is fine, since peft keeps the adapters (the only trainable,
optimizer-updated weights) in float32 (`autocast_adapter_dtype=True`, its default).

Rollout workers never update weights, so they need no masters: they hold (and sample, evaluate and
measure behaviour terms with) the weights in the dtype the learner computes in, `rollout_dtype`:
bf16 on GPUs, half the memory of float32 masters and bf16 tensor cores on the path that dominates
an RL step, while the learner keeps float32 masters. Each weights version is cast once, on the
learner's side, and travels in that dtype (dlrl.weights: half the bytes of float32). On the CPU
"auto" computes in the masters' dtype, so CPU runs keep float32 workers, as before.

In the core because the ELBO terms (dlrl.elbo_terms) run under this autocast in both places that
measure them: the learner and a rollout worker's behaviour-policy pass.
"""

from __future__ import annotations

import contextlib

import torch

LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}
"""Compute dtypes that autocast lowers matmuls to."""
MASTER_OK = (torch.float32, torch.float64)
"""Dtypes in which AdamW's small updates survive rounding (see the module docstring)."""


def autocast_dtype(compute_dtype: str, device_type: str) -> torch.dtype | None:
    """The dtype autocast runs matmuls in, or None for no autocast (compute in the weights' dtype).

    "auto" keeps the behaviour from before `compute_dtype` existed: bf16 on CUDA, none on the
    CPU. "float32" / "float64" mean no autocast (config validation makes them equal the masters).
    """
    if compute_dtype == "auto":
        return torch.bfloat16 if device_type == "cuda" else None
    return LOW_PRECISION.get(compute_dtype)


def autocast(device: torch.device, compute_dtype: str = "auto") -> contextlib.AbstractContextManager:
    """The forward's precision context on `device`: torch.autocast, or nothing.

    CPU autocast supports bf16 (and fp16 since torch 2.x) with the same op lists as CUDA: matmuls
    and SDPA in the low dtype, reductions and softmax-like ops in float32.
    """
    dtype = autocast_dtype(compute_dtype, device.type)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def rollout_dtype(model_dtype: str, compute_dtype: str, device_type: str) -> torch.dtype:
    """The dtype rollout workers hold the policy's weights in on a `device_type` device: the dtype
    the learner's matmuls run in there (`autocast_dtype`), or the masters' own dtype where it runs
    none ("auto" on the CPU, "float32", "float64").

    Both ends of weight sync derive it from the spec and their device, the learner to cast each
    version before it travels, a worker to load the checkpoint, so their manifests agree (the
    learner and the workers of a job share a device type, services.driver.placement).
    `train.compute_dtype = "bfloat16"` asks for bf16 rollout weights on the CPU too.
    """
    low = autocast_dtype(compute_dtype, device_type)
    if low is None or model_dtype == "float64":  # autocast leaves float64 weights alone
        return getattr(torch, model_dtype)
    return low


def low_precision_masters(params: list[torch.nn.Parameter]) -> list[str]:
    """Dtypes of trainable parameters AdamW cannot update at small learning rates (empty = fine).

    The config refuses such specs before anything loads; this catches a model built or loaded
    outside the spec (e.g. an adapter checkpoint whose adapters were saved in bf16).
    """
    return sorted({str(p.dtype).removeprefix("torch.") for p in params
                   if p.requires_grad and p.dtype not in MASTER_OK})

