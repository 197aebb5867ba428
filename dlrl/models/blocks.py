"""The transformer blocks of a model: the units the learner shards (FSDP2) and recomputes
(activation checkpointing) one at a time.

Sharding per block is what makes FSDP's memory flat: a block's full weights exist only while that
block runs (all-gathered before, freed after), so at most a block or two of full weights are alive
besides the 1/N shards. The block is the natural unit because every residual stream passes through
it whole; splitting inside one (e.g. attention from its MLP) buys little and costs collectives.

Which modules are blocks is a property of the model family: a registered family names its block
class (`Family.block_class`: LLaDA's `LLaDABlock`, Dream's `DreamDecoderLayer`, the built-in
`Block`). Any other model falls back to Hugging Face's `_no_split_modules` (the classes
device_map="auto" must keep on one device: exactly the blocks), which remote-code models declare.
A LoRA-wrapped model (peft) is searched through its wrapper: its blocks are the base model's,
adapters inside.
"""

from __future__ import annotations

from torch import nn

from dlrl.models.families import model_family


def block_class_names(model: nn.Module) -> set[str]:
    """Class names of the model's blocks: its family's block class, else `_no_split_modules`
    (peft wrappers looked through)."""
    block_class = model_family(model).block_class
    if block_class is not None:
        return {block_class.__name__}
    seen: set[str] = set()
    for module in model.modules():
        names = getattr(module, "_no_split_modules", None)
        if names:
            seen.update(names)
    return seen


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in forward order (outermost matches only: a block is never inside another).

    ValueError when the model names none or none of the named classes occur: sharding or
    checkpointing "the whole model as one unit" would silently lose the memory the caller asked for.
    """
    names = block_class_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__} does not name its transformer blocks (no family block "
                         "class, no _no_split_modules); cannot shard or checkpoint it per block")
    blocks: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # pre-order: a block is visited before its children
        if id(module) in inside:
            continue
        if type(module).__name__ in names:
            blocks.append(module)
            inside.update(id(m) for m in module.modules())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names blocks {sorted(names)} but has none of them")
    return blocks
