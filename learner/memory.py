"""The learner's two memory levers, set once when it starts: activation checkpointing per
transformer block (train.activation_checkpointing) and the MC chunk size (train.mc_chunk = "auto").

Checkpointing: each block keeps only its input for the backward and runs its forward again
there (torch.utils.checkpoint, non-reentrant), so a step holds one block's activations plus every
block's input instead of all of every block's (dlrl.footprint.activation_bytes has both). It is
applied with torch.distributed's composable `checkpoint`, which hooks the block in place: the
module tree, and so every state_dict key, is unchanged (HF checkpoints, resume and the published
LLaDA name map keep working), peft's adapters inside a block are recomputed with it, and FSDP2's
`fully_shard` may then be applied to the same blocks (its all-gather runs in the block's pre-forward
hook, outside the recomputed region, and again before the block's backward).

The chunk: every chunk size gives BGPO the same gradient (the bound's loss is a sum over MC
samples, each chunk backwarded on its own: learner/objectives/bgpo.py), so "auto" only trades
memory for fewer, larger passes; `resolve_mc_chunk` picks the largest chunk whose step fits the
device's free memory, by dlrl.footprint's formulas and the objective's memory term (the naive ELBO
ratio keeps all n_mc graphs alive whatever the chunk, so its step fits at every chunk or none). A
block-diffusion model's copies are longer, up to T + L + B - 1 tokens under a dense mask (its
cropped BD3-LM training layout, dlrl.block_elbo): its shape says so (`ModelShape.bd3_block`, from
the model's family), so "auto" picks a chunk for that.

    python bench/activation_memory.py    # measures what checkpointing saves on the CPU
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed._composable.contract import _get_registry

from dlrl import footprint
from dlrl.config import JobSpec
from dlrl.models.blocks import transformer_blocks
from learner.objectives import objective_for

log = logging.getLogger(__name__)

FREE_FRACTION = 0.8
"""Share of the free memory measured at start that a step may fill: the rest absorbs the
allocator's fragmentation and the estimate's error (the formulas are checked to 25% in
tests/test_plan.py), and on the CPU whatever else the machine starts meanwhile."""
PROMPT_LEN = 256
"""Prompt tokens the chunk is sized for: the learner starts before it has seen a batch (the
same assumption as `dlrl plan`'s --prompt-length default)."""


def apply_activation_checkpointing(model: nn.Module) -> list[nn.Module]:
    """Recompute each transformer block (dlrl.models.blocks) in the backward; returns the blocks.

    In place and idempotent per block; the gradients are those of the plain model (the recompute
    runs the same ops on the same inputs; dropout replays its RNG state).
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        if not _checkpointed(block):
            checkpoint(block)
    return blocks


def _checkpointed(module: nn.Module) -> bool:
    """Whether `checkpoint` is already on the module (applying it twice is an error)."""
    return "checkpoint" in (_get_registry(module) or {})


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new allocation can take now: the CUDA driver's free bytes on a GPU, else the
    kernel's MemAvailable (free plus reclaimable page cache) from /proc/meminfo."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable: cannot size train.mc_chunk = 'auto'")


def resolve_mc_chunk(
    spec: JobSpec,
    device: torch.device,
    free_bytes: int | None = None,
    *,
    shape: footprint.ModelShape | None = None,
    gpus: int = 1,
    prompt_len: int = PROMPT_LEN,
) -> int:
    """train.mc_chunk as a number: itself, or for "auto" the largest c in 1..n_mc whose step fits.

    Called after the weights are loaded, so `free_bytes` (default: measured on `device`) no
    longer includes them; what the step still allocates (gradients, AdamW's moments, autocast's
    weight copies, the activations and projected rows of the MC copies the objective keeps alive at
    that chunk, and the ELBO head's one chunk of logits: footprint.learner_memory,
    Objective.graph_copies) must fit in FREE_FRACTION of it. `shape` defaults to the spec's model
    config; `gpus` is the learner group's size (states sharded 1/gpus each).
    """
    chunk = spec.train.mc_chunk
    if chunk != "auto":
        return chunk
    shape = shape or footprint.job_shape(spec)
    free = free_memory_bytes(device) if free_bytes is None else free_bytes
    checkpointing = spec.train.activation_checkpointing
    copies = objective_for(spec.train).graph_copies  # the objective's memory term
    resident = footprint.job_learner_memory(spec, shape, gpus, checkpointing, prompt_len, mc_chunk=1,
                                            graph_copies=copies).weights
    return footprint.largest_mc_chunk(spec, shape, int(FREE_FRACTION * free) + resident, gpus=gpus,
                                      checkpointing=checkpointing, prompt_len=prompt_len, graph_copies=copies)


def prepare_memory(model: nn.Module, spec: JobSpec, device: torch.device) -> JobSpec:
    """The learner's start: checkpoint the blocks if asked, and the spec with a numeric mc_chunk
    (learner.step only ever sees a number). Logs what "auto" chose and why."""
    t = spec.train
    if t.activation_checkpointing:
        blocks = apply_activation_checkpointing(model)
        log.info("activation checkpointing on %d %s blocks", len(blocks), type(blocks[0]).__name__)
    if t.mc_chunk != "auto":
        return spec
    free = free_memory_bytes(device)
    shape = footprint.shape_from_config(model.config.to_dict())
    chunk = resolve_mc_chunk(spec, device, free, shape=shape)
    log.info("train.mc_chunk = 'auto' -> %d of n_mc %d (%.1f GB free on %s, micro_batch %d, checkpointing %s)",
             chunk, t.n_mc, free / 1e9, device, t.micro_batch, t.activation_checkpointing)
    return spec.model_copy(update={"train": t.model_copy(update={"mc_chunk": chunk})})
