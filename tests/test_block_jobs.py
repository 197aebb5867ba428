"""The shipped block-diffusion jobs and eval protocols (SDAR / TraDo, LLaDA2.x): they validate, their
engine accepts their decoding, their runtime layout is what `dlrl plan` picks on 8 x 80 GB (so the
plan in their comments cannot rot), and the block engine's rollout memory model counts what the
engine really keeps (its KV cache), measured on a tiny SDAR model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dlrl import footprint as fp
from dlrl.config import JobSpec
from dlrl.eval_protocol import EvalProtocol
from dlrl.models import build_tiny_sdar, special_ids
from dlrl.models.kv_cache import KVCache
from learner.objectives import OBJECTIVES
from rollout.engines import check_decoding

ROOT = Path(__file__).resolve().parents[1]
JOBS = {"sdar-8b-math": "JetLM/SDAR-8B-Chat", "sdar-1.7b-math": "JetLM/SDAR-1.7B-Chat",
        "llada2-mini-math": "inclusionAI/LLaDA2.0-mini"}


@pytest.mark.parametrize("name", sorted(JOBS))
def test_block_job_layout_is_its_plan_on_8_x_80(name):
    spec = JobSpec.from_toml(ROOT / f"deploy/jobs/{name}.toml")
    assert spec.model.path == JOBS[name] and spec.rollout.engine == "block"
    check_decoding(spec.rollout)
    shape = fp.job_shape(spec)
    assert shape.bd3  # scored on the BD3-LM layout in the learner
    plan = fp.plan(spec, 8, 80, graph_copies=OBJECTIVES[spec.train.algorithm].graph_copies)
    assert plan.fits
    assert plan.rollout_batch == spec.rollout.batch_size
    assert plan.learner_gpus == spec.runtime.learner_ranks and plan.rollout_gpus == spec.rollout.num_workers
    text = (ROOT / f"deploy/jobs/{name}.toml").read_text()
    assert f"{plan.learner.total / 1e9:.1f} GB per GPU" in text  # the comment quotes this plan
    assert re.search(rf"{plan.rollout_gpus} rollout workers at batch {plan.rollout_batch}", text)


def test_moe_plan_counts_total_and_active():
    spec = JobSpec.from_toml(ROOT / "deploy/jobs/llada2-mini-math.toml")
    shape = fp.job_shape(spec)
    assert 15.5e9 < shape.params() < 17e9 and 1.2e9 < shape.active_params() < 1.6e9  # "16B-A1.4B"


@pytest.mark.parametrize("name", ["sdar-math500", "llada2-math500"])
def test_block_eval_protocols_decode_with_the_block_engine(name):
    protocol = EvalProtocol.from_toml(ROOT / f"deploy/eval/{name}.toml")
    assert protocol.decoding.engine == "block" and protocol.decoding.temperature == 0.0
    check_decoding(protocol.decoding)


def test_block_sampling_bytes_count_the_engines_kv_cache():
    """The block term of dlrl.footprint.sampling_bytes is the engine's cache plus one block's
    scores: the cache after a real decode of a tiny SDAR model holds exactly the counted bytes."""
    from rollout.engines.block import BlockEngine

    model, tokenizer = build_tiny_sdar()
    model.eval()
    ids = special_ids(model, tokenizer)
    shape = fp.shape_from_config(model.config.to_dict())
    prompt, gen = 7, 12
    caches: list[KVCache] = []
    original = KVCache.__init__

    def record(self):
        original(self)
        caches.append(self)

    KVCache.__init__ = record
    try:
        from dlrl.decoding import Decoding
        d = Decoding(engine="block", gen_length=gen, block_length=4, steps=4,
                     block_remasking="low_confidence_static")
        with torch.no_grad():
            BlockEngine(model, ids).generate(torch.randint(3, 60, (1, prompt)), None, d)
    finally:
        KVCache.__init__ = original
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()  # windows are views of one cache
                for c in caches for t in c.keys + c.values if t is not None}
    kv_bytes = sum(storages.values())
    counted = fp.block_sampling_bytes(shape, prompt + gen, 4, block=4, per_logit=0)
    # the engine may round the sequence up to whole blocks of the global grid
    assert counted <= kv_bytes <= fp.block_sampling_bytes(shape, prompt + gen + 4, 4, block=4, per_logit=0)
