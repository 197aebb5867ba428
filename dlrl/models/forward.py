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
"""

from __future__ import annotations

import inspect
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
    """Logits (B, T, V) of a bidirectional masked-diffusion model (plain or peft-wrapped).

    attention_mask: (B, T) with 1 for real tokens and 0 for (left) padding, or None. Position ids
    count from each row's first real token where the model accepts them, so a padded row gives
    the same logits as the row alone. LLaDA takes no position ids, so its padded rows sit at
    shifted positions; RoPE scores depend only on position differences, so the logits agree up to
    rounding.
    """
    family = model_family(model)
    shift = family.logit_shift
    if family.attention == "block_causal":
        return _block_causal_logits(model, family, input_ids, attention_mask)
    if attention_mask is None or bool(attention_mask.all()):
        return align_logits(model(input_ids).logits, shift)
    inner = _unwrapped(model)
    kwargs: dict = {}
    if _accepts(type(inner).forward, "position_ids"):
        kwargs["position_ids"] = padding_positions(attention_mask)
    if family.padding_mask == "2d":
        kwargs["attention_mask"] = attention_mask
    else:
        kwargs["attention_mask"] = padding_to_4d(attention_mask)
    return align_logits(model(input_ids, **kwargs).logits, shift)


def _block_causal_logits(model: torch.nn.Module, family: Family, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None) -> torch.Tensor:
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
    logits = model(input_ids, attention_mask=mask, position_ids=positions).logits
    return align_logits(logits, family.logit_shift)


def align_logits(logits: torch.Tensor, shift: int) -> torch.Tensor:
    """Raw logits (B, T, V) -> logits[:, i] for token i: shift right by `shift`, the first kept."""
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
    attention_mask: (B, T) 1/0 padding mask of the whole sequence, or None. Native families only:
    the model's forward must take `kv_cache` and `cache_start` (dlrl.models.kv_cache).
    """
    lo, hi = keep if keep is not None else (start, end)
    if not start <= lo <= hi <= end:
        raise ValueError(f"keep [{lo}, {hi}) is not inside the forwarded positions [{start}, {end})")
    shift = model_family(model).logit_shift
    first = 0 if start == 0 else start - shift
    if first < 0:
        raise ValueError(f"a block step at {start} needs position {first}: refresh from 0 first")
    b = x.shape[0]
    if attention_mask is None:
        positions = torch.arange(first, end, device=x.device).expand(b, -1)
        mask = None
    else:
        positions = padding_positions(attention_mask)[:, first:end]
        keep_keys = attention_mask.bool()
        width = max(len(kv_cache), end)  # keys attended after this call's update
        mask = keep_keys[:, None, None, :width].expand(-1, 1, end - first, -1)
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
