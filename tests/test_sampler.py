"""The sampler against a plain re-statement of LLaDA's reference `generate`, on the tiny model.

Run: pytest tests/test_sampler.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.tokenizer import build_char_tokenizer
from rollout.sampler import (
    add_gumbel_noise,
    generate,
    generate_with_steps,
    num_transfer_tokens,
    select_transfer,
)

MASK_ID = build_char_tokenizer().mask_token_id


def tiny_model(seed: int = 0) -> BidirectionalModel:
    torch.manual_seed(seed)
    cfg = BidirectionalConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
    )
    return BidirectionalModel(cfg).eval()


@pytest.fixture(scope="module")
def model() -> BidirectionalModel:
    """A random model that, like a trained MDM, never predicts the mask token.

    Its mask logit is 0 while the 127 others are random, so it never is the argmax; the
    reference (which does not exclude mask_id) and the sampler then agree exactly.
    """
    m = tiny_model()
    with torch.no_grad():
        m.lm_head.weight[MASK_ID] = 0.0
    return m


def prompts(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 100, (batch, length), generator=g)  # (B, P), no special tokens


@torch.no_grad()
def reference_generate(model, prompt, *, steps, gen_length, block_length, mask_id, cfg_scale=0.0):
    """LLaDA's `generate` (ML-GSAI/LLaDA generate.py) at temperature 0, written out loop by loop."""
    b, p = prompt.shape
    x = torch.full((b, p + gen_length), mask_id, dtype=torch.long)
    x[:, :p] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for nb in range(num_blocks):
        block_end = p + (nb + 1) * block_length
        schedule = []
        for j in range(b):
            n = int((x[j, block_end - block_length : block_end] == mask_id).sum())
            base, extra = divmod(n, steps_per_block)
            schedule.append([base + (1 if i < extra else 0) for i in range(steps_per_block)])
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = model(x).logits
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                un_logits = model(un_x).logits
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            x0 = logits.argmax(dim=-1)
            p_x0 = F.softmax(logits, dim=-1).gather(-1, x0[..., None]).squeeze(-1)
            p_x0[:, block_end:] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, p_x0, torch.tensor(float("-inf")))
            for j in range(b):
                _, chosen = torch.topk(confidence[j], k=schedule[j][i])
                x[j, chosen] = x0[j, chosen]
    return x


@pytest.mark.parametrize(
    "steps, gen_length, block_length",
    [(12, 12, 12), (8, 16, 8), (6, 12, 4), (4, 10, 10)],  # one block; several; 3 blocks; uneven split
)
def test_matches_reference(model, steps, gen_length, block_length):
    prompt = prompts(3, 6)
    want = reference_generate(
        model, prompt, steps=steps, gen_length=gen_length, block_length=block_length, mask_id=MASK_ID
    )
    assert not (want == MASK_ID).any()
    got = generate(
        model, prompt, steps=steps, gen_length=gen_length, block_length=block_length, mask_id=MASK_ID
    )
    assert torch.equal(got, want)


def test_cfg_matches_reference_and_changes_tokens(model):
    prompt = prompts(2, 6)
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK_ID)
    guided = generate(model, prompt, cfg_scale=1.5, **kw)
    assert torch.equal(guided, reference_generate(model, prompt, cfg_scale=1.5, **kw))
    assert not torch.equal(guided, generate(model, prompt, **kw))


def left_padded_batch():
    tok = build_char_tokenizer()
    texts = ["ab", "hello", "x+y=12"]
    batch = tok(texts, padding=True, return_tensors="pt")
    alone = [tok([t], return_tensors="pt")["input_ids"] for t in texts]
    return batch["input_ids"], batch["attention_mask"], alone


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padded_batch_equals_each_prompt_alone(model, cfg_scale):
    ids, attention_mask, alone = left_padded_batch()
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK_ID, cfg_scale=cfg_scale)
    batched = generate(model, ids, attention_mask=attention_mask, **kw)
    assert torch.equal(batched[:, : ids.shape[1]], ids)  # padding and prompt untouched
    for row, single in enumerate(alone):
        assert torch.equal(batched[row, ids.shape[1] :], generate(model, single, **kw)[0, single.shape[1] :])
    # padding is never decoded, even when a tokenizer pads with the mask token itself
    mask_padded = ids.masked_fill(attention_mask == 0, MASK_ID)
    again = generate(model, mask_padded, attention_mask=attention_mask, **kw)
    assert torch.equal(again[:, : ids.shape[1]], mask_padded)
    assert torch.equal(again[:, ids.shape[1] :], batched[:, ids.shape[1] :])


@pytest.mark.parametrize(
    "remasking, temperature", [("random", 0.0), ("low_confidence", 1.0), ("random", 0.7)]
)
def test_seeded_sampling_is_reproducible(model, remasking, temperature):
    ids, attention_mask, _ = left_padded_batch()

    def run(seed: int) -> torch.Tensor:
        return generate(
            model, ids, attention_mask=attention_mask, steps=8, gen_length=16, block_length=8,
            mask_id=MASK_ID, temperature=temperature, remasking=remasking,
            generator=torch.Generator().manual_seed(seed),
        )

    first = run(0)
    assert torch.equal(first, run(0))
    assert not torch.equal(first, run(1))


def test_unmask_steps_follow_schedule_and_blocks(model):
    ids, attention_mask, _ = left_padded_batch()
    steps, gen_length, block_length = 6, 12, 4
    out = generate_with_steps(
        model, ids, attention_mask=attention_mask, steps=steps, gen_length=gen_length,
        block_length=block_length, mask_id=MASK_ID, remasking="random", temperature=1.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.tokens.shape == (3, ids.shape[1] + gen_length) and out.unmask_step.shape == (3, gen_length)
    assert torch.equal(out.tokens[:, : ids.shape[1]], ids)
    assert not (out.tokens == MASK_ID).any()
    # every response token unmasked at exactly one step, each step unmasking its scheduled share
    assert ((out.unmask_step >= 0) & (out.unmask_step < steps)).all()
    per_step = torch.stack([(out.unmask_step == s).sum(dim=1) for s in range(steps)], dim=1)  # (B, steps)
    steps_per_block = steps // (gen_length // block_length)
    schedule = num_transfer_tokens(torch.ones(3, block_length, dtype=torch.bool), steps_per_block)
    assert torch.equal(per_step, schedule.repeat(1, gen_length // block_length))
    # block b is decoded in block b's steps only
    block_of_token = torch.arange(gen_length) // block_length  # (L,)
    assert torch.equal(out.unmask_step // steps_per_block, block_of_token.expand(3, -1))


def test_untrained_model_predicting_mask_still_unmasks_everything():
    """An untrained model may put its argmax on mask_id; the reference would then leave masks."""
    m = tiny_model(seed=3)
    with torch.no_grad():
        m.lm_head.weight[MASK_ID] *= 100.0  # mask logit dominates wherever it is positive
    prompt = prompts(2, 5)
    assert (m(prompt).logits.argmax(-1) == MASK_ID).any()
    out = generate_with_steps(m, prompt, steps=4, gen_length=8, block_length=4, mask_id=MASK_ID)
    assert not (out.tokens == MASK_ID).any()
    assert (out.unmask_step >= 0).all()


def test_num_transfer_tokens_hand_example():
    mask_index = torch.zeros(3, 12, dtype=torch.bool)
    mask_index[0, :10] = True  # 10 masked over 4 steps
    mask_index[1, :] = True  # 12 over 4
    mask_index[2, :3] = True  # fewer tokens than steps
    assert num_transfer_tokens(mask_index, 4).tolist() == [[3, 3, 2, 2], [3, 3, 3, 3], [1, 1, 1, 0]]


def test_select_transfer_takes_top_k_per_row_and_skips_minus_inf():
    inf = float("-inf")
    confidence = torch.tensor([[0.1, 0.9, 0.5, inf], [inf, 0.2, 0.3, 0.4]])
    chosen = select_transfer(confidence, torch.tensor([2, 1]))
    assert chosen.tolist() == [[False, True, True, False], [False, False, False, True]]


def test_gumbel_temperature_zero_is_argmax():
    logits = torch.randn(4, 7, 11)
    assert add_gumbel_noise(logits, 0.0) is logits


def test_gumbel_is_finite_for_tiny_u_and_huge_logits(monkeypatch):
    logits = torch.tensor([[1e4, 0.0, -1e4], [1.0, 2.0, 3.0]])
    real_rand = torch.rand
    # a generator whose draws are exactly 0 and the smallest positive doubles
    tiny = torch.tensor([[0.0, 5e-324, 1e-300], [0.0, 0.0, 0.0]], dtype=torch.float64)
    monkeypatch.setattr(torch, "rand", lambda *a, **k: tiny.clone())
    noisy = add_gumbel_noise(logits, 1.0, torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch, "rand", real_rand)
    assert noisy.dtype == torch.float64 and torch.isfinite(noisy).all()
    # u = 0 clamped: equal (not infinite) noise leaves the argmax of the logits
    assert noisy[1].argmax() == 2 and (noisy[1] > 0).all()


def test_gumbel_max_samples_softmax_over_temperature():
    logits = torch.tensor([1.0, 0.0, -1.0]).expand(40_000, 3)
    temperature = 0.5
    draws = add_gumbel_noise(logits, temperature, torch.Generator().manual_seed(0)).argmax(-1)
    freq = torch.bincount(draws, minlength=3).double() / draws.numel()
    assert torch.allclose(freq, F.softmax(logits[0].double() / temperature, dim=-1), atol=0.01)


def test_rejects_unknown_remasking(model):
    # Block arithmetic (gen_length / block_length / steps) is dlrl.decoding.Decoding's to check:
    # tests/test_engines.py.
    with pytest.raises(ValueError, match="remasking must be one of"):
        generate(model, prompts(1, 3), steps=4, gen_length=8, block_length=4, mask_id=MASK_ID, remasking="x")


@pytest.mark.gpu
def test_cuda_matches_cpu(model):
    ids, attention_mask, _ = left_padded_batch()
    kw = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK_ID, attention_mask=attention_mask)
    on_cpu = generate(model, ids, **kw)
    cuda_model = tiny_model().cuda()
    with torch.no_grad():
        cuda_model.lm_head.weight[MASK_ID] = 0.0
    kw["attention_mask"] = attention_mask.cuda()
    on_cuda = generate(cuda_model, ids.cuda(), **kw)
    assert on_cuda.device.type == "cuda"
    assert torch.equal(on_cuda.cpu(), on_cpu)
