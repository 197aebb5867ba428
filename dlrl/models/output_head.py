"""The vocabulary head applied to chosen rows only, and the log-probs through it in chunks.

Why: an ELBO term sums log p(y_i | y_t, x) over the masked response positions only (dlrl.diffusion,
Eq. 3), yet projecting every position of a (B, T) forward gives (B, T, V) logits; with LLaDA's
126,464-token vocabulary that is the largest tensor of a learner step. The learner's ELBO pass
therefore runs the model without its head (`dlrl.models.forward.diffusion_hidden`), gathers the
rows it sums over, and projects only those here, `footprint.LOGIT_CHUNK` logits at a time:

- forward: each chunk's logits live only until their log-probs are taken (float32);
- backward: a chunk's logits are computed again from its saved hidden rows and its gradient taken
  at once, one chunk at a time (the scheme of liger-kernel's fused linear cross-entropy and of
  cut-cross-entropy, Wijmans et al. 2024, arXiv 2411.09009; restated here for any head module).

So neither pass holds more than one chunk of (rows, V), and the values and gradients are those
of the full-logit computation up to the order of float sums. The head is whatever the model
projects with (`get_output_embeddings()`: a plain or a LoRA-wrapped linear; the input embedding's
weight where a native model ties them and so has no head module), times the family's
`logit_scale`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrl.diffusion import token_logprobs
from dlrl.footprint import logit_chunk_rows
from dlrl.models.families import model_family


@dataclass(frozen=True)
class OutputHead:
    """The model's projection onto the vocabulary as a function of hidden rows."""

    project: Callable[[Tensor], Tensor]
    """hidden (..., d) -> logits (..., V), exactly as the model's forward computes them."""
    params: tuple[Tensor, ...]
    """The tensors `project` reads (their gradients are accumulated by the chunked backward)."""
    vocab: int


def output_head(model: torch.nn.Module) -> OutputHead:
    """The head of a model (plain or peft-wrapped), read after its forward.

    After, not before: under FSDP2 the root module's weights (embedding, final norm, head) are
    all-gathered by its forward and stay so until its backward (the root does not reshard after
    forward), so the tensors read here are the ones the forward and the backward use."""
    get_base = getattr(model, "get_base_model", None)
    inner = get_base() if callable(get_base) else model
    family = model_family(model)
    if family.final_norm is None:  # `diffusion_hidden` gave the model's own logits
        return OutputHead(lambda x: x, (), inner.config.vocab_size)
    scale = family.logit_scale(inner.config)
    head = inner.get_output_embeddings()
    if head is None:  # tied: a native model projects with its input embedding's weight
        weight = inner.get_input_embeddings().weight

        def linear(x: Tensor) -> Tensor:
            return F.linear(x, weight)

        params: tuple[Tensor, ...] = (weight,)
        vocab = weight.shape[0]
    else:
        linear, params, vocab = head, tuple(head.parameters()), head.out_features
    if scale == 1.0:
        return OutputHead(linear, params, vocab)
    return OutputHead(lambda x: linear(x) * scale, params, vocab)


class _ChunkedLogprobs(torch.autograd.Function):
    """log p(target) of each hidden row through the head, in row chunks; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden: Tensor, targets: Tensor, head: OutputHead, chunk: int, *params: Tensor) -> Tensor:
        ctx.head, ctx.chunk = head, chunk
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(hidden, targets)
        out = [token_logprobs(head.project(h), t) for h, t in zip(hidden.split(chunk), targets.split(chunk))]
        return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: Tensor):
        hidden, targets = ctx.saved_tensors
        params = [p for p in ctx.head.params if p.requires_grad]
        want_hidden = ctx.needs_input_grad[0]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        device, enabled, dtype = ctx.autocast
        # One autocast region for every chunk: a float32 head weight is cast to the compute dtype
        # once (autocast's cache), not once per chunk.
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                h = hidden[rows].detach().requires_grad_(want_hidden)
                logp = token_logprobs(ctx.head.project(h), targets[rows])  # (chunk,)
                inputs = ([h] if want_hidden else []) + params
                if inputs:
                    # Parameters' gradients go straight into their .grad, as the full-logit
                    # graph's AccumulateGrad would put them (FSDP2 reduce-scatters from there).
                    torch.autograd.backward(logp, grad[rows], inputs=inputs)
                if want_hidden:
                    grad_hidden[rows] = h.grad
        return (grad_hidden, None, None, None) + (None,) * len(ctx.head.params)


def head_logprobs(model: torch.nn.Module, hidden: Tensor, targets: Tensor) -> Tensor:
    """log p(targets) (K,) in float32 from hidden rows (K, d) through the model's head, chunked.

    Call it inside the autocast region of the forward that produced `hidden` (dlrl.precision), so
    the head's matmuls run in the same dtype as the full-logit forward's did."""
    head = output_head(model)
    return _ChunkedLogprobs.apply(hidden, targets, head, logit_chunk_rows(head.vocab), *head.params)


__all__ = ["OutputHead", "head_logprobs", "output_head"]
