"""The block-diffusion engine (rollout/engines/block.py) against the published samplers it restates.

The published samplers are restated in tests/reference_models/: SDAR's `block_diffusion_generate`
(`JetAstra/SDAR@c2041a8:generate.py`, lines 57-202: KV cache, steps + 1 iterations per block) in
sdar_generate.py, and LLaDA2.0's threshold `generate` (`yjyddq/DARE@7016e0e`) and LLaDA2.1's
(`yjyddq/DARE@5877371`, with editing) in llada2_generate.py, both cache-free. Each drives the
model one prompt at a time, as published; the engine decodes ragged batches.

The algorithm tests run on random models under block masks: the built-in model (every native model
obeys a 4-D mask, position ids and a KVCache) with weights drawn at a scale that gives peaked,
varied distributions, and its mask row zeroed so that the mask token is never the published
samplers' choice either (the engine never draws it; the published code could). The engine-level
tests (block size, registry, worker) use the tiny SDAR-family model.

Run: pytest tests/test_block_engine.py -q
"""

from __future__ import annotations

import math

import pytest
import torch

from dlrl.decoding import Decoding
from dlrl.models import SpecialIds
from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.block_mask import block_causal_mask
from dlrl.models.kv_cache import KVCache
from rollout.completion import left_pad
from rollout.engines.block import (
    generate_block,
    row_generators,
    sample_tokens,
    step_mask,
    top_k_filter,
    top_p_filter,
)
from tests.reference_models import llada2_generate, sdar_generate

MASK_ID, EOS_ID, PAD_ID = 2, 1, 0
EOS_BIAS = 3.0
"""How far the EOS logit is pushed up in models that should end some completions early (not all)."""
SIZE = 4  # block length of the algorithm tests (SDAR's published default)
RULES = [("sequential", None), ("low_confidence_static", None), ("low_confidence_dynamic", 0.3)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_with(layers: int = 3, seed: int = 0, eos_bias: float | None = None) -> BidirectionalModel:
    """A random built-in model with peaked logits; the mask token's logit is 0 (never the published
    samplers' argmax, and outside any top-k of 20). eos_bias: how far EOS is pushed up, so that it
    ends some completions."""
    torch.manual_seed(seed)
    m = BidirectionalModel(BidirectionalConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
        mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)).eval()
    peaked(m, MASK_ID, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        if eos_bias is not None:
            m.embed.weight[:, 0] = 3.0
            m.lm_head.weight[EOS_ID, 0] = eos_bias
    return m


def peaked(model: torch.nn.Module, mask_id: int, generator: torch.Generator) -> None:
    """Redraw the weights (norms kept at 1) so that the head's logits spread by ~2.4: confidences
    vary between ~0.05 and ~0.9, the regime where the commit rules differ. The mask row is zeroed."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15, generator=generator)
        head = model.get_output_embeddings().weight
        head.normal_(0, 0.3, generator=generator)
        head[mask_id] = 0.0


def prompts_of(lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths]


def decode(model, prompts: list[list[int]], **kw):
    """The engine's loop on a left-padded batch of `prompts`; returns (responses (B, L), sample, stats)."""
    ids, attn = left_pad(prompts, PAD_ID)
    kw = {"mask_id": MASK_ID, "pad_id": PAD_ID, "eos_ids": (EOS_ID,), "block_length": SIZE, **kw}
    sample, stats = generate_block(model, ids, attention_mask=attn, **kw)
    return sample.tokens[:, ids.shape[1]:], sample, stats


def published_response(x: torch.Tensor, prompt_length: int, gen_length: int) -> torch.Tensor:
    """SDAR's output (1, blocks * B) -> the response's gen_length tokens, the masks it leaves after an
    EOS stop read as the EOS fill the engine writes (what follows an EOS is not read either way)."""
    response = x[0, prompt_length:prompt_length + gen_length].clone()
    return response.masked_fill(response == MASK_ID, EOS_ID)


def stream(seed: int, row: int) -> torch.Generator:
    """The generator the engine gives row `row` of a batch decoded with Generator().manual_seed(seed)."""
    return row_generators(torch.Generator().manual_seed(seed), row + 1, torch.device("cpu"))[row]


# --------------------------------------------------------------------------- sampling pieces

def test_top_k_and_top_p_filter_as_the_published_samplers():
    logits = torch.randn(6, 3, 50, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 5, 50):
        assert torch.equal(top_k_filter(logits, k), sdar_generate.top_k_logits(logits, k))
        assert torch.equal(top_k_filter(logits, k), llada2_generate._top_k_logits(logits, k))
    assert torch.equal(top_k_filter(logits, 10_000), logits)  # above the vocabulary: every token
    for p in (0.1, 0.5, 0.95):
        assert torch.equal(top_p_filter(logits, p), sdar_generate.top_p_logits(logits, p))
        assert torch.equal(top_p_filter(logits, p), llada2_generate._top_p_logits(logits, p))
    # By hand: probabilities .5 .3 .15 .05; at p = .75 the tokens before the third already hold .8 > .75.
    hand = torch.tensor([0.15, 0.5, 0.05, 0.3]).log()
    kept = top_p_filter(hand, 0.75).isfinite()
    assert kept.tolist() == [False, True, False, True]


def test_confidence_is_the_drawn_tokens_probability_under_the_tempered_filtered_distribution():
    logits = torch.randn(3, 4, 40, generator=torch.Generator().manual_seed(1)) * 2
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    x0, conf = sample_tokens(logits, temperature=0.5, top_k=5, top_p=0.9, mask_id=MASK_ID, generators=gens)
    filtered = top_p_filter(top_k_filter(logits / 0.5, 5), 0.9).softmax(-1)
    assert torch.allclose(conf, filtered.gather(-1, x0[..., None]).squeeze(-1))
    assert (filtered.gather(-1, x0[..., None]) > 0).all()  # drawn inside the top-k / nucleus
    x0, conf = sample_tokens(logits, temperature=0.0, top_k=5, top_p=0.9, mask_id=MASK_ID, generators=None)
    assert torch.equal(x0, logits.argmax(-1))  # LLaDA2.1's greedy branch: argmax, full softmax probability
    assert torch.allclose(conf, logits.softmax(-1).amax(-1))


def test_the_mask_token_is_never_drawn():
    logits = torch.zeros(2, 4, 40)
    logits[..., MASK_ID] = 20.0  # the mask is the model's clear favourite
    for temperature, top_k in ((0.0, None), (1.0, None), (1.0, 1)):  # top-1 keeps only the mask: draw the rest
        gens = None if temperature == 0 else [torch.Generator().manual_seed(i) for i in range(2)]
        x0, _ = sample_tokens(logits, temperature=temperature, top_k=top_k, top_p=None, mask_id=MASK_ID,
                              generators=gens)
        assert not (x0 == MASK_ID).any()


# --------------------------------------------------------------------------- the published samplers

@pytest.mark.parametrize("rule, threshold, steps, lengths", [
    *[(rule, threshold, SIZE, [3, 4, 5, 8, 11, 1]) for rule, threshold in RULES],
    *[(rule, None, 2, [4, 8, 12]) for rule in ("sequential", "low_confidence_static")],
])
def test_equals_sdar_generate_token_for_token_at_temperature_0(rule, threshold, steps, lengths):
    """Each row of a ragged batch is SDAR's published generate of that prompt alone, with EOS stops.
    At steps < block_length: prompts on a block boundary and the static rules only, where masks >= n_s
    at every step; elsewhere the published topk re-writes positions that are not masks (test below)."""
    m, gen_length = model_with(eos_bias=EOS_BIAS), 14
    prompts = prompts_of(lengths)
    got, _, _ = decode(m, prompts, gen_length=gen_length, steps=steps, block_remasking=rule, threshold=threshold)
    stopped = 0
    for i, p in enumerate(prompts):
        x = sdar_generate.block_diffusion_generate(
            m, torch.tensor([p]), MASK_ID, gen_length=gen_length, block_length=SIZE, denoising_steps=steps,
            temperature=0.0, remasking_strategy=rule, confidence_threshold=threshold, stopping_criteria_idx=[EOS_ID])
        assert torch.equal(got[i], published_response(x, len(p), gen_length)), (i, p)
        stopped += int((x[0, len(p):] == MASK_ID).any())
    assert stopped and not (got == MASK_ID).any()  # some rows stopped at an EOS before their end


@pytest.mark.parametrize("rule, threshold", RULES[1:])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, None), (1.0, 20, 0.8), (1.3, 10, 0.95)])
def test_equals_sdar_generate_when_sampling_each_row_from_its_own_stream(rule, threshold, temperature, top_k, top_p):
    """With temperature, top-k and top-p, row i of a ragged batch is SDAR's generate of its prompt
    alone, drawing from the stream the engine gives row i: the same draws, token for token."""
    m, gen_length, seed = model_with(), 12, 11
    prompts = prompts_of([5, 8, 2, 7])
    got, _, _ = decode(m, prompts, gen_length=gen_length, steps=4, block_remasking=rule, threshold=threshold,
                       temperature=temperature, top_k=top_k, top_p=top_p, generator=torch.Generator().manual_seed(seed))
    for i, p in enumerate(prompts):
        x = sdar_generate.block_diffusion_generate(
            m, torch.tensor([p]), MASK_ID, gen_length=gen_length, block_length=SIZE, denoising_steps=4,
            temperature=temperature, top_k=top_k, top_p=top_p or 1.0, remasking_strategy=rule,
            confidence_threshold=threshold, stopping_criteria_idx=[EOS_ID], generator=stream(seed, i))
        assert torch.equal(got[i], published_response(x, len(p), gen_length))


def test_sdar_generate_rewrites_prompt_tokens_where_fewer_masks_than_scheduled_remain():
    """The departure, shown: with 3 prompt tokens in the first decoded block and 2 tokens scheduled a
    step, SDAR's topk asks for 2 positions when one mask is left and re-samples a prompt token. The
    engine takes min(n_s, masks left), as LLaDA2.0 does, and equals LLaDA2.0's generate."""
    m, gen_length = model_with(), 9
    prompt = prompts_of([3])[0]
    x = sdar_generate.block_diffusion_generate(m, torch.tensor([prompt]), MASK_ID, gen_length=gen_length,
                                               block_length=SIZE, denoising_steps=2, temperature=0.0,
                                               remasking_strategy="low_confidence_static")
    assert x[0, :3].tolist() != prompt  # the published code changed the prompt
    got, sample, _ = decode(m, [prompt], gen_length=gen_length, steps=2, block_remasking="low_confidence_dynamic",
                            threshold=0.999, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(4))
    assert sample.tokens[0, :3].tolist() == prompt
    want = llada2_generate.generate_v20(m, torch.tensor([prompt]), temperature=1.0, block_length=SIZE, steps=2,
                                        gen_length=gen_length, top_k=20, threshold=0.999, eos_id=EOS_ID,
                                        mask_id=MASK_ID, generator=stream(4, 0))
    assert torch.equal(got[0, :want.shape[1]], want[0])


@pytest.mark.parametrize("steps", [4, 2, 1])
def test_equals_llada20_threshold_generate(steps):
    """LLaDA2.0's threshold rule is the dynamic rule (min(n_s, masks) in its fallback), decoded with no
    cache at all: the whole prefix is recomputed at every step."""
    m, gen_length, seed = model_with(eos_bias=EOS_BIAS), 14, 3
    prompts = prompts_of([6, 3, 9, 4])
    got, _, _ = decode(m, prompts, gen_length=gen_length, steps=steps, block_remasking="low_confidence_dynamic",
                       threshold=0.2, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(seed))
    for i, p in enumerate(prompts):
        want = llada2_generate.generate_v20(m, torch.tensor([p]), temperature=0.8, block_length=SIZE, steps=steps,
                                            gen_length=gen_length, top_k=20, threshold=0.2, eos_id=EOS_ID,
                                            mask_id=MASK_ID, generator=stream(seed, i))
        assert torch.equal(got[i, :want.shape[1]], want[0])  # 2.0 returns the response through its first EOS


def test_llada20_samples_at_temperature_1_when_given_0_the_engine_is_greedy():
    """The published 2.0 quirk, kept in the restatement and not in the engine: 2.0 at T = 0 is the
    engine at T = 1 (same draws); the engine at T = 0 is 2.1's argmax."""
    m, gen_length, prompt = model_with(), 12, prompts_of([5])[0]
    quirk = llada2_generate.generate_v20(m, torch.tensor([prompt]), temperature=0.0, block_length=SIZE, steps=4,
                                         gen_length=gen_length, top_k=20, threshold=0.5, eos_id=EOS_ID,
                                         mask_id=MASK_ID, generator=stream(8, 0))
    kw = dict(gen_length=gen_length, steps=4, block_remasking="low_confidence_dynamic", threshold=0.5, top_k=20)
    at_one, _, _ = decode(m, [prompt], temperature=1.0, generator=torch.Generator().manual_seed(8), **kw)
    greedy, _, _ = decode(m, [prompt], temperature=0.0, **kw)
    assert torch.equal(at_one[0, :quirk.shape[1]], quirk[0]) and not torch.equal(greedy, at_one)


def test_equals_llada21_generate_without_editing_at_steps_equal_block_length():
    """LLaDA2.1 with editing off (no edit can pass an editing threshold of 1, no post-mask steps):
    threshold else top-1 each step, as many steps as needed = the dynamic rule at steps = block_length."""
    m, gen_length = model_with(eos_bias=EOS_BIAS), 14
    prompts = prompts_of([6, 3, 9, 4, 1])
    got, _, _ = decode(m, prompts, gen_length=gen_length, steps=SIZE, block_remasking="low_confidence_dynamic",
                       threshold=0.25)
    for i, p in enumerate(prompts):
        want = llada2_generate.generate_v21(m, torch.tensor([p]), temperature=0.0, block_length=SIZE,
                                            gen_length=gen_length, threshold=0.25, editing_threshold=1.0,
                                            max_post_steps=0, eos_id=EOS_ID, mask_id=MASK_ID)
        assert torch.equal(got[i, :want.shape[1]], want[0])


# --------------------------------------------------------------------------- the cache

def test_a_block_step_through_the_cache_has_the_full_forwards_logits():
    """The cache is exact: after the committed blocks' clean keys/values are written, a step that
    forwards the current block alone gives the logits of a full block-causal forward of the prefix
    (to float rounding), in a ragged batch of a 3-layer model."""
    m = model_with(layers=3)
    ids, attn = left_pad(prompts_of([8, 4, 12]), PAD_ID)  # pads of 4, 8, 0: on the grid, as the engine lays rows
    x = torch.cat([ids, torch.randint(4, 100, (3, 4)), torch.full((3, 4), MASK_ID)], dim=1)  # (3, 20)
    x[:, -2] = 7  # the current block is partly decoded
    real = torch.cat([attn, torch.ones(3, 8, dtype=attn.dtype)], dim=1).bool()
    positions = (real.long().cumsum(1) - 1).clamp(min=0)
    blocks = positions // SIZE
    with torch.no_grad():
        full = m(x, attention_mask=block_causal_mask(real.long(), 20, SIZE), position_ids=positions).logits
        kv = KVCache()
        m(x[:, :16], attention_mask=step_mask(real, blocks, 0, 16, 16), position_ids=positions[:, :16],
          kv_cache=kv, cache_start=0)
        kv.reserve(20)
        step = m(x[:, 16:], attention_mask=step_mask(real, blocks, 16, 20, 20), position_ids=positions[:, 16:],
                 kv_cache=kv.prefix(20), cache_start=16).logits
    assert torch.allclose(step, full[:, 16:], atol=1e-5)


@pytest.mark.parametrize("rule, threshold", RULES)
def test_cached_decoding_equals_uncached_decoding(rule, threshold):
    """The cache is exact, so cached decoding is uncached decoding token for token: the engine (cached,
    denoising steps read it, a clean forward writes each block) against the same rule decoded with
    a full block-causal forward of the whole prefix at every step (LLaDA2's way), on a ragged batch."""
    m, gen_length = model_with(layers=3, eos_bias=EOS_BIAS), 14
    prompts = prompts_of([6, 3, 9, 4, 12])
    got, _, _ = decode(m, prompts, gen_length=gen_length, steps=SIZE, block_remasking=rule, threshold=threshold)
    for i, p in enumerate(prompts):
        want = uncached(m, p, gen_length, rule, threshold)
        assert torch.equal(got[i], want)


def uncached(model, prompt: list[int], gen_length: int, rule: str, threshold: float | None) -> torch.Tensor:
    """One prompt decoded with no cache: every step forwards the whole prefix through the current block
    under its block-causal mask; steps = block_length (one scheduled token a step); EOS stop after
    the block; the rest EOS."""
    p = len(prompt)
    total = -(-(p + gen_length) // SIZE) * SIZE
    x = torch.full((1, total), MASK_ID)
    x[0, :p] = torch.tensor(prompt)
    for b in range(p // SIZE, total // SIZE):
        start, end = b * SIZE, (b + 1) * SIZE
        while (x[0, start:end] == MASK_ID).any():
            with torch.no_grad():
                logits = model(x[:, :end], attention_mask=block_causal_mask(None, end, SIZE)).logits[0, start:]
            conf, token = logits.softmax(-1).max(-1)
            masked = x[0, start:end] == MASK_ID
            conf = conf.masked_fill(~masked, -math.inf)
            if rule == "sequential":
                pick = int(masked.nonzero()[0])
            else:
                pick = int(conf.argmax())
                if rule == "low_confidence_dynamic" and (conf > threshold).any():
                    x[0, start:end] = torch.where(conf > threshold, token, x[0, start:end])
                    continue
            x[0, start + pick] = token[pick]
        if (x[0, p:end] == EOS_ID).any():
            x[0, end:] = EOS_ID
            break
    return x[0, p:p + gen_length]


# --------------------------------------------------------------------------- batches

@pytest.mark.parametrize("rule, threshold", RULES)
def test_rows_alone_equal_rows_in_a_ragged_batch(rule, threshold):
    m, gen_length = model_with(eos_bias=EOS_BIAS), 14
    prompts = prompts_of([1, 4, 7, 13, 2, 8])
    batch, sample, _ = decode(m, prompts, gen_length=gen_length, steps=SIZE, block_remasking=rule, threshold=threshold)
    for i, p in enumerate(prompts):
        alone, one, _ = decode(m, [p], gen_length=gen_length, steps=SIZE, block_remasking=rule, threshold=threshold)
        assert torch.equal(batch[i], alone[0]) and torch.equal(sample.unmask_step[i], one.unmask_step[0])


def test_a_sampled_row_does_not_depend_on_the_rest_of_its_batch():
    """Row i draws from its own stream (the call's seed and i): its tokens are the same whatever the
    other rows are, how long their prompts or when they stop; row 0 is the same decoded alone."""
    m = model_with(eos_bias=EOS_BIAS)
    kw = dict(gen_length=14, steps=SIZE, block_remasking="low_confidence_dynamic", threshold=0.4, temperature=1.0,
              top_k=20, top_p=0.9)
    a, b, c = prompts_of([6, 3, 10], seed=5)
    d, e = prompts_of([1, 12], seed=6)
    first, _, _ = decode(m, [a, b, c], generator=torch.Generator().manual_seed(2), **kw)
    other, _, _ = decode(m, [a, d, c, e], generator=torch.Generator().manual_seed(2), **kw)
    alone, _, _ = decode(m, [a], generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(first[0], other[0]) and torch.equal(first[2], other[2]) and torch.equal(first[0], alone[0])
    again, _, _ = decode(m, [a, b, c], generator=torch.Generator().manual_seed(3), **kw)
    assert not torch.equal(again, first)


# --------------------------------------------------------------------------- EOS stop and stats

def test_eos_stops_a_row_after_its_block_commits():
    """A model that favours EOS everywhere: the first decoded block (mixed with the prompt's last
    tokens) commits EOS and the row stops there, its later blocks never forwarded, the rest of the
    response filled with EOS at the row's last step."""
    m = model_with(layers=2, eos_bias=50.0)
    prompts = prompts_of([6, 9])
    got, sample, stats = decode(m, prompts, gen_length=12, steps=SIZE, block_remasking="low_confidence_static")
    assert (got == EOS_ID).all()
    # Work layout: row 0 (3 pads, moved left by 3) has its prompt at [0, 6), row 1 at [0, 9). Prefill
    # [0, 4). Column [4, 8): row 0 decodes 2 positions in 2 steps and stops; row 1 is still prompt
    # there, so it only gets the clean write. Column [8, 12): row 1 decodes 3 positions and stops.
    assert stats.forwards == 1 + 2 + 1 + 3 and stats.row_steps == 2 + 3 and stats.committed == 5
    assert stats.metrics()["rollout_eos_position"] == 0
    assert sorted(sample.unmask_step[0, :2].tolist()) == [0, 1] and (sample.unmask_step[0, 2:] == 1).all()
    assert sorted(sample.unmask_step[1, :3].tolist()) == [0, 1, 2] and (sample.unmask_step[1, 3:] == 2).all()


def test_stats_count_every_forward_and_each_rows_steps():
    """Prompts of 4 and 6 tokens, block 4, 8 tokens each, 4 steps a block, no EOS possible. Work
    layout: both rows start at column 0; row 0's response is [4, 12), row 1's [6, 14), decoded to the
    end of its block (16). Prefill [0, 4): 1 forward. Column 1: 4 steps (row 1 takes 2), then its
    clean write. Column 2: 4 steps each; row 0 ends, row 1's write. Column 3: row 1's 4 steps."""
    m = model_with()
    with torch.no_grad():
        m.lm_head.weight[EOS_ID] = 0.0  # never the argmax: no row stops early
    got, sample, stats = decode(m, prompts_of([4, 6]), gen_length=8, steps=SIZE, block_remasking="low_confidence_static")
    assert stats.rows == 2 and stats.forwards == 1 + 4 + 1 + 4 + 1 + 4
    assert stats.row_steps == (4 + 2) + (4 + 4) + 4 and stats.committed == 8 + (2 + 4 + 4)
    assert stats.confidence_count == stats.committed and 0 < stats.confidence_sum < stats.committed
    metrics = stats.metrics()
    assert metrics["rollout_tokens_per_step"] == 1.0 and metrics["rollout_eos_position"] == 8.0
    assert sorted(sample.unmask_step[0].tolist()) == list(range(8))
    assert sorted(sample.unmask_step[1, :2].tolist()) == [0, 1] and sorted(sample.unmask_step[1, 2:6].tolist()) == [2, 3, 4, 5]
    assert set(sample.unmask_step[1, 6:].tolist()) <= {6, 7, 8, 9}


def test_a_dynamic_threshold_commits_several_tokens_a_step():
    m = model_with()
    _, _, strict = decode(m, prompts_of([5, 7]), gen_length=16, steps=SIZE, block_remasking="low_confidence_static")
    _, _, fast = decode(m, prompts_of([5, 7]), gen_length=16, steps=SIZE, block_remasking="low_confidence_dynamic",
                        threshold=0.05)
    assert strict.metrics()["rollout_tokens_per_step"] == 1.0
    assert fast.metrics()["rollout_tokens_per_step"] > 1.5 and fast.forwards < strict.forwards


# --------------------------------------------------------------------------- decoding options

def test_steps_count_per_block_for_the_block_engine_and_per_response_for_the_others():
    base = dict(gen_length=256, block_length=4, block_remasking="low_confidence_dynamic", threshold=0.9)
    assert Decoding(engine="block", steps=4, **base).steps == 4  # SDAR / TraDo: 4 steps a block, 256 tokens
    Decoding(engine="block", steps=3, **{**base, "gen_length": 10})  # the global grid: any length
    with pytest.raises(ValueError, match="steps 5 \\(denoising steps per block, engine 'block'\\) exceed block_length 4"):
        Decoding(engine="block", steps=5, **base)
    with pytest.raises(ValueError, match="steps 4 is not a multiple of the number of blocks 64"):
        Decoding(engine="reference", steps=4, gen_length=256, block_length=4)


@pytest.mark.parametrize("field, bad, good", [("top_k", 0, 1), ("top_k", (1 << 20) + 1, 1 << 20),
                                              ("top_p", 1.0, 0.99), ("top_p", 0.0, 0.01),
                                              ("block_remasking", "entropy_bounded", "sequential")])
def test_block_options_are_bounded_in_the_type(field, bad, good):
    base = dict(engine="block", gen_length=8, block_length=4, steps=4, block_remasking="low_confidence_static")
    with pytest.raises(ValueError, match=field):
        Decoding(**{**base, field: bad})
    Decoding(**{**base, field: good})


@pytest.mark.parametrize("fields, message", [
    ({}, "engine = 'block' needs block_remasking"),
    ({"block_remasking": "low_confidence_dynamic"}, "takes threshold with block_remasking = 'low_confidence_dynamic'"),
    ({"block_remasking": "sequential", "threshold": 0.9}, "takes threshold with"),
    ({"block_remasking": "sequential", "remasking": "random"}, "remasking = 'random' is the LLaDA engines' option"),
    ({"block_remasking": "sequential", "factor": 1.0}, "does not take factor"),
    ({"block_remasking": "sequential", "cfg_scale": 1.0}, "does not do classifier-free guidance"),
    ({"engine": "reference", "top_k": 5}, "top_k need engine = 'block', not 'reference'"),
    ({"engine": "cached", "top_p": 0.9, "block_remasking": "sequential"}, "top_p / block_remasking need engine = 'block'"),
])
def test_each_engine_refuses_the_others_options(fields, message):
    from rollout.engines import check_decoding

    with pytest.raises(ValueError, match=message):
        check_decoding(Decoding(**{"engine": "block", "gen_length": 8, "block_length": 4, "steps": 4, **fields}))


# --------------------------------------------------------------------------- through the engine seam

def sdar_model(block_size: int = SIZE, seed: int = 0):
    """The tiny SDAR-family model (dlrl.models.tiny), peaked logits, mask row zeroed; its ids."""
    from dlrl.models import special_ids
    from dlrl.models.tiny import build_tiny_sdar

    model, tokenizer = build_tiny_sdar(block_size=block_size, seed=seed)
    ids = special_ids(model, tokenizer)
    peaked(model, ids.mask_id, torch.Generator().manual_seed(seed))
    return model.eval(), tokenizer, ids


BLOCK = dict(engine="block", gen_length=12, block_length=SIZE, steps=SIZE, block_remasking="low_confidence_dynamic",
             threshold=0.3)


def test_the_engine_decodes_an_sdar_model_as_sdar_generate():
    from rollout.engines import make_engine
    from rollout.engines.block import BlockEngine

    model, _, ids = sdar_model()
    decoding = Decoding(**BLOCK)
    engine = make_engine(decoding, model, ids)
    assert isinstance(engine, BlockEngine) and engine.model is model
    prompts = prompts_of([5, 8, 2])
    prompt, attn = left_pad(prompts, ids.pad_id)
    sample, stats = engine.generate(prompt, attn, decoding)
    assert sample.tokens.shape == (3, prompt.shape[1] + 12) and stats.rows == 3
    for i, p in enumerate(prompts):
        x = sdar_generate.block_diffusion_generate(
            model, torch.tensor([p]), ids.mask_id, gen_length=12, block_length=SIZE, denoising_steps=SIZE,
            temperature=0.0, confidence_threshold=0.3, stopping_criteria_idx=list(ids.eos_ids))
        response = x[0, len(p):len(p) + 12]
        want = response.masked_fill(response == ids.mask_id, ids.eos_ids[0])
        assert torch.equal(sample.tokens[i, prompt.shape[1]:], want)


def test_the_block_length_must_be_the_models_trained_block_size():
    from rollout.engines import make_engine

    model, _, ids = sdar_model(block_size=8)
    decoding = Decoding(**BLOCK)
    engine = make_engine(decoding, model, ids)  # check() sees no model: generate refuses
    with pytest.raises(ValueError, match="block_length 4 is not the model's trained block size 8"):
        engine.generate(*left_pad([[5, 6, 7]], ids.pad_id), decoding)
    full = BidirectionalModel(BidirectionalConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                  num_attention_heads=4, intermediate_size=64))
    ids = SpecialIds(mask_id=2, pad_id=0, eos_ids=(1,))
    with pytest.raises(ValueError, match="engine = 'block' decodes block-diffusion models; family 'tiny'"):
        make_engine(decoding, full, ids).generate(*left_pad([[5, 6, 7]], 0), decoding)


def test_weights_taken_reach_the_next_generate_and_every_draw_comes_from_the_generator():
    from rollout.engines import make_engine

    decoding = Decoding(**{**BLOCK, "temperature": 1.0, "top_k": 20})
    old, _, ids = sdar_model(seed=0)
    new, _, _ = sdar_model(seed=1)
    prompt, attn = left_pad(prompts_of([3, 6]), ids.pad_id)
    engine = make_engine(decoding, old, ids)
    want, _ = make_engine(decoding, new, ids).generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    before, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    again, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    other, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(9))
    assert torch.equal(before.tokens, again.tokens) and not torch.equal(before.tokens, other.tokens)
    engine.load_weights(new.state_dict())
    after, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    assert not torch.equal(before.tokens, want.tokens) and torch.equal(after.tokens, want.tokens)


def test_evaluation_and_the_worker_decode_with_the_block_engine(tmp_path):
    """The worker's rollouts and its built-in evaluation (greedy, eval.remasking = the LLaDA default,
    which the block engine does not use) go through make_engine; `dlrl train`'s front door asks the
    registry too."""
    from dlrl.config import JobSpec
    from rollout.worker import RolloutWorker
    from services.cli import _engine_problem

    model, tokenizer, _ = sdar_model()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    rollout = {"prompts_per_step": 2, "group_size": 3, "gen_length": 12, "block_length": SIZE, "steps": SIZE,
               "temperature": 1.0, "engine": "block", "block_remasking": "low_confidence_dynamic",
               "threshold": 0.3, "top_k": 20, "batch_size": 6}
    spec = JobSpec.model_validate({"model": {"path": str(tmp_path / "m")}, "task": {"name": "sudoku", "train_size": 6},
                                   "rollout": rollout, "runtime": {"device": "cpu", "threads": 1}})
    assert _engine_problem(spec) is None
    worker = RolloutWorker(spec)
    groups = worker.rollout(2, batch=0)
    assert all(g.completion_ids.shape == (3, 12) for g in groups)
    assert worker.sampler_stats.rows == 6 and worker.sampler_stats.forwards > 0
    metrics = worker.evaluate(4)
    assert {"eval_reward", "eval_tokens_per_step", "eval_mean_confidence", "eval_forwards"} <= set(metrics)
    bad = spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"block_remasking": None})})
    assert "needs block_remasking" in _engine_problem(bad)
