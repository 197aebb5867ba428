"""The rollout worker on the shipped tiny checkpoint (real model, real task, no Ray)."""

from __future__ import annotations

import numpy as np
import torch

from dlrl.config import JobSpec
from rollout.worker import RolloutWorker


def spec(**rollout) -> JobSpec:
    return JobSpec.model_validate({
        "model": {"path": "builtin:tiny-sudoku"},
        "task": {"name": "sudoku", "train_size": 10},
        "rollout": {"prompts_per_step": 3, "group_size": 4, "gen_length": 20, "block_length": 20,
                    "steps": 10, "temperature": 1.0, **rollout},
        "runtime": {"device": "cpu", "threads": 1},
    })


def test_rollout_groups_are_scored_and_stamped():
    w = RolloutWorker(spec())
    w.version = 7
    groups = w.rollout(3, batch=5)
    assert len({g.group_id for g in groups}) == 3
    assert len({g.mask_seed for g in groups}) == 3
    for g in groups:
        assert g.completion_ids.shape == (4, 20) and g.policy_version == 7
        assert ((g.rewards >= 0) & (g.rewards <= 1)).all()
        assert g.unmask_steps.min() >= 0 and g.unmask_steps.max() < 10
        ex = next(e for e in w.shard if e.id == g.prompt_id)
        prompt = w.tokenizer(w.task.prompt(ex, "compact"), add_special_tokens=False)["input_ids"]
        assert g.prompt_ids.tolist() == prompt


def test_shards_are_disjoint_and_batches_walk_through_epochs():
    a, b = RolloutWorker(spec(), 0, 2), RolloutWorker(spec(), 1, 2)
    assert not {e.id for e in a.shard} & {e.id for e in b.shard}
    n = len(a.shard)
    epoch0 = [e.id for e in a.examples(0, n)]
    epoch1 = [e.id for e in a.examples(1, n)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(e.id for e in a.shard)
    assert epoch0 != epoch1  # each epoch reshuffles
    singles = [a.examples(b, 1)[0].id for b in range(n, 2 * n)]
    assert singles == epoch1  # batch b of size k is positions [b*k, (b+1)*k) of the epochs' orders


def test_a_batch_is_a_pure_function_of_its_index():
    """What a restarted actor redoes, and what a resumed run regenerates, is what was lost."""
    first = RolloutWorker(spec(), 1, 2).rollout(2, batch=4)
    again = RolloutWorker(spec(), 1, 2).rollout(2, batch=4)
    for g, h in zip(first, again):
        assert g.group_id == h.group_id and g.mask_seed == h.mask_seed
        assert np.array_equal(g.completion_ids, h.completion_ids) and np.array_equal(g.rewards, h.rewards)
    other = RolloutWorker(spec(), 1, 2).rollout(2, batch=5)
    assert [g.group_id for g in other] != [g.group_id for g in first]


def test_evaluation_is_greedy_low_confidence_whatever_the_rollout_uses():
    low = RolloutWorker(spec(remasking="low_confidence")).evaluate(8)
    rand = RolloutWorker(spec(remasking="random")).evaluate(8)
    assert low["eval_reward"] == rand["eval_reward"]
    assert 0.0 < low["eval_reward"] <= 1.0


def test_set_weights_swaps_the_policy():
    w = RolloutWorker(spec())
    before = w.evaluate(8)["eval_reward"]
    zeros = {k: np.zeros(v.shape, dtype=np.float32) for k, v in w.model.state_dict().items()}
    w.set_weights(1, {k: torch.from_numpy(v) for k, v in zeros.items()})
    assert w.version == 1
    assert w.evaluate(8)["eval_reward"] != before
