"""Off-policy BGPO: a stale group's d is measured against the weights that generated it.

The rollout worker ships l_old (rollout/behaviour.py) in asynchronous runs, with the ELBO pass the
job driver hands it (learner.objectives.behaviour_pass); the learner trains against it. Real tiny
models and the real worker and learner classes (no Ray, no queue).
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest
import torch

from dlrl.batch import collate, collate_for, time_form_for
from dlrl.config import JobSpec, TrainSpec
from dlrl.elbo_terms import ElboPass
from dlrl.models import build_tiny, special_ids
from dlrl.models.families import model_family
from dlrl.trajectory import MAX_MC, TrajectoryGroup, WireError
from learner.objectives import behaviour_pass
from learner.step import old_policy_terms, train_step
from learner.train import Learner
from rollout.behaviour import behaviour_terms
from rollout.worker import RolloutWorker
from tests.test_wire import frame, parts, sample


def job(max_staleness: int, **train) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"path": "builtin:tiny-sudoku"},
        "task": {"name": "sudoku", "train_size": 10},
        "rollout": {"prompts_per_step": 3, "group_size": 4, "gen_length": 20, "block_length": 20,
                    "steps": 10, "temperature": 1.0},
        "train": {"n_mc": 4, "mc_chunk": 2, "micro_batch": 5, "lr": 1e-3, **train},
        "runtime": {"device": "cpu", "threads": 1, "max_staleness": max_staleness},
    })


def worker(spec: JobSpec) -> RolloutWorker:
    """A rollout worker as the job driver makes it: told the behaviour pass of the job."""
    return RolloutWorker(spec, behaviour=behaviour_pass(spec))


def without_behaviour(groups: list[TrajectoryGroup]) -> list[TrajectoryGroup]:
    return [dataclasses.replace(g, behaviour_elbo=None) for g in groups]


# -- (a) a stale group's first update --------------------------------------------------------------


def test_a_stale_groups_first_update_sees_and_clips_its_staleness():
    spec = job(1, clip_eps=1e-4)
    w = worker(spec)
    on_policy, stale = w.rollout(3, batch=0), w.rollout(3, batch=1)  # both by version 0
    assert all(g.behaviour_elbo is not None and g.behaviour_elbo.shape == (4, 4) for g in on_policy + stale)

    shipped, own = Learner(spec), Learner(spec)  # same seed, same weights
    first = shipped.step(on_policy)
    assert first["behaviour_elbo_missing"] == 0
    assert first["d_abs_first"] < 1e-6  # on-policy: the worker's l_old is the learner's own
    own.step(on_policy)

    # What d must be at the first update on the stale batch: version 1's terms minus version 0's.
    batch = collate_for(stale, spec.train, shipped.ids, model_family(shipped.model))
    l_new = old_policy_terms(shipped.model, batch, spec.train, shipped.ids.mask_id)
    l_old = torch.from_numpy(np.concatenate([g.behaviour_elbo for g in stale])).float()
    expected = float((l_new - l_old).abs().mean())
    assert expected > 1e-3

    m = shipped.step(stale)
    assert m["max_staleness"] == 1 and m["behaviour_elbo_missing"] == 0
    assert m["d_abs_first"] == pytest.approx(expected, rel=1e-5)
    assert m["clip_frac_first"] > 0.5  # eps 1e-4: one step of lr 1e-3 moves most ratios past it

    # The learner's own terms (a group without behaviour_elbo, as before the correction): d starts
    # at exactly 0 and the clip never engages on the first update, however stale the batch.
    m_own = own.step(without_behaviour(stale))
    assert m_own["behaviour_elbo_missing"] == 3
    assert m_own["d_abs_first"] == 0.0 and m_own["clip_frac_first"] == 0.0
    assert m_own["max_staleness"] == 1


def test_one_group_without_behaviour_terms_falls_back_for_the_batch():
    spec = job(1)
    groups = worker(spec).rollout(3, batch=0)
    mixed = groups[:2] + without_behaviour(groups[2:])
    m = Learner(spec).step(mixed)
    assert m["behaviour_elbo_missing"] == 1 and m["d_abs_first"] == 0.0


# -- (b) on-policy: the worker's terms are the learner's ----------------------------------------------


def _groups(vocab: int, prompt_lengths: list[int]) -> list[TrajectoryGroup]:
    rng = np.random.default_rng(3)
    return [
        TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k), prompt_ids=rng.integers(4, vocab, size=p),
                        completion_ids=rng.integers(4, vocab, size=(3, 8)),
                        rewards=rng.random(3), policy_version=0, mask_seed=100 + k)
        for k, p in enumerate(prompt_lengths)
    ]


@pytest.mark.parametrize("coupling", ["group", "completion"])
def test_b_on_policy_worker_terms_equal_the_learners_across_prompt_lengths(coupling):
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    ids = special_ids(model, tok)
    spec = TrainSpec(n_mc=6, mc_chunk=4, micro_batch=5, mask_coupling=coupling)
    groups = _groups(len(tok), [7, 5, 7, 11])  # the worker batches by length: order must come back
    shipped = behaviour_terms(model, groups, spec, ElboPass.of(spec), ids, "cpu")
    assert [s.shape for s in shipped] == [(3, 6)] * 4 and all(s.dtype == np.float64 for s in shipped)
    batch = collate_for(groups, spec, ids, model_family(model))  # padded to 11: rows of shorter prompts are left-padded
    learner = old_policy_terms(model, batch, spec, ids.mask_id)
    stacked = torch.from_numpy(np.concatenate(shipped)).to(learner.dtype)
    torch.testing.assert_close(stacked, learner, rtol=0, atol=1e-5)
    # ... and distinct enough that a row or group mix-up could not pass the tolerance above.
    assert (learner[:, None] - learner[None]).abs().sum(-1).add(torch.eye(12) * 1e9).min() > 1e-3


# -- (c) synchronous runs ship nothing and train as before -------------------------------------------


@pytest.mark.parametrize("staleness, algorithm", [(0, "bgpo"), (0, "naive_elbo"), (1, "diffu_grpo")])
def test_c_sync_and_diffu_grpo_ship_nothing_and_step_as_before(staleness, algorithm):
    spec = job(staleness, algorithm=algorithm)
    assert behaviour_pass(spec) is None
    groups = worker(spec).rollout(3, batch=0)
    assert all(g.behaviour_elbo is None and "behaviour_elbo" not in g.timings for g in groups)
    assert all("behaviour_elbo" not in parts(g)[0]["arrays"] for g in groups)

    learner, before = Learner(spec), Learner(spec)
    m = learner.step(groups)
    assert "behaviour_elbo_missing" not in m
    # Learner.step before the correction: collate with the job's settings, train_step without `old`.
    t = spec.train
    batch = collate(groups, pad_id=before.ids.pad_id, eos_ids=before.ids.eos_ids, n_mc=t.n_mc,
                    mask_scheme=t.mask_scheme, time_form=time_form_for(t, model_family(before.model)), mask_coupling=t.mask_coupling)
    ref = train_step(before.model, before.optimizer, batch, t, before.ids.mask_id)
    assert (m["loss"], m["d_abs"], m["grad_norm"]) == (ref["loss"], ref["d_abs"], ref["grad_norm"])
    for (name, p), q in zip(learner.model.named_parameters(), before.model.parameters()):
        assert torch.equal(p, q), name


def test_auto_chunk_with_staleness_ships_terms_measured_with_a_number():
    """Regression: train.mc_chunk = "auto" with max_staleness >= 1 crashed the worker on rollout
    batch 0 (TypeError: 'str' object cannot be interpreted as an integer): the worker handed its
    unresolved "auto" to the ELBO pass's chunking. The driver now resolves it for the worker."""
    spec = job(1, mc_chunk="auto")
    p = behaviour_pass(spec)
    assert isinstance(p.mc_chunk, int) and 1 <= p.mc_chunk <= spec.train.n_mc
    w = worker(spec)
    groups = w.rollout(3, batch=0)
    assert all(g.behaviour_elbo.shape == (4, 4) for g in groups)
    # the chunk is memory, not arithmetic: the terms are those of a pass of any chunk
    for chunk in (1, 4):
        again = behaviour_terms(w.model, groups, spec.train, ElboPass.of(spec.train, chunk), w.ids, "cpu")
        for g, terms in zip(groups, again):
            np.testing.assert_allclose(g.behaviour_elbo, terms, rtol=0, atol=1e-5)
    m = Learner(spec).step(groups)  # the learner resolves its own "auto" and trains against them
    assert m["behaviour_elbo_missing"] == 0 and m["d_abs_first"] < 1e-5


def test_c_passing_the_learners_own_terms_is_bit_identical():
    model, tok = build_tiny(hidden=32, layers=2, heads=2)
    ids = special_ids(model, tok)
    spec = TrainSpec(n_mc=4, mc_chunk=2, micro_batch=5, lr=1e-3, updates_per_batch=2)
    batch = collate_for(_groups(len(tok), [5, 6]), spec, ids, model_family(model))
    twin, _ = build_tiny(hidden=32, layers=2, heads=2)
    a = train_step(model, torch.optim.AdamW(model.parameters(), lr=spec.lr), batch, spec, ids.mask_id)
    old = old_policy_terms(twin, batch, spec, ids.mask_id)
    b = train_step(twin, torch.optim.AdamW(twin.parameters(), lr=spec.lr), batch, spec, ids.mask_id, old=old)
    assert {k: v for k, v in a.items() if "seconds" not in k and "per_s" not in k} == \
           {k: v for k, v in b.items() if "seconds" not in k and "per_s" not in k}
    assert a["d_abs_first"] == 0.0 and a["d_abs"] > 0  # the second update has moved off-policy
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    with pytest.raises(ValueError, match="expected ELBO terms"):
        train_step(twin, torch.optim.SGD(twin.parameters(), lr=0.0), batch, spec, ids.mask_id, old=old[:, :2])


# -- (d) the wire ----------------------------------------------------------------------------------


def with_terms(terms) -> TrajectoryGroup:
    return dataclasses.replace(sample(), behaviour_elbo=terms)


def test_d_behaviour_elbo_round_trips_bitwise_and_old_entries_still_decode():
    terms = np.array([[-0.25, -1e-300, 3.0], [-0.0, -7.5, 1e300]])
    g = with_terms(terms)
    back = TrajectoryGroup.from_bytes(g.to_bytes())
    assert back.behaviour_elbo.dtype == np.float64 and back.behaviour_elbo.tobytes() == terms.tobytes()
    assert back.to_bytes() == g.to_bytes()
    header, payload = parts(g)  # last in the payload, after unmask_steps (the module docstring)
    assert header["arrays"]["behaviour_elbo"] == {"dtype": "<f8", "shape": [2, 3], "offset": 44}
    assert payload[44:] == struct.pack("<6d", *terms.ravel())
    old = TrajectoryGroup.from_bytes(sample().to_bytes())  # an entry written before the field existed
    assert old.behaviour_elbo is None


def _edit_terms(shape: list[int], values: np.ndarray, dtype: str = "<f8") -> bytes:
    header, payload = parts(with_terms(np.zeros((2, 3))))
    header["arrays"]["behaviour_elbo"].update(dtype=dtype, shape=shape)
    return frame(header, payload[:44] + values.astype(dtype).tobytes())


@pytest.mark.parametrize("data, reason", [
    (_edit_terms([3, 2], np.zeros(6)), r"shape \(3, 2\) does not match 2 completions"),
    (_edit_terms([2, 0], np.zeros(0)), "0 MC terms per completion, expected 1 to 4096"),
    (_edit_terms([2, MAX_MC + 1], np.zeros(2 * (MAX_MC + 1))), "4097 MC terms per completion"),
    (_edit_terms([2, 3], np.array([0, 0, np.nan, 0, 0, 0])), "non-finite"),
    (_edit_terms([2, 3], np.array([0, 0, 0, 0, -np.inf, 0])), "non-finite"),
    (_edit_terms([2, 3], np.zeros(6), "<f4"), "has dtype '<f4', expected '<f8'"),
    (_edit_terms([6], np.zeros(6)), "shape of 2 dimension"),
    (_edit_terms([2, 3], np.zeros(5)), "truncated"),
])
def test_d_malformed_behaviour_elbo_is_a_wire_error(data, reason):
    with pytest.raises(WireError, match=reason):
        TrajectoryGroup.from_bytes(data)


def test_d_unencodable_behaviour_elbo_is_refused():
    with pytest.raises(ValueError, match="does not match 2 completions"):
        with_terms(np.zeros((3, 4)))
    g = with_terms(np.zeros((2, 4)))
    g.behaviour_elbo = np.zeros((2, 4), dtype=np.float32)  # reassigned past the dataclass's checks
    with pytest.raises(WireError, match="behaviour_elbo must be a 2-D <f8"):
        g.to_bytes()
    g.behaviour_elbo = np.full((2, 4), np.inf)
    with pytest.raises(WireError, match="non-finite"):
        g.to_bytes()

