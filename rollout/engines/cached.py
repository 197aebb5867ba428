"""The cached rollout engine (`engine = "cached"`): block KV cache, parallel commits, end-of-text
early stop.

The same semi-autoregressive block decoding as `rollout.sampler` (LLaDA Algorithm 5), made cheap
the way Fast-dLLM does it (Wu et al. 2025, Sec. 3.2-3.3; NVlabs/Fast-dLLM `llada/generate.py`,
`generate_with_prefix_cache` / `generate_with_dual_cache`), restated on the KV-cache contract of
`dlrl.models.kv_cache`, so the built-in model and the native LLaDA / Dream code all serve it.

Refresh policy: at the start of every block the cache is rebuilt by one full forward of the
active rows (start = 0); that forward's logits are also the block's first step, which is
therefore exactly the reference sampler's. Every later step of the block forwards only

* `cache="prefix"`: the positions [block start, T) — the current block and the still-masked
  suffix — attending to the prompt and the decoded blocks as cached at the refresh;
* `cache="dual"`: the block's positions only, attending to the cached prefix *and* suffix.

Both are approximations under a bidirectional model: a cached key was computed when the block was
all masks (and, for the dual suffix, so was its own context). They are exact at the refresh and
for a one-layer model; bench/rollout_speed.py measures the token agreement with the reference.

Commit policy: with `threshold` and `factor` both None, each block takes steps // num_blocks
steps that commit the reference's `num_transfer_tokens` schedule; with one of them set, a block
takes as many steps as it needs (rollout.commit_policy) and `steps` is not used.

Compute per step is only what can be committed: the model projects only the block onto the
vocabulary (where its forward takes `logits_to_keep`), and Gumbel noise and the softmax are drawn
only over the block's still-masked positions — not the (B, T, V) temporaries of the reference.
Rows whose block is fully decoded leave the batch (`KVCache.keep_rows`) for the rest of the
block, and a row whose finished block is all end-of-text tokens is done: the rest of its response
is filled with EOS (what the decoded text is anyway, since a completion ends at its first EOS)
and it takes no further forwards. Rows are left-padded as in the reference sampler.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from dlrl.decoding import Decoding
from dlrl.models import SpecialIds
from dlrl.models.forward import cached_diffusion_logits
from dlrl.models.kv_cache import KVCache
from rollout.commit_policy import commit_factor, commit_scheduled, commit_threshold
from rollout.engines.block import refuse_block_options
from rollout.rollout_stats import RolloutStats, eos_positions
from rollout.sampler import Sample, num_transfer_tokens, predict_x0

PREDICT_CHUNK = 64
"""Masked positions whose noise and softmax are drawn at once (bounds the (chunk, V) temporaries)."""


def block_logits(
    model: torch.nn.Module,
    x: Tensor,
    attention_mask: Tensor | None,
    kv_cache: KVCache,
    *,
    start: int,
    end: int,
    block: tuple[int, int],
) -> Tensor:
    """Logits (B, block length, V) of positions [block[0], block[1]) from forwarding [start, end):
    only the block is projected onto the vocabulary where the model allows it."""
    return cached_diffusion_logits(model, x, attention_mask, kv_cache=kv_cache, start=start, end=end,
                                   keep=block)


def predict_masked(
    logits: Tensor, mask_index: Tensor, *, mask_id: int, temperature: float, remasking: str,
    generator: torch.Generator | None, chunk: int = PREDICT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:
    """x0, confidence and model probability (B, l) of the block's masked positions only.

    logits: (B, l, V); mask_index: (B, l) bool. Gumbel noise and softmax are drawn over the N
    masked positions only, `chunk` positions at a time (row-major order, one random stream), so
    the float64 temporaries are (chunk, V) whatever the batch: with LLaDA's 126,464-token
    vocabulary a whole batch-32 block at once would be ~1 GiB per temporary.
    Elsewhere x0 = mask_id, confidence = -inf.
    """
    where = mask_index.nonzero(as_tuple=True)
    n = where[0].numel()
    x0_m = torch.empty(n, dtype=torch.long, device=logits.device)
    conf_m = torch.empty(n, device=logits.device)
    prob_m = torch.empty(n, device=logits.device)
    for s in range(0, n, chunk):
        part = logits[where[0][s:s + chunk], where[1][s:s + chunk]][None]  # (1, c, V)
        x, c = predict_x0(part, mask_id=mask_id, temperature=temperature, remasking=remasking,
                          generator=generator)  # (1, c) each
        x0_m[s:s + chunk], conf_m[s:s + chunk] = x[0], c[0].float()
        if remasking == "low_confidence":
            prob_m[s:s + chunk] = c[0].float()
        else:  # the confidence is a random score; the stats want the model's probability
            prob_m[s:s + chunk] = F.softmax(part.float(), dim=-1).gather(-1, x[..., None]).squeeze(-1)[0]
    x0 = torch.full(mask_index.shape, mask_id, dtype=torch.long, device=logits.device)
    confidence = torch.full(mask_index.shape, float("-inf"), device=logits.device)
    prob = torch.zeros(mask_index.shape, device=logits.device)
    x0[where], confidence[where], prob[where] = x0_m, conf_m, prob_m
    return x0, confidence, prob


@torch.no_grad()
def generate_cached(
    model: torch.nn.Module,
    prompt: Tensor,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    mask_id: int,
    eos_ids: tuple[int, ...],
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    attention_mask: Tensor | None = None,
    cache: str = "dual",
    threshold: float | None = None,
    factor: float | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Sample, RolloutStats]:
    """Decode `gen_length` tokens after each (left-padded) prompt (B, P); see the module docstring.

    Returns the sample (as `rollout.sampler.generate_with_steps`: tokens (B, P + L) and the step
    at which each token was committed — the row's own step count under a parallel policy) and the
    batch's RolloutStats. The options are taken as `CachedEngine.check` accepts them (block
    arithmetic by dlrl.decoding.Decoding): this function does not check them again.
    """
    num_blocks = gen_length // block_length
    scheduled = threshold is None and factor is None
    if not eos_ids:
        raise ValueError("eos_ids is empty: early stop needs the end-of-text ids")
    steps_per_block = steps // num_blocks if scheduled else 0

    b, p = prompt.shape
    total = p + gen_length
    device = prompt.device
    x = torch.cat([prompt, prompt.new_full((b, gen_length), mask_id)], dim=1)  # (B, T)
    if attention_mask is not None:
        attention_mask = attention_mask.to(device)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(b, gen_length)], dim=1)
    unmask_step = torch.full((b, gen_length), -1, dtype=torch.long, device=device)  # (B, L)
    step_id = torch.zeros(b, dtype=torch.long, device=device)  # (B,) the row's next step index
    done = torch.zeros(b, dtype=torch.bool, device=device)  # (B,) ended by an all-EOS block
    eos = torch.tensor(eos_ids, device=device)
    stats = RolloutStats(rows=b)
    kv_cache = KVCache()
    if scheduled:  # a fresh block is all masks in every row: one schedule for the batch
        k = num_transfer_tokens(torch.ones(1, block_length, dtype=torch.bool, device=device), steps_per_block)[0]

    for blk in range(num_blocks):
        start, end = p + blk * block_length, p + (blk + 1) * block_length
        rows = (~done).nonzero().squeeze(1)  # (R,) rows still decoding
        i = 0
        while rows.numel():
            xa = x[rows]  # (R, T)
            am = None if attention_mask is None else attention_mask[rows]
            if i == 0:  # refresh: a full forward of the active rows rebuilds the cache
                kv_cache.clear()
                fwd = (0, total)
            else:
                fwd = (start, total if cache == "prefix" else end)
            logits = block_logits(model, xa, am, kv_cache, start=fwd[0], end=fwd[1], block=(start, end))
            current = xa[:, start:end]  # (R, l)
            mask_index = current == mask_id  # (R, l)
            x0, confidence, prob = predict_masked(logits, mask_index, mask_id=mask_id, temperature=temperature,
                                                  remasking=remasking, generator=generator)
            if scheduled:
                transfer = commit_scheduled(confidence, k[i].expand(rows.numel()))
            elif threshold is not None:
                transfer = commit_threshold(confidence, prob, threshold)
            else:
                transfer = commit_factor(confidence, prob, factor)
            x[rows, start:end] = torch.where(transfer, x0, current)
            step_here = (blk * steps_per_block + i) if scheduled else step_id[rows]
            unmask_step[rows, start - p:end - p] = torch.where(
                transfer, torch.as_tensor(step_here, device=device).reshape(-1, 1), unmask_step[rows, start - p:end - p])
            stats.forwards += 1
            stats.row_steps += rows.numel()
            stats.committed += int(transfer.sum())
            stats.confidence_sum += float(prob[transfer].sum())
            stats.confidence_count += int(transfer.sum())
            step_id[rows] += 1
            i += 1
            # Rows with nothing left to commit in this block leave the compute until the next refresh.
            still = (x[rows, start:end] == mask_id).any(dim=1)  # (R,)
            if not bool(still.all()):
                rows = rows[still]
                kv_cache.keep_rows(still)
        # End-of-text early stop: a row whose just-finished block is all EOS ends here.
        ended = ~done & torch.isin(x[:, start:end], eos).all(dim=1)  # (B,)
        if bool(ended.any()) and end < total:
            x[ended, end:] = eos_ids[0]
            unmask_step[ended, end - p:] = (step_id[ended] - 1)[:, None]
        done |= ended
    kv_cache.clear()
    stats.eos_position_sum = int(eos_positions(x[:, p:], eos_ids).sum())
    return Sample(tokens=x, unmask_step=unmask_step), stats


class CachedEngine:
    """`generate_cached` behind the engine protocol (rollout.engines.Engine).

    Options: `cache` ("prefix" or "dual"), at most one of `threshold` and `factor` (parallel
    commits; neither = the fixed `steps` schedule). No classifier-free guidance: the cached
    forward has no unconditional pass. Not the block engine's `top_k`, `top_p`, `block_remasking`."""

    def __init__(self, model: torch.nn.Module, ids: SpecialIds) -> None:
        self.model, self.ids = model, ids

    @staticmethod
    def check(decoding: Decoding) -> None:
        if decoding.threshold is not None and decoding.factor is not None:
            raise ValueError("engine = 'cached' takes at most one of threshold and factor")
        if decoding.cfg_scale > 0:
            raise ValueError("engine = 'cached' does not do classifier-free guidance (cfg_scale > 0): "
                             "use engine = 'reference'")
        refuse_block_options(decoding)

    def generate(self, prompt: Tensor, attention_mask: Tensor | None, decoding: Decoding,
                 generator: torch.Generator | None = None) -> tuple[Sample, RolloutStats]:
        self.check(decoding)
        d = decoding
        return generate_cached(
            self.model, prompt, steps=d.steps, gen_length=d.gen_length, block_length=d.block_length,
            mask_id=self.ids.mask_id, eos_ids=self.ids.eos_ids, temperature=d.temperature,
            remasking=d.remasking, attention_mask=attention_mask, cache=d.cache, threshold=d.threshold,
            factor=d.factor, generator=generator,
        )

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)
