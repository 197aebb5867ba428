"""A learner group's checkpoint: HF weights gathered from the shards, and the resume state sharded.

The HF half (config + safetensors, or the LoRA adapter) is what users load and what `dlrl eval`
reads, so it is written whole by the lead from the gathered weights, exactly as a single learner
writes it. The resume half, the float32 masters and AdamW moments, stays sharded: each rank writes
its own shards through `torch.distributed.checkpoint` (DCP) into `<checkpoint>/dcp/`, so no
process ever holds the whole optimizer state (for LLaDA-8B that is 64 GB on top of 32 GB of
weights). The folder must be on storage every rank can reach (one node's disk for one node; a
shared filesystem across nodes).

Atomicity is the single learner's: everything goes into one temporary folder that the lead renames
over the last checkpoint when every rank has written its part.

A checkpoint records the group's size. Resuming with another size is refused: DCP could reshard
the tensors, but the rows each rank trains, and so the order floating-point sums are taken in,
would change, and "resumed runs are bit-identical" would then be untrue without saying so.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

DCP_DIR = "dcp"


class GroupSizeError(ValueError):
    """A checkpoint written by a learner group of another size."""


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on the lead's CPU (an all-gather every rank joins; the others get
    nothing back), for the HF half of the checkpoint."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the weights and optimizer state to folder/dcp (collective)."""
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / DCP_DIR))


def load_shards(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load this rank's shards of the weights and optimizer state from folder/dcp (collective)."""
    if not (folder / DCP_DIR).is_dir():
        raise GroupSizeError(f"{folder} was written by a single learner (no {DCP_DIR}/ folder); resume it "
                             "with runtime.learner_ranks = 1")
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=str(folder / DCP_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def check_group_size(state: dict, world: int, folder: Path) -> None:
    """GroupSizeError unless the checkpoint at `folder` (its JSON `state`) was written by `world` ranks."""
    wrote = int(state.get("learner_ranks", 1))
    if wrote != world:
        raise GroupSizeError(
            f"{folder} was written by a learner group of {wrote} rank(s); this run has {world}. Resume with "
            f"runtime.learner_ranks = {wrote}, or start a new run from its weights (model.path = '{folder}')")
