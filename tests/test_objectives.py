"""learner/objectives: each objective is a unit the step runs without naming it, with its own
memory term, and the only place an algorithm name decides anything."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import numpy as np
import pytest
import torch

from dlrl.batch import collate
from dlrl.config import TrainSpec
from dlrl.elbo_terms import ElboPass
from dlrl.models import build_tiny
from dlrl.trajectory import TrajectoryGroup
from learner.objectives import OBJECTIVES, objective_for
from learner.step import train_step

ROOT = Path(__file__).resolve().parents[1]


def test_the_registry_is_the_specs_list_of_algorithms():
    names = typing.get_args(TrainSpec.model_fields["algorithm"].annotation)
    assert sorted(OBJECTIVES) == sorted(names)
    assert all(o.name == name for name, o in OBJECTIVES.items())


def test_memory_terms_and_facts():
    bgpo, naive, grpo = OBJECTIVES["bgpo"], OBJECTIVES["naive_elbo"], OBJECTIVES["diffu_grpo"]
    assert [bgpo.graph_copies(16, c) for c in (1, 4, 16)] == [1, 4, 16]  # one chunk's graphs
    assert [naive.graph_copies(16, c) for c in (1, 4, 16)] == [16, 16, 16]  # every MC graph
    assert [grpo.graph_copies(16, c) for c in (1, 4, 16)] == [1, 1, 1]  # one pass, no MC
    assert (bgpo.chunked, naive.chunked, grpo.chunked) == (True, False, False)
    assert (bgpo.elbo_old, naive.elbo_old, grpo.elbo_old) == (True, True, False)
    spec = TrainSpec(n_mc=8)
    assert (bgpo.passes(spec), naive.passes(spec), grpo.passes(spec)) == (8, 8, 1)


def test_no_algorithm_names_outside_the_objectives():
    """The step, the rollout worker and the core decide nothing by an objective's name."""
    names = re.compile(r"algorithm\s*(==|!=|in\s)")
    found = []
    for package in ("dlrl", "rollout", "learner", "services"):
        for file in (ROOT / package).rglob("*.py"):
            if "objectives" in file.relative_to(ROOT).parts:
                continue
            for n, line in enumerate(file.read_text().splitlines(), 1):
                if names.search(line):
                    found.append(f"{file.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []


def test_an_elbo_pass_takes_numbers_only():
    with pytest.raises(ValueError, match="resolve train.mc_chunk = 'auto'"):
        ElboPass.of(TrainSpec(n_mc=4, mc_chunk="auto"))
    assert ElboPass.of(TrainSpec(n_mc=5, mc_chunk=2)).chunks() == [slice(0, 2), slice(2, 4), slice(4, 5)]


def _batch(vocab: int, tok):
    rng = np.random.default_rng(1)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k), prompt_ids=rng.integers(4, vocab, size=5),
                              completion_ids=rng.integers(4, vocab, size=(4, 8)),
                              rewards=np.array([1.0, 0.0, 0.5, 0.0]), policy_version=0, mask_seed=k)
              for k in range(2)]
    return collate(groups, pad_id=tok.pad_token_id, eos_ids=(tok.eos_token_id,), n_mc=2)


@pytest.mark.parametrize("clip_eps", [None, 1e-6, 0.2])
def test_diffu_grpo_clip_eps_none_is_off(clip_eps):
    """The second update is off-policy: a tiny clip clips most tokens, None clips none and trains
    on the whole ratio; the default (0.2, d1's) is what the spec gives when it sets nothing."""
    assert TrainSpec().clip_eps == 0.2
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    spec = TrainSpec(algorithm="diffu_grpo", n_mc=2, micro_batch=8, lr=1e-2, updates_per_batch=2, clip_eps=clip_eps)
    m = train_step(model, torch.optim.AdamW(model.parameters(), lr=spec.lr), _batch(len(tok), tok), spec,
                   tok.mask_token_id)
    assert m["d_abs"] > 0 and objective_for(spec).name == "diffu_grpo"
    if clip_eps is None:
        assert m["clip_frac"] == 0.0
    elif clip_eps == 1e-6:
        assert m["clip_frac"] > 0.5
