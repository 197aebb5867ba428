"""Test-only restatement of the published LLaDA2.0 and LLaDA2.1 `generate` (not used by the package).

Restated (not copied) from the Hugging Face modeling files as DARE vendors them
(../shared/reference/block-diffusion.md §4.1):

* LLaDA2.0: `yjyddq/DARE@7016e0e21ad5f77a66ee97cae39f418d27bd852d:models/LLaDA2.0-mini/
  modeling_llada2_moe.py` (md5 aa88b089a5b73a194a26becdf5389e15), `_top_k_logits`, `_top_p_logits`,
  `_sample_with_temperature_topk_topp` (1180-1221), `_get_num_transfer_tokens`, `generate`
  (1233-1403): the threshold rule, no editing.
* LLaDA2.1: `yjyddq/DARE@5877371d92af220cb4d220a06fd56f4078447ace:models/LLaDA2.1-mini/
  modeling_llada2_moe.py` (md5 615452df5e250168504aeedf7331dd15), the sampler with the T = 0
  argmax branch (1205-1221) and `generate` (1239-1434) with its token editing.

Both: one prompt (1, P), the global block grid (num_blocks = ceil((P + L) / B)), the first
floor(P / B) blocks taken as given, and **no KV cache**: every step forwards the whole prefix
through the current block under the block-lower-triangular mask. Output: the generated tokens
through the first EOS (inclusive), at most gen_length.

2.0 per block, `steps` times at most: stop when the block has no masks; sample the block (its
temperature quirk kept: T is divided out only for T > 0 and T != 1 and the draw is always
multinomial, so T = 0 samples at T = 1); commit the masks above `threshold` when there are at
least n_s of them, else topk(confidence, min(n_s, masks left)); after the block, stop if the
generated part holds eos_id. (`eos_early_stop`, off by default, is not restated.)

2.1 per block, until no masks and no edits, at most `max_post_steps` iterations once the masks
are gone: M2T commits the masks above `threshold`, else the top min(num_to_transfer, masks);
T2T re-writes every decoded non-prompt block token whose new sample differs and has confidence
above `editing_threshold`. With eos_early_stop, stop after a block whose generated part has no
masks and holds eos_id.

The published code passes the block mask as an additive bf16 0/-inf tensor (2.0) or a 0/1
tensor (2.1); dlrl's models take the same pattern as a boolean mask. `generator` feeds
`torch.multinomial` (the published code draws from the global RNG).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _top_k_logits(logits, k):
    if k is None or k <= 0:
        return logits
    kth = torch.topk(logits, k).values[..., -1, None]
    return torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)


def _top_p_logits(logits, p):
    if p is None or p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(ordered, dim=-1), dim=-1) > p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(torch.scatter(torch.zeros_like(logits, dtype=torch.bool), -1, order, remove),
                              float("-inf"))


def sample_v20(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1])
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    probs = F.softmax(_top_p_logits(_top_k_logits(logits, top_k), top_p), dim=-1)
    token = torch.multinomial(probs, num_samples=1, generator=generator)
    return token.view(*shape), torch.gather(probs, -1, token).view(*shape)


def sample_v21(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    if temperature == 0.0:
        shape = logits.shape[:-1]
        logits = logits.reshape(-1, logits.shape[-1])
        token = torch.argmax(logits, dim=-1, keepdim=True)
        return token.view(*shape), torch.gather(F.softmax(logits, dim=-1), -1, token).view(*shape)
    return sample_v20(logits, temperature, top_k, top_p, generator)


def _num_transfer_tokens(block_length, steps):
    if steps == 0:
        return torch.tensor([], dtype=torch.int64)
    base, remainder = divmod(block_length, steps)
    n = torch.full((steps,), base, dtype=torch.int64)
    n[:remainder] += 1
    return n


def _layout(input_ids, gen_length, block_length, mask_id):
    prompt_length = input_ids.shape[1]
    num_blocks = (prompt_length + gen_length + block_length - 1) // block_length
    total_length = num_blocks * block_length
    blocks = torch.tril(torch.ones(num_blocks, num_blocks, dtype=torch.bool))
    attention = blocks.repeat_interleave(block_length, 0).repeat_interleave(block_length, 1)[None, None]
    x = torch.full((1, total_length), mask_id, dtype=torch.long)
    x[:, :prompt_length] = input_ids
    return x, attention, torch.arange(total_length)[None], num_blocks


def _through_first_eos(x, prompt_length, gen_length, eos_id):
    answer = x[:, prompt_length:prompt_length + gen_length]
    at = (answer[0] == eos_id).nonzero(as_tuple=True)[0]
    return answer[:, :int(at[0]) + 1 if len(at) else gen_length]


@torch.no_grad()
def generate_v20(model, input_ids, temperature=0.0, block_length=32, steps=32, gen_length=2048, top_p=None,
                 top_k=None, minimal_topk=1, threshold=0.95, eos_id=156892, mask_id=156895, generator=None):
    steps = min(steps, gen_length // minimal_topk)
    prompt_length = input_ids.shape[1]
    x, attention, position_ids, num_blocks = _layout(input_ids, gen_length, block_length, mask_id)
    schedule = _num_transfer_tokens(block_length, steps)
    for num_block in range(prompt_length // block_length, num_blocks):
        window = (num_block + 1) * block_length
        cur_x = x[:, :window]
        for step in range(steps):
            active = cur_x[:, -block_length:] == mask_id
            if active.sum() == 0:
                break
            logits = model(cur_x, attention_mask=attention[..., :window, :window],
                           position_ids=position_ids[:, :window]).logits
            x0, x0_p = sample_v20(logits[:, -block_length:], temperature, top_k, top_p, generator)
            n = int(schedule[step])
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            confidence = torch.where(active, x0_p, -torch.inf)
            high = confidence[0] > threshold
            if int(high.sum()) >= n:
                transfer[0] = high
            else:
                transfer[0, torch.topk(confidence[0], k=min(n, int(active.sum()))).indices] = True
            if transfer.any():
                cur_x[:, -block_length:][transfer] = x0[transfer]
        x[:, :window] = cur_x
        if eos_id is not None and (x[0, prompt_length:window] == eos_id).any():
            break
    return _through_first_eos(x, prompt_length, gen_length, eos_id)


@torch.no_grad()
def generate_v21(model, input_ids, temperature=0.0, block_length=32, steps=32, gen_length=2048, top_p=None,
                 top_k=None, eos_early_stop=False, minimal_topk=1, threshold=0.95, editing_threshold=0.9,
                 max_post_steps=16, eos_id=156892, mask_id=156895, num_to_transfer=1, generator=None):
    steps = min(steps, gen_length // minimal_topk)  # as published: not used further by 2.1
    prompt_length = input_ids.shape[1]
    x, attention, position_ids, num_blocks = _layout(input_ids, gen_length, block_length, mask_id)
    for num_block in range(prompt_length // block_length, num_blocks):
        window = (num_block + 1) * block_length
        cur_x = x[:, :window]
        block_start = num_block * block_length
        in_prompt = torch.zeros(block_length, dtype=torch.bool)
        if block_start < prompt_length:
            in_prompt[:min(prompt_length - block_start, block_length)] = True
        post_steps = 0
        while True:
            old = cur_x[:, -block_length:].clone()
            active = cur_x[:, -block_length:] == mask_id
            if not bool(active.any()):
                post_steps += 1
            if post_steps > max_post_steps:
                break
            logits = model(cur_x, attention_mask=attention[..., :window, :window],
                           position_ids=position_ids[:, :window]).logits
            x0, x0_p = sample_v21(logits[:, -block_length:], temperature, top_k, top_p, generator)
            m2t = torch.zeros_like(x0, dtype=torch.bool)
            if active.sum() > 0:
                confidence = torch.where(active, x0_p, -torch.inf)
                high = (confidence[0] > threshold) & active[0]
                if int(high.sum()) >= num_to_transfer:
                    m2t[0] = high
                else:
                    m2t[0, torch.topk(confidence[0], k=min(num_to_transfer, int(active.sum()))).indices] = True
            editable = ~active & ~in_prompt[None, :]
            t2t = torch.zeros_like(x0, dtype=torch.bool)
            t2t[0] = (torch.where(editable, x0_p, -torch.inf)[0] > editing_threshold) & editable[0] & (x0[0] != old[0])
            transfer = m2t | t2t
            if transfer.any():
                cur_x[:, -block_length:][transfer] = x0[transfer]
            if active.sum() == 0 and not t2t.any():
                break
        x[:, :window] = cur_x
        if eos_early_stop:
            generated = x[0, prompt_length:window]
            if (generated == mask_id).sum() == 0 and (generated == eos_id).any():
                break
    return _through_first_eos(x, prompt_length, gen_length, eos_id)
