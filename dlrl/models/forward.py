"""One forward call for every masked-diffusion model family.

The sampler and the learner both call `diffusion_logits`; it is the only place that knows how a
model family wants its padding mask. A 2-D padding mask silently turns many HF models causal, so
families that take a mask get an explicit 4-D (B, 1, T, T) boolean one (the default for unknown
families). LLaDA's remote code only understands a 2-D key-padding mask — it reshapes it with
`.view(B, -1)[:, None, None, :]` into an additive bias and is non-causal by construction — so it
gets that. Dream's generation code builds a 4-D boolean (B, 1, T, T) mask from the padding mask
and passes it straight to SDPA (True = may attend), and takes `position_ids`.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch

# model_type -> how the family takes padding: "2d" key-padding mask, or "4d" boolean (B,1,T,T).
# The built-in model takes either; "2d" lets it derive per-row positions itself.
MASK_STYLE = {"llada": "2d", "Dream": "4d", "dlrl_bidirectional": "2d"}


@lru_cache(maxsize=None)
def _accepts_position_ids(forward_fn) -> bool:
    return "position_ids" in inspect.signature(forward_fn).parameters


def _unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper, whose forward signature is the real one."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def padding_to_4d(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, 1, T, T) bool: every query sees every real key.

    Padded queries see the real keys too (Dream's own mask blanks their rows): an all-False row
    gives NaN in some SDPA kernels, and a NaN in a pad position's value leaks into real ones.
    """
    keep = attention_mask.bool()
    return keep[:, None, None, :].expand(-1, 1, keep.shape[1], -1)


def padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 1/0 padding mask -> (B, T) position ids counting from each row's first real token."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    if attention_mask is None or bool(attention_mask.all()):
        return model(input_ids).logits
    inner = _unwrapped(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", "")
    kwargs: dict = {}
    if _accepts_position_ids(type(inner).forward):
        kwargs["position_ids"] = padding_positions(attention_mask)
    if MASK_STYLE.get(model_type, "4d") == "2d":
        kwargs["attention_mask"] = attention_mask
    else:
        kwargs["attention_mask"] = padding_to_4d(attention_mask)
    return model(input_ids, **kwargs).logits
