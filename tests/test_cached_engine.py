"""The cached rollout engine (rollout/engines/cached.py) against the reference sampler, full forwards
and Fast-dLLM's published commit rules.

Run: pytest tests/test_cached_engine.py -q
"""

from __future__ import annotations

import pytest
import torch

from dlrl.config import JobSpec
from dlrl.decoding import Decoding
from dlrl.models import SpecialIds, load_model, special_ids
from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from dlrl.models.forward import diffusion_logits
from dlrl.models.kv_cache import KVCache
from dlrl.tasks import get_task
from rollout.commit_policy import commit_factor, commit_scheduled, commit_threshold
from rollout.completion import encode_prompt, evaluate, left_pad
from rollout.engines import make_engine
from rollout.engines.cached import block_logits, generate_cached
from rollout.sampler import generate_with_steps, select_transfer
from rollout.worker import RolloutWorker

MASK_ID, EOS_ID, PAD_ID = 2, 1, 0
IDS = SpecialIds(mask_id=MASK_ID, pad_id=PAD_ID, eos_ids=(EOS_ID,))


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_with(layers: int, seed: int = 0) -> BidirectionalModel:
    """A random built-in model that never predicts the mask token (its mask logit is 0)."""
    torch.manual_seed(seed)
    m = BidirectionalModel(BidirectionalConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=128,
        mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)).eval()
    with torch.no_grad():
        m.lm_head.weight[MASK_ID] = 0.0
    return m


def ragged(lengths: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given lengths: (B, P) ids and attention mask."""
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(4, 100, (n,), generator=g).tolist() for n in lengths], PAD_ID)


def test_reference_engine_is_the_sampler_bit_for_bit():
    m = model_with(2)
    prompt, attn = ragged([5, 8, 3])
    decoding = Decoding(gen_length=12, block_length=4, steps=6, temperature=1.0, remasking="low_confidence")
    got, stats = make_engine(decoding, m, IDS).generate(prompt, attn, decoding, torch.Generator().manual_seed(3))
    want = generate_with_steps(m, prompt, steps=6, gen_length=12, block_length=4, temperature=1.0,
                               mask_id=MASK_ID, attention_mask=attn, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.unmask_step, want.unmask_step)
    assert stats.metrics()["rollout_tokens_per_step"] == 2.0 and stats.forwards == 6


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_step_logits_equal_full_forward_right_after_refresh(cache):
    """After a refresh every cached key is exact, so a block step (forwarding only the block, or the
    block and suffix) gives the full forward's logits; after a commit in the block it no longer does
    (the cached prompt keys of a 3-layer model saw the mask that is now a token)."""
    m = model_with(3)
    prompt, attn = ragged([6, 9, 4])
    p, gen, start, end = prompt.shape[1], 12, prompt.shape[1] + 4, prompt.shape[1] + 8
    x = torch.cat([prompt, torch.full((3, gen), MASK_ID)], dim=1)
    x[:, p:start] = torch.randint(4, 100, (3, 4))  # the first block is decoded
    am = torch.cat([attn, torch.ones(3, gen, dtype=attn.dtype)], dim=1)
    fwd_end = x.shape[1] if cache == "prefix" else end
    with torch.no_grad():
        kv = KVCache()
        refresh = block_logits(m, x, am, kv, start=0, end=x.shape[1], block=(start, end))
        step = block_logits(m, x, am, kv, start=start, end=fwd_end, block=(start, end))
        full = diffusion_logits(m, x, am)[:, start:end]
        assert step.shape == (3, 4, 128)
        torch.testing.assert_close(refresh, full, rtol=0, atol=1e-5)
        torch.testing.assert_close(step, full, rtol=0, atol=1e-5)
        x[:, start] = 7  # commit one token of the block: the cached keys are now stale
        stale = block_logits(m, x, am, kv, start=start, end=fwd_end, block=(start, end))
        assert (stale - diffusion_logits(m, x, am)[:, start:end]).abs().max() > 1e-4


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_layer_model_cached_equals_reference_token_for_token(cache):
    """With one layer a cached key depends only on its own token, so the cache is exact at every
    step: the scheduled cached engine must reproduce the reference sampler exactly."""
    m = model_with(1)
    prompt, attn = ragged([5, 8, 3, 7])
    want = generate_with_steps(m, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                               attention_mask=attn)
    got, stats = generate_cached(m, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                                 eos_ids=(EOS_ID,), attention_mask=attn, cache=cache)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.unmask_step, want.unmask_step)
    assert stats.forwards == 8 and stats.committed == 4 * 16


def test_threshold_commits_every_position_above_tau_and_at_least_one():
    g = torch.Generator().manual_seed(0)
    confidence = torch.rand(64, 10, generator=g)
    confidence[torch.rand(64, 10, generator=g) < 0.3] = float("-inf")  # not masked / outside the block
    confidence[0] = float("-inf")
    confidence[0, 4] = 0.01  # a row whose only candidate is below tau
    chosen = commit_threshold(confidence, confidence.clamp(min=0), 0.7)
    eligible = confidence > float("-inf")
    assert not (chosen & ~eligible).any()
    assert ((confidence > 0.7) & eligible).le(chosen).all()  # every position above tau
    best = confidence.argmax(dim=1)
    assert chosen[torch.arange(64), best].all()  # and each row's best one
    assert (chosen & ~(confidence > 0.7)).sum(dim=1).le(1).all()  # nothing else below tau
    assert chosen[0].tolist() == [False] * 4 + [True] + [False] * 5


def test_factor_rule_hand_example():
    # ranked 0.99, 0.9, 0.8, 0.5: (n+1)(1-c) = 0.02, 0.3, 0.8, 2.5. Factor 0.1 takes 1. Factor 1.5
    # takes 3 of the 4 (2.5 > 1.5) plus, as Fast-dLLM's code does, the 4th: all but the last passed.
    confidence = torch.tensor([[0.8, 0.99, float("-inf"), 0.5, 0.9]])
    prob = confidence.clamp(min=0)
    assert commit_factor(confidence, prob, 1.5).tolist() == [[True, True, False, True, True]]
    assert commit_factor(confidence, prob, 0.5).tolist() == [[False, True, False, False, True]]
    assert commit_factor(confidence, prob, 0.1).tolist() == [[False, True, False, False, False]]
    assert commit_factor(confidence, prob, 0.001).sum() == 1  # at least one
    assert commit_factor(confidence, prob, 100.0).tolist() == [[True, True, False, True, True]]  # never an ineligible


def fast_dllm_factor_count(ranked: list[float], factor: float) -> int:
    """How many masked positions Fast-dLLM's factor rule commits in one row, given their confidences
    in descending order: a restatement of the loop of `get_transfer_index_dynamic` in
    NVlabs/Fast-dLLM llada/generate.py at revision f6b35ec3f1b16e1b3d3357938046559ae2d350fa.

    Position i (0-based) passes when its confidence is at least 1 - factor / (i + 2), the first
    always; the scan stops at the first that fails. The count is the stop index, except that a
    stop at index 0 or at the last index (and a scan that never stops, which also ends on the last
    index) counts one more."""
    last = len(ranked) - 1
    stop = last
    for i, c in enumerate(ranked):
        if c < (-1.0 if i == 0 else 1.0 - factor / (i + 2)):
            stop = i
            break
    return stop + 1 if stop in (0, last) else stop


@pytest.mark.parametrize("factor", [0.05, 0.3, 1.0, 2.0, 6.0])
def test_factor_rule_commits_what_fast_dllm_commits(factor):
    """Under low-confidence remasking (score = probability) dlrl's factor rule commits the same
    positions as the published one, its "all but the last passed: commit all" case included."""
    g = torch.Generator().manual_seed(int(factor * 100))
    prob = torch.rand(400, 8, generator=g) ** 0.2  # mostly confident, as a trained model is
    masked = torch.rand(400, 8, generator=g) < 0.7
    masked[:, 0] = True  # every row has something to commit
    prob[:40, 1:] = 0.999  # rows where nearly everything passes
    score = prob.masked_fill(~masked, float("-inf"))
    got = commit_factor(score, prob, factor)
    assert not (got & ~masked).any()
    extra = 0  # rows where the published rule commits one that failed the bound
    for row in range(400):
        ranked = sorted(prob[row][masked[row]].tolist(), reverse=True)
        n = fast_dllm_factor_count(ranked, factor)
        assert int(got[row].sum()) == n
        assert prob[row][got[row]].min() >= ranked[n - 1]  # and they are the n most probable
        extra += n > 1 and (n + 1) * (1 - ranked[n - 1]) > factor
    assert extra > 0


def test_under_random_remasking_the_parallel_set_is_judged_by_probability():
    """Random scores pick the one forced commit; which positions go in parallel is the model's call."""
    score = torch.tensor([[0.1, 0.7, 0.3, float("-inf")]])  # uniform draws; position 3 not masked
    prob = torch.tensor([[0.95, 0.2, 0.97, 0.99]])
    assert commit_threshold(score, prob, 0.9).tolist() == [[True, True, True, False]]
    # 2(0.03), 3(0.05) <= 0.5 < 4(0.8): the two most probable, and the third since only it failed
    assert commit_factor(score, prob, 0.5).tolist() == [[True, True, True, False]]
    assert commit_threshold(score, torch.zeros(1, 4), 0.9).tolist() == [[False, True, False, False]]


def test_scheduled_policy_is_the_reference_selection():
    confidence = torch.tensor([[0.2, float("-inf"), 0.9, 0.5], [0.1, 0.3, float("-inf"), float("-inf")]])
    k = torch.tensor([2, 3])
    assert commit_scheduled(confidence, k).tolist() == [[False, False, True, True], [True, True, False, False]]
    assert torch.equal(commit_scheduled(confidence, k) | ~(confidence > float("-inf")),
                       select_transfer(confidence, k) | ~(confidence > float("-inf")))


def eos_model() -> BidirectionalModel:
    """A model that predicts EOS everywhere: a large constant channel in every embedding reaches the
    head, where only EOS reads it."""
    m = model_with(2)
    with torch.no_grad():
        m.embed.weight[:, 0] = 50.0
        m.lm_head.weight[EOS_ID, 0] = 5.0
    return m


def test_a_block_of_eos_ends_the_row():
    m = eos_model()
    prompt, attn = ragged([5, 3])
    got, stats = generate_cached(m, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                                 eos_ids=(EOS_ID,), attention_mask=attn, threshold=0.9)
    want = generate_with_steps(m, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                               attention_mask=attn)
    assert (want.tokens[:, prompt.shape[1]:] == EOS_ID).all()
    assert torch.equal(got.tokens, want.tokens)
    # one forward decodes the whole first block (every EOS above tau); the other three blocks are skipped
    assert stats.forwards == 1 and stats.committed == 2 * 4 and stats.metrics()["rollout_eos_position"] == 0
    assert (got.unmask_step == 0).all()


def test_ragged_batch_rows_equal_rows_alone():
    m = model_with(3)
    lengths = [6, 2, 9, 4]
    prompt, attn = ragged(lengths)
    kwargs = dict(steps=8, gen_length=16, block_length=8, mask_id=MASK_ID, eos_ids=(EOS_ID,), factor=4.0)
    batch, stats = generate_cached(m, prompt, attention_mask=attn, **kwargs)
    assert stats.committed / stats.row_steps > 2  # several tokens per step: the parallel path is exercised
    for i, n in enumerate(lengths):
        alone, _ = generate_cached(m, prompt[i:i + 1, -n:], **kwargs)
        assert torch.equal(batch.tokens[i, -n - 16:], alone.tokens[0])
        assert torch.equal(batch.unmask_step[i], alone.unmask_step[0])


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_rows_that_finish_a_block_leave_the_batch_without_changing_the_others(cache):
    """On the trained tiny Sudoku start confidence differs per puzzle, so under a threshold rows
    finish a block at different steps and leave the batch (the cache drops their rows): each row
    must still decode exactly as it does alone."""
    model, tokenizer = load_model("builtin:tiny-sudoku")
    model.eval()
    task, ids = get_task("sudoku"), special_ids(model, tokenizer)
    prompts = [encode_prompt(tokenizer, task, ex, "compact") for ex in task.examples("test", 6, 1234)]
    prompts = [p[i % 3:] for i, p in enumerate(prompts)]  # ragged: drop 0-2 leading tokens
    prompt, attn = left_pad(prompts, ids.pad_id)
    kwargs = dict(steps=20, gen_length=20, block_length=10, mask_id=ids.mask_id, eos_ids=ids.eos_ids,
                  cache=cache, threshold=0.9)
    batch, stats = generate_cached(model, prompt, attention_mask=attn, **kwargs)
    assert stats.row_steps < stats.forwards * len(prompts)  # some rows sat out some steps
    for i, p in enumerate(prompts):
        alone, _ = generate_cached(model, torch.tensor([p]), **kwargs)
        assert torch.equal(batch.tokens[i, -len(p) - 20:], alone.tokens[0])


def test_sampling_is_seeded_and_only_masked_positions_are_drawn():
    m = model_with(2)
    prompt, attn = ragged([5, 8])
    kwargs = dict(steps=8, gen_length=16, block_length=4, mask_id=MASK_ID, eos_ids=(EOS_ID,),
                  attention_mask=attn, temperature=1.0, remasking="random", threshold=0.5)
    a, _ = generate_cached(m, prompt, generator=torch.Generator().manual_seed(5), **kwargs)
    b, _ = generate_cached(m, prompt, generator=torch.Generator().manual_seed(5), **kwargs)
    c, _ = generate_cached(m, prompt, generator=torch.Generator().manual_seed(6), **kwargs)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    assert not (a.tokens == MASK_ID).any() and (a.unmask_step >= 0).all()


def test_evaluate_on_the_tiny_sudoku_start_reports_sampler_stats():
    model, tokenizer = load_model("builtin:tiny-sudoku")
    model.eval()
    task, ids = get_task("sudoku"), special_ids(model, tokenizer)
    examples = task.examples("test", 16, 1234)
    reference = Decoding(gen_length=20, block_length=20, steps=20)
    cached = reference.decoding(engine="cached", threshold=0.9)
    ref = evaluate(make_engine(reference, model, ids), tokenizer, task, examples, reference, 16, "compact")
    fast = evaluate(make_engine(cached, model, ids), tokenizer, task, examples, cached, 16, "compact")
    assert ref["eval_tokens_per_step"] == 1.0 and "eval_mean_confidence" not in ref
    assert fast["eval_tokens_per_step"] > 1.5 and fast["eval_mean_confidence"] > 0.9
    assert fast["eval_forwards"] < ref["eval_forwards"]
    assert abs(fast["eval_reward"] - ref["eval_reward"]) < 0.15  # a trained model barely notices


def test_worker_rolls_out_with_the_engine_its_spec_names():
    spec = JobSpec.model_validate({
        "model": {"path": "builtin:tiny-sudoku"}, "task": {"name": "sudoku", "train_size": 10},
        "rollout": {"prompts_per_step": 2, "group_size": 4, "gen_length": 20, "block_length": 20, "steps": 10,
                    "temperature": 1.0, "remasking": "random", "engine": "cached", "threshold": 0.9},
        "runtime": {"device": "cpu", "threads": 1},
    })
    worker = RolloutWorker(spec)
    groups = worker.rollout(2, batch=0)
    assert all(g.completion_ids.shape == (4, 20) and (g.unmask_steps >= 0).all() for g in groups)
    metrics = worker.sampler_stats.metrics()
    assert metrics["rollout_tokens_per_step"] > 2.0  # the job's schedule is 2 per step: parallel commits more
    assert 0.0 < metrics["rollout_mean_confidence"] <= 1.0 and 0 <= metrics["rollout_eos_position"] <= 20


def native_one_layer(family: str) -> torch.nn.Module:
    """A one-layer random native LLaDA / Dream (the real-checkpoint code path) that never
    predicts the mask token."""
    from dlrl.models.dream import DreamConfig, DreamModel
    from dlrl.models.llada import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(0)
    if family == "llada":
        m = LLaDAModelLM(LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=4, n_layers=1, mlp_hidden_size=48,
                                     vocab_size=128, embedding_size=128, mask_token_id=MASK_ID,
                                     pad_token_id=PAD_ID, eos_token_id=EOS_ID))
    else:
        m = DreamModel(DreamConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=1, intermediate_size=48, vocab_size=128,
                                   mask_token_id=MASK_ID, pad_token_id=PAD_ID, bos_token_id=PAD_ID,
                                   eos_token_id=EOS_ID))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
        m.get_output_embeddings().weight[MASK_ID] = 0.0
    return m.eval()


@pytest.mark.parametrize("family", ["llada", "Dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_native_families_cached_equals_reference_with_one_layer(family, cache):
    """The cached engine drives the native LLaDA / Dream code (KV cache, logits_to_keep, Dream's
    shift) as it does the built-in model: exact at one layer, so token for token the reference."""
    m = native_one_layer(family)
    prompt, attn = ragged([5, 8, 3])
    want = generate_with_steps(m, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                               attention_mask=attn)
    got, _ = generate_cached(m, prompt, steps=8, gen_length=16, block_length=4, mask_id=MASK_ID,
                             eos_ids=(EOS_ID,), attention_mask=attn, cache=cache)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.unmask_step, want.unmask_step)


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_masked_positions_predicted_in_chunks_equal_all_at_once(remasking):
    """Chunking bounds the (chunk, V) temporaries and changes nothing else (greedy: exactly)."""
    from rollout.engines.cached import predict_masked

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 50, generator=g)
    mask_index = torch.rand(3, 8, generator=g) < 0.6
    kw = dict(mask_id=MASK_ID, temperature=0.0, remasking=remasking)
    whole = predict_masked(logits, mask_index, generator=torch.Generator().manual_seed(1), chunk=1000, **kw)
    parts = predict_masked(logits, mask_index, generator=torch.Generator().manual_seed(1), chunk=3, **kw)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[2], parts[2])
    if remasking == "low_confidence":
        assert torch.equal(whole[1], parts[1])
    assert (whole[0][~mask_index] == MASK_ID).all() and (whole[0][mask_index] != MASK_ID).any()
