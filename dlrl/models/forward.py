"""One forward call for every masked-diffusion model family.

The sampler and the learner both call `diffusion_logits`; it reads from the model's family record
(dlrl.models.families) how the family takes its padding mask and how its logits are aligned. A 2-D
padding mask silently turns many HF models causal, so families that take a mask get an explicit
4-D (B, 1, T, T) boolean one (the default for unknown families). LLaDA's published convention is a
2-D key-padding mask (its modeling file reshapes it with `.view(B, -1)[:, None, None, :]` into an
additive bias, non-causal by construction), so it gets that; the native LLaDA (dlrl/models/llada.py)
also takes position ids. Dream's generation code builds a 4-D boolean (B, 1, T, T) mask from the
padding mask and passes it straight to SDPA (True = may attend), and takes `position_ids`.

Block diffusion: a family whose record says `attention = "block_causal"` (SDAR) attends
bidirectionally inside a block and causally across blocks. Its models obey whatever 4-D mask they
are given, so `diffusion_logits` builds that mask itself (`dlrl.models.block_mask.
block_causal_mask`, blocks of `Family.block_size_for(config)` on the global grid) with position
ids from each row's first real token: one-sequence scoring and sampling are block-causal by default.

Logit alignment: a family whose raw logits lag the tokens they predict (Dream, like the Qwen2 it
starts from, predicts token i from hidden state i - 1; `Family.logit_shift`) has them shifted right
here, as its published generation code does (position 0 keeps its own). Models return their
published raw logits; callers always get logits[:, i] for token i.

`diffusion_hidden` runs the same forward without the vocabulary head and returns the aligned last
hidden states, for a caller that projects only some rows (the learner's ELBO pass:
dlrl.models.output_head).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch

from dlrl.models.block_mask import block_causal_mask
from dlrl.models.families import Family, model_family
from dlrl.models.kv_cache import KVCache
from dlrl.models.padding import padding_positions, padding_to_4d


@lru_cache(maxsize=None)
def _accepts(forward_fn, name: str) -> bool:
    """Whether a model class's forward takes keyword `name` (looked up once per class)."""
    return name in inspect.signature(forward_fn).parameters


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper, whose forward signature is the real one."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def diffusion_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits (B, T, V) of a masked-diffusion model (plain or peft-wrapped): bidirectional, or
    block-causal for a block-diffusion family (the mask is built here, see the module docstring).

    attention_mask: (B, T) with 1 for real tokens and 0 for (left) padding, or None. Position ids
    count from each row's first real token where the model accepts them, so a padded row gives
    the same logits as the row alone. LLaDA takes no position ids, so its padded rows sit at
    shifted positions; RoPE scores depend only on position differences, so the logits agree up to
    rounding.
    """
    return align_logits(_forward(model, input_ids, attention_mask).logits, model_family(model).logit_shift)


def diffusion_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The last hidden states (B, T, d) of the forward `diffusion_logits` runs, aligned as its
    logits are: the model's head (dlrl.models.output_head) applied to row i gives logits[:, i].
    No position is projected onto the vocabulary (`head_input`): the caller projects the rows it
    needs, e.g. the ELBO's masked response positions. A family whose final norm is not known
    (`Family.final_norm` None) returns its logits instead, and `output_head` is then the identity."""
    if model_family(model).final_norm is None:  # layout unknown: its logits, through an identity head
        return diffusion_logits(model, input_ids, attention_mask)
    with head_input(model) as seen:
        _forward(model, input_ids, attention_mask)
    return align_logits(seen[-1], model_family(model).logit_shift)


@contextmanager
def head_input(model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within: a forward of `model` appends the hidden states its head would project, (B, T, d),
    to the yielded list, and projects none of them (its head sees zero positions).

    They are captured at the output of the family's final norm (`Family.final_norm`), inside the
    model's own forward, so whatever wraps the forward (peft, FSDP2's root hooks, autocast,
    activation checkpointing) runs as it always does."""
    norm = _unwrapped(model).get_submodule(model_family(model).final_norm)
    seen: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        seen.append(output)
        return output[:, :0]

    handle = norm.register_forward_hook(keep)
    try:
        yield seen
    finally:
        handle.remove()


def _forward(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """The model's output for `diffusion_logits`: the family's mask and position convention, raw logits."""
    family = model_family(model)
    if family.attention == "block_causal":
        return _block_causal_forward(model, family, input_ids, attention_mask)
    if attention_mask is None or bool(attention_mask.all()):
        return model(input_ids)
    inner = _unwrapped(model)
    kwargs: dict = {}
    if _accepts(type(inner).forward, "position_ids"):
        kwargs["position_ids"] = padding_positions(attention_mask)
    if family.padding_mask == "2d":
        kwargs["attention_mask"] = attention_mask
    else:
        kwargs["attention_mask"] = padding_to_4d(attention_mask)
    return model(input_ids, **kwargs)


def _block_causal_forward(model: torch.nn.Module, family: Family, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None):
    """One sequence scored as a block-diffusion model attends: bidirectional inside a block, causal
    across blocks, on the global grid of each row's own positions (dlrl.models.block_mask), with
    position ids from each row's first real token, so a padded row sees exactly what it sees alone."""
    size = family.block_size_for(getattr(_unwrapped(model), "config", None))
    t = input_ids.shape[1]
    mask = block_causal_mask(attention_mask, t, size, device=input_ids.device)
    if attention_mask is None:
        positions = torch.arange(t, device=input_ids.device).expand(input_ids.shape[0], t)
    else:
        positions = padding_positions(attention_mask)
    return model(input_ids, attention_mask=mask, position_ids=positions)


def align_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """Raw logits (B, T, V) -> logits[:, i] for token i: shift right by `shift`, the first kept.
    The same for the hidden states (B, T, d) that the head projects to them."""
    if shift == 0:
        return logits
    return torch.cat([logits[:, :shift], logits[:, :-shift]], dim=1)


def cached_diffusion_logits(
    model: torch.nn.Module,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    kv_cache: KVCache,
    start: int,
    end: int,
    keep: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Logits (B, hi - lo, V) for positions [lo, hi) = `keep` (default [start, end)) of x (B, T),
    from forwarding [start, end) through `kv_cache`.

    start = 0 on an empty cache is the full forward that fills it. Otherwise only positions
    [start - shift, end) are forwarded (a model whose logits lag by `shift` needs the hidden state
    before the first position it predicts) and attend to the cached keys/values of the others.
    `keep` lets a sampler ask for the block it can commit only: a model whose forward takes
    `logits_to_keep` then projects just those positions onto the vocabulary.
    attention_mask: (B, T) 1/0 padding mask of the whole sequence, or None. A block-causal family
    gets the forwarded rows of the sequence's block-causal mask (exact when the cached keys are
    those of earlier, final blocks: they never see later ones). Native families only:
    the model's forward must take `kv_cache` and `cache_start` (dlrl.models.kv_cache).
    """
    lo, hi = keep if keep is not None else (start, end)
    if not start <= lo <= hi <= end:
        raise ValueError(f"keep [{lo}, {hi}) is not inside the forwarded positions [{start}, {end})")
    family = model_family(model)
    shift = family.logit_shift
    first = 0 if start == 0 else start - shift
    if first < 0:
        raise ValueError(f"a block step at {start} needs position {first}: refresh from 0 first")
    b = x.shape[0]
    width = max(len(kv_cache), end)  # keys attended after this call's update
    if attention_mask is None:
        positions = torch.arange(first, end, device=x.device).expand(b, -1)
        mask = None
    else:
        positions = padding_positions(attention_mask)[:, first:end]
        keep_keys = attention_mask.bool()
        mask = keep_keys[:, None, None, :width].expand(-1, 1, end - first, -1)
    if family.attention == "block_causal":  # the rows [first, end) of the whole sequence's block-causal mask
        size = family.block_size_for(getattr(_unwrapped(model), "config", None))
        full = block_causal_mask(attention_mask, x.shape[1], size, device=x.device)
        mask = full[:, :, first:end, :width].expand(b, -1, -1, -1)
    kwargs: dict = {}
    sliced = shift == 0 and (lo, hi) != (start, end) and _accepts(type(_unwrapped(model)).forward, "logits_to_keep")
    if sliced:
        kwargs["logits_to_keep"] = slice(lo - first, hi - first)
    out = model(x[:, first:end], attention_mask=mask, position_ids=positions,
                kv_cache=kv_cache, cache_start=first, **kwargs).logits
    if sliced:
        return out  # (B, hi - lo, V)
    if start == 0:
        out = align_logits(out, shift)
    elif shift:
        out = out[:, start - first - shift: end - first - shift]
    return out[:, lo - start:hi - start]  # (B, hi - lo, V)
