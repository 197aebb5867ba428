"""The engine seam (rollout/engines/): one registry, one decoding type with one set of bounds, each
engine's options checked by the engine, and the contract every engine keeps (weights, seeds).

Run: pytest tests/test_engines.py -q
"""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from dlrl.config import JobSpec, RolloutSpec
from dlrl.decoding import MAX_TOKENS, Decoding
from dlrl.eval_protocol import EvalProtocol
from dlrl.models import SpecialIds
from dlrl.models.bidirectional import BidirectionalConfig, BidirectionalModel
from rollout.completion import left_pad, sample_completions
from rollout.engines import ENGINES, check_decoding, make_engine
from rollout.engines.block import BlockEngine
from rollout.engines.cached import CachedEngine
from rollout.engines.reference import ReferenceEngine
from rollout.worker import RolloutWorker

MASK_ID, EOS_ID, PAD_ID = 2, 1, 0
IDS = SpecialIds(mask_id=MASK_ID, pad_id=PAD_ID, eos_ids=(EOS_ID,))
BASE = {"gen_length": 8, "block_length": 4, "steps": 4}
OWN = {"block": {"block_remasking": "sequential"}}
"""Options an engine needs before it takes BASE (the block engine: its commit rule)."""
LLADA_ENGINES = ["reference", "cached"]
"""The engines of full-attention models, which the contract tests below drive with the built-in
model; the block engine's (block-causal models only) are in tests/test_block_engine.py."""


def model(seed: int = 0) -> BidirectionalModel:
    torch.manual_seed(seed)
    m = BidirectionalModel(BidirectionalConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        mask_token_id=MASK_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)).eval()
    with torch.no_grad():
        m.lm_head.weight[MASK_ID] = 0.0
    return m


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    return left_pad([[5, 6, 7], [8, 9], [10, 11, 12, 13]], PAD_ID)


def protocol_with(**decoding) -> EvalProtocol:
    return EvalProtocol.model_validate({
        "name": "p", "metric": "mean_reward", "task": {"name": "sudoku"}, "prompt": {"style": "compact"},
        "decoding": decoding,
    })


# --------------------------------------------------------------------------- registry

def test_one_registry_of_engines_each_with_the_protocol():
    assert ENGINES == {"reference": ReferenceEngine, "cached": CachedEngine, "block": BlockEngine}
    m = model()
    for name, cls in ENGINES.items():
        decoding = Decoding(engine=name, **BASE, **OWN.get(name, {}))
        engine = make_engine(decoding, m, IDS)
        assert isinstance(engine, cls) and engine.model is m and engine.ids == IDS
        for method in ("check", "generate", "load_weights"):
            assert callable(getattr(engine, method))


def test_an_unknown_engine_is_refused_with_the_registered_names():
    with pytest.raises(ValueError, match="engine 'fast' is not a rollout engine: one of reference, cached, block"):
        check_decoding(Decoding(engine="fast", **BASE))
    with pytest.raises(ValidationError, match="engine"):
        Decoding(engine="Fast engine!", **BASE)


# --------------------------------------------------------------------------- one decoding type

def test_the_job_spec_the_eval_protocol_and_the_engines_share_one_decoding_type():
    assert issubclass(RolloutSpec, Decoding)
    assert EvalProtocol.model_fields["decoding"].annotation is Decoding
    spec = JobSpec.from_toml("deploy/jobs/tiny-sudoku.toml")
    assert isinstance(make_engine(spec.rollout, model(), IDS), ReferenceEngine)  # the spec is the decoding
    assert spec.rollout.decoding(steps=20).model_dump() == {
        **spec.rollout.model_dump(include=set(Decoding.model_fields)), "steps": 20}


@pytest.mark.parametrize("field, bad, good", [
    ("temperature", 10.5, 10.0),
    ("temperature", -0.1, 0.0),
    ("gen_length", MAX_TOKENS + 1, MAX_TOKENS),
    ("threshold", 1.0, 0.99),
    ("threshold", 0.0, 0.01),
    ("factor", 0.0, 1e6),
    ("cfg_scale", 100.5, 100.0),
    ("cache", "suffix", "prefix"),
    ("remasking", "best", "random"),
])
def test_one_set_of_bounds_for_the_spec_the_protocol_and_the_engines(field, bad, good):
    """The same value is refused (and its neighbour accepted) by the job spec, the eval protocol
    and the engines' type alike: there is one definition."""
    base = dict(engine="cached" if field in ("threshold", "factor") else "reference", **BASE)
    if field == "gen_length":
        base.update(block_length=MAX_TOKENS, steps=1)
    for build in (lambda **f: RolloutSpec(**f), lambda **f: Decoding(**f), lambda **f: protocol_with(**f)):
        with pytest.raises(ValidationError, match=field):
            build(**{**base, field: bad})
        build(**{**base, field: good})


def test_block_arithmetic_is_checked_once_by_the_type():
    for build in (lambda **f: RolloutSpec(**f), lambda **f: Decoding(**f), lambda **f: protocol_with(**f)):
        with pytest.raises(ValidationError, match="gen_length 10 is not a multiple of block_length 4"):
            build(gen_length=10, block_length=4, steps=4)
        with pytest.raises(ValidationError, match="steps 3 is not a multiple of the number of blocks 2"):
            build(gen_length=8, block_length=4, steps=3)


# --------------------------------------------------------------------------- engine options

@pytest.mark.parametrize("fields, message", [
    ({"threshold": 0.9}, "threshold / factor \\(parallel decoding\\) need engine = 'cached', not 'reference'"),
    ({"factor": 1.0}, "need engine = 'cached'"),
    ({"engine": "cached", "threshold": 0.9, "factor": 1.0}, "takes at most one of threshold and factor"),
    ({"engine": "cached", "cfg_scale": 1.0}, "does not do classifier-free guidance"),
])
def test_each_engine_refuses_the_options_it_cannot_honour(fields, message):
    decoding = Decoding(**BASE, **fields)  # the type accepts them: which engine takes what is the engine's
    with pytest.raises(ValueError, match=message):
        check_decoding(decoding)
    with pytest.raises(ValueError, match=message):
        make_engine(decoding, model(), IDS)
    engine = ENGINES[decoding.engine](model(), IDS)
    with pytest.raises(ValueError, match=message):  # and generate checks what it is handed
        engine.generate(*prompts(), decoding)


def test_accepted_options():
    for fields in ({}, {"cfg_scale": 1.0}, {"engine": "cached", "cache": "prefix", "factor": 2.0},
                   {"engine": "cached", "threshold": 0.9}):
        check_decoding(Decoding(**BASE, **fields))


def test_a_worker_with_options_its_engine_refuses_fails_at_start():
    spec = JobSpec.model_validate({
        "task": {"name": "sudoku", "train_size": 4},
        "rollout": {"gen_length": 20, "block_length": 20, "steps": 10, "threshold": 0.9},
        "runtime": {"device": "cpu", "threads": 1},
    })
    with pytest.raises(ValueError, match="need engine = 'cached'"):
        RolloutWorker(spec)


def test_sample_completions_refuses_a_decoding_for_another_engine():
    engine = make_engine(Decoding(**BASE), model(), IDS)
    with pytest.raises(TypeError, match="decoding names engine 'cached', given ReferenceEngine"):
        sample_completions(engine, [[5, 6]], Decoding(engine="cached", **BASE), batch_size=4)


# --------------------------------------------------------------------------- the contract

@pytest.mark.parametrize("name", LLADA_ENGINES)
def test_weights_taken_reach_the_next_generate(name):
    """load_weights, and the weight receiver's in-place writes into engine.model, are what the next
    call decodes with."""
    decoding = Decoding(engine=name, temperature=1.0, **BASE)
    prompt, attn = prompts()
    old, new = model(0), model(1)
    engine = make_engine(decoding, old, IDS)
    want, _ = make_engine(decoding, new, IDS).generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    before, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    engine.load_weights(new.state_dict())
    after, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(0))
    assert not torch.equal(before.tokens, want.tokens) and torch.equal(after.tokens, want.tokens)


@pytest.mark.parametrize("name", LLADA_ENGINES)
def test_every_draw_comes_from_the_generator(name):
    """Same seed, same tokens, whatever the global RNG did in between; another seed, other tokens."""
    decoding = Decoding(engine=name, temperature=1.0, remasking="random", **BASE)
    engine = make_engine(decoding, model(), IDS)
    prompt, attn = prompts()
    torch.manual_seed(1)
    a, stats = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(7))
    torch.manual_seed(2)
    b, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(7))
    c, _ = engine.generate(prompt, attn, decoding, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.unmask_step, b.unmask_step)
    assert not torch.equal(a.tokens, c.tokens)
    assert a.tokens.shape == (3, 4 + 8) and stats.rows == 3 and stats.committed > 0
    assert set(stats.metrics()) >= {"rollout_tokens_per_step", "rollout_eos_position", "rollout_forwards"}
