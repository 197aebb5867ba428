"""The rollout worker: samples and scores groups of completions with the current policy weights.

A plain class; the job driver runs it as a Ray actor. Each worker owns a shard of the training
prompts and a cursor over it; it swaps weights only between generation calls (`set_weights`),
never inside one, and stamps every group with the policy version that produced it.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch

from dlrl.config import JobSpec
from dlrl.diffusion import mix_seed
from dlrl.models import load_model, special_ids
from dlrl.runtime import pick_device, set_threads
from dlrl.tasks import Example, get_task
from dlrl.trajectory import TrajectoryGroup
from rollout.completion import (
    SamplingParams, decode_completion, encode_prompt, evaluate, sample_completions, score,
)


EVAL_SEED = 1234
"""Seed of the held-out evaluation set; the tiny checkpoint's SFT curve uses the same set."""


class RolloutWorker:
    def __init__(self, spec: JobSpec, index: int = 0, num_workers: int = 1) -> None:
        set_threads(spec.runtime.threads)
        self.spec, self.index = spec, index
        self.device = pick_device(spec.runtime.device)
        self.model, self.tokenizer = load_model(
            spec.model.path, dtype=spec.model.dtype, device=self.device,
            trust_remote_code=spec.model.trust_remote_code, lora=spec.model.lora,
        )
        self.model.requires_grad_(False)
        self.ids = special_ids(self.model, self.tokenizer)
        self.task = get_task(spec.task.name, **spec.task.options)
        train = self.task.examples("train", spec.task.train_size, spec.train.seed)
        self.shard: list[Example] = train[index::num_workers]
        if not self.shard:
            raise ValueError(f"worker {index} of {num_workers} has no training prompts")
        self.cursor = 0  # position in the shard's current epoch order
        self.epoch = 0
        self.order = self._epoch_order()
        self.version = 0
        r = spec.rollout
        self.params = SamplingParams(r.gen_length, r.block_length, r.steps, r.temperature,
                                     r.remasking, r.cfg_scale, r.batch_size)
        self.generator = torch.Generator(device=self.device).manual_seed(mix_seed(spec.train.seed, index, 0x5A))

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.shard)))
        random.Random(mix_seed(self.spec.train.seed, self.index, self.epoch)).shuffle(order)
        return order

    def _next_examples(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.cursor == len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self.order = self._epoch_order()
            out.append(self.shard[self.order[self.cursor]])
            self.cursor += 1
        return out

    def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Load a published weights version (full state or LoRA adapter tensors)."""
        self.model.load_state_dict(state, strict=False)
        self.version = version
        return version

    def rollout(self, n_groups: int, step: int) -> list[TrajectoryGroup]:
        """Sample G completions for each of the next n_groups prompts, score them."""
        examples = self._next_examples(n_groups)
        g = self.spec.rollout.group_size
        prompts = [encode_prompt(self.tokenizer, self.task, ex, self.spec.task.style) for ex in examples]
        t0 = time.perf_counter()
        completions, steps = sample_completions(
            self.model, [p for p in prompts for _ in range(g)], self.ids, self.params, self.generator
        )
        t_gen = time.perf_counter() - t0
        groups = []
        for k, (ex, prompt) in enumerate(zip(examples, prompts)):
            rows = slice(k * g, (k + 1) * g)
            texts = [decode_completion(self.tokenizer, c, self.ids) for c in completions[rows]]
            t1 = time.perf_counter()
            rewards = [score(self.task, text, ex) for text in texts]
            groups.append(TrajectoryGroup(
                group_id=f"s{step}-w{self.index}-{k}",
                task=self.task.name,
                prompt_id=ex.id,
                prompt_ids=np.asarray(prompt),
                completion_ids=completions[rows],
                rewards=np.asarray(rewards),
                policy_version=self.version,
                mask_seed=mix_seed(self.spec.train.seed, step, self.index, k),
                unmask_steps=steps[rows],
                timings={"generate": t_gen / len(examples), "reward": time.perf_counter() - t1},
            ))
        return groups

    def rollout_to_queue(self, queue, n_groups: int, step: int) -> dict[str, float]:
        """`rollout`, then put each group on the trajectory queue; returns rollout metrics."""
        t0 = time.perf_counter()
        groups = self.rollout(n_groups, step)
        seconds = time.perf_counter() - t0
        for group in groups:
            queue.put(group)
        tokens = sum(gr.completion_ids.size for gr in groups)
        return {"rollout_seconds": seconds, "rollout_tokens": tokens}

    def evaluate(self, n: int, steps: int | None = None, seed: int = EVAL_SEED) -> dict[str, float]:
        """Greedy mean reward on n held-out test examples (the same set every call)."""
        examples = self.task.examples("test", n, seed)
        params = SamplingParams(**{**self.params.__dict__, "steps": steps or self.params.steps,
                                   "remasking": self.spec.eval.remasking})
        return evaluate(self.model, self.tokenizer, self.task, examples, self.ids, params,
                        self.spec.task.style)
