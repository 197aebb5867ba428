"""Test-only restatement of SDAR's published block-diffusion sampler (not used by the package).

Restated (not copied) from `JetAstra/SDAR@c2041a8333333d685f6e15122c84f60f51f85ebd:generate.py`
(md5 a13fd50c658fb655f46222dea7ff063d): `top_k_logits`, `top_p_logits`,
`sample_with_temperature_topk_topp` (lines 8-46), `get_num_transfer_tokens` (49-54) and
`block_diffusion_generate` (57-202), the sampler TraDo / JetEngine / lmdeploy follow
(../shared/reference/block-diffusion.md §3.1). One prompt, no padding, as published:

1. x = prompt followed by masks up to the end of the block holding the last response token
   (num_blocks = ceil((P + L) / B)); the attention pattern is the block-lower-triangular one.
2. The floor(P / B) full prompt blocks are forwarded once and stored in the cache (store_kv=True).
3. Each later block (the first mixes the last prompt tokens with masks) takes up to steps + 1
   iterations: with no masks left, one forward over the clean block stores its keys/values and
   the block ends; otherwise a forward of the block alone reads the cache without storing
   (store_kv=False), every block position is sampled, and the rule picks what to commit.
4. Rules, with n_s = get_num_transfer_tokens(B, steps)[s] and confidence = the sampled token's
   probability where the position is masked, -inf elsewhere: 'sequential' (n_s positions from the
   first mask), 'low_confidence_static' (topk(confidence, n_s)), 'low_confidence_dynamic' (the
   positions above the threshold if there are >= n_s of them, else topk(confidence, n_s)). topk
   asks for n_s even when fewer masks are left: it then also picks non-masked positions, which
   take the fresh sample (kept here, as published).
5. After each block, stop if a stop id appears anywhere in x[:, P:].

Restated on dlrl's KV-cache contract (`dlrl.models.kv_cache`): the published DynamicCache with
`store_kv` becomes a KVCache that a storing forward appends to, and a denoising forward sees
through a copy of its lists (its appended block lands in the copy, the cache is not written).
Two departures, both named: `generator` feeds `torch.multinomial` (the published code draws from
the global RNG), and temperature 0 takes LLaDA2.1's argmax branch (token = argmax, probability =
its softmax probability) where the published code divides the logits by zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dlrl.models.kv_cache import KVCache


def top_k_logits(logits, k):
    if k <= 0:
        return logits
    kth = torch.topk(logits, k).values[..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def top_p_logits(logits, p):
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the first token over the line
    remove[..., 0] = False
    mask = torch.scatter(torch.zeros_like(logits, dtype=torch.bool), -1, sorted_indices, remove)
    return logits.masked_fill(mask, float("-inf"))


def sample_with_temperature_topk_topp(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    if temperature == 0.0:  # departure: LLaDA2.1's argmax (the published SDAR code divides by 0)
        token = logits.argmax(dim=-1, keepdim=True)
        return token.view(*shape), F.softmax(logits, dim=-1).gather(-1, token).view(*shape)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k > 0:
        logits = top_k_logits(logits, top_k)
    if top_p < 1.0:
        logits = top_p_logits(logits, top_p)
    probs = F.softmax(logits, dim=-1)
    token = torch.multinomial(probs, num_samples=1, generator=generator)
    return token.view(*shape), torch.gather(probs, -1, token).view(*shape)


def get_num_transfer_tokens(block_length, steps):
    base, remainder = divmod(block_length, steps)
    n = torch.zeros(steps, dtype=torch.int64) + base
    n[:remainder] += 1
    return n


def _reading(cache: KVCache) -> KVCache:
    """store_kv=False: the forward attends to the cache plus its own block, and stores nothing."""
    view = KVCache()
    view.keys, view.values = list(cache.keys), list(cache.values)
    return view


@torch.no_grad()
def block_diffusion_generate(model, input_ids, mask_id, gen_length=128, block_length=8, denoising_steps=8,
                             temperature=1.0, top_k=0, top_p=1.0, remasking_strategy="low_confidence_dynamic",
                             confidence_threshold=0.85, stopping_criteria_idx=None, generator=None):
    """input_ids (1, P) -> x (1, num_blocks * block_length): prompt, decoded blocks, masks after a stop."""
    prompt_length = input_ids.shape[1]
    cache = KVCache()
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    block_mask = torch.tril(torch.ones(num_blocks, num_blocks, dtype=torch.bool))
    attention = block_mask.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None]
    position_ids = torch.arange(total_length)[None]
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids
    prefill_blocks = prompt_length // block_length
    prefill_length = prefill_blocks * block_length

    if prefill_length > 0:
        model(x[:, :prefill_length], attention_mask=attention[..., :prefill_length, :prefill_length],
              position_ids=position_ids[:, :prefill_length], kv_cache=cache, cache_start=0)

    num_transfer_tokens = get_num_transfer_tokens(block_length, denoising_steps)
    for num_block in range(prefill_blocks, num_blocks):
        start, end = num_block * block_length, (num_block + 1) * block_length
        cur_x = x[:, start:end].clone()
        cur_mask = attention[..., start:end, :end]
        cur_positions = position_ids[:, start:end]
        for step in range(denoising_steps + 1):
            mask_index = cur_x == mask_id
            if mask_index.sum() == 0:  # store the clean block's keys and values
                model(cur_x, attention_mask=cur_mask, position_ids=cur_positions, kv_cache=cache, cache_start=start)
                break
            logits = model(cur_x, attention_mask=cur_mask, position_ids=cur_positions,
                           kv_cache=_reading(cache), cache_start=start).logits
            x0, x0_p = sample_with_temperature_topk_topp(logits, temperature=temperature, top_k=top_k,
                                                         top_p=top_p, generator=generator)
            n = int(num_transfer_tokens[step])
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            if remasking_strategy == "sequential":
                for j in range(cur_x.shape[0]):
                    first = int(mask_index[j].nonzero(as_tuple=True)[0].min())
                    transfer[j, first:first + n] = True
            elif remasking_strategy == "low_confidence_static":
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                for j in range(confidence.shape[0]):
                    transfer[j, torch.topk(confidence[j], n).indices] = True
            elif remasking_strategy == "low_confidence_dynamic":
                confidence = torch.where(mask_index, x0_p, -torch.inf)
                for j in range(confidence.shape[0]):
                    high = confidence[j] > confidence_threshold
                    if high.sum() >= n:
                        transfer[j] = high
                    else:
                        transfer[j, torch.topk(confidence[j], n).indices] = True
            else:
                raise ValueError(f"Unknown remasking strategy: {remasking_strategy}")
            cur_x[transfer] = x0[transfer]
        x[:, start:end] = cur_x
        if stopping_criteria_idx is not None and any(s in x[:, prompt_length:] for s in stopping_criteria_idx):
            break
    return x
