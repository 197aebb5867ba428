"""The rollout worker: samples and scores groups of completions with the current policy weights.

A plain class; the job driver runs it as a Ray actor (restarted by Ray when it crashes). Each
worker owns a shard of the training prompts. What it generates for rollout batch b is a pure
function of (seed, worker index, b, weights version): the prompts are positions
[b*k, (b+1)*k) of the shard's epoch-shuffled order and the sampler's generator is seeded from
(seed, index, b). So the batch index is the prompt cursor the driver checkpoints, a restarted
actor redoes an unfinished batch with the same group ids (the learner drops the duplicates), and
a resumed run regenerates exactly what the uninterrupted run generated.

Weights are swapped only between generation calls (`set_weights`), never inside one, and every
group is stamped with the policy version that produced it. The worker holds them in the rollout
dtype (dlrl.precision.rollout_dtype: bf16 on GPUs, the masters' dtype on the CPU unless
train.compute_dtype asks for bf16), and samples, evaluates (periodic evaluations, eval.protocol)
and measures behaviour terms with them.
"""

from __future__ import annotations

import random
import time
import warnings

import numpy as np
import ray
import torch

from dlrl.config import JobSpec
from dlrl.diffusion import mix_seed
from dlrl.elbo_terms import ElboPass
from dlrl.eval_protocol import EvalProtocol, load_examples
from dlrl.models import load_model, special_ids
from dlrl.precision import rollout_dtype
from dlrl.queue import open_queue
from dlrl.queue.group_ids import group_id
from dlrl.runtime import pick_device, set_threads
from dlrl.tasks import Example, get_task
from dlrl.trajectory import TrajectoryGroup
from dlrl.weights import GroupAddress, SyncStats, WeightHandle, WeightReceiver
from rollout.behaviour import with_behaviour_elbo
from rollout.completion import EVAL_SEED, decode_completion, encode_prompt, evaluate, sample_completions, score
from rollout.engines import check_decoding, make_engine
from rollout.evaluation import evaluate_model, read_samples, resolve_task, run_metrics
from rollout.rollout_stats import RolloutStats

PUT_TIMEOUT_S = 1800.0
"""Longest a worker waits for queue capacity for one group (then QueueFull fails the batch, and
the driver fails the run with it: back-pressure that long means the learner is not consuming)."""


class RolloutWorker:
    def __init__(self, spec: JobSpec, index: int = 0, num_workers: int = 1, run_id: str | None = None,
                 behaviour: ElboPass | None = None) -> None:
        """`behaviour`: the ELBO pass that measures each group's behaviour terms before it ships
        (rollout/behaviour.py), as the driver resolved it (learner.objectives.behaviour_pass);
        None ships none."""
        set_threads(spec.runtime.threads)
        self.spec, self.index, self.behaviour = spec, index, behaviour
        self.run_id = run_id or spec.name
        self.queue = None  # opened on first use: the queue client is per process, never shipped
        self.device = pick_device(spec.runtime.device)
        # Weights in the learner's compute dtype (bf16 on GPUs), not its float32 masters: a worker
        # updates no weight, and every version arrives cast to this dtype (dlrl.precision).
        self.dtype = rollout_dtype(spec.model.dtype, spec.train.compute_dtype, self.device.type)
        self.model, self.tokenizer = load_model(
            spec.model.path, dtype=self.dtype, device=self.device,
            trust_remote_code=spec.model.trust_remote_code, lora=spec.model.lora,
        )
        # peft keeps fresh adapters in float32 over a bf16 base (for training); here they are
        # only applied, and they arrive in the rollout dtype like every other weight.
        self.model.to(self.dtype).requires_grad_(False)
        self.ids = special_ids(self.model, self.tokenizer)
        self.task = get_task(spec.task.name, **spec.task.options)
        train = self.task.examples("train", spec.task.train_size, spec.train.seed)
        self.shard: list[Example] = train[index::num_workers]
        if not self.shard:
            raise ValueError(f"worker {index} of {num_workers} has no training prompts")
        # The engine decodes with self.model, which both weight transports update in place.
        self.engine = make_engine(spec.rollout, self.model, self.ids)
        self.receiver = WeightReceiver(self.engine.model, version=0)
        if spec.eval.protocol:  # its engine and options fail the worker's start, not the first evaluation
            check_decoding(EvalProtocol.from_toml(spec.eval.protocol).decoding)
        self.sampler_stats = RolloutStats()  # of the last rollout batch (tokens/step, confidence, EOS)
        self._orders: dict[int, list[int]] = {}
        self.reward_errors: list[str] = []
        self._restart_reported = False
        self._protocol = None  # (protocol, task, examples) of eval.protocol, read on first use

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.shard)))
            random.Random(mix_seed(self.spec.train.seed, self.index, epoch)).shuffle(order)
            self._orders = {epoch: order}  # batches move forward: one epoch's order is enough
        return self._orders[epoch]

    def examples(self, batch: int, n: int) -> list[Example]:
        """The n prompts of rollout batch `batch`: positions [batch*n, (batch+1)*n) of the epochs' orders."""
        out = []
        for pos in range(batch * n, (batch + 1) * n):
            epoch, i = divmod(pos, len(self.shard))
            out.append(self.shard[self._epoch_order(epoch)[i]])
        return out

    @property
    def version(self) -> int:
        """The weights version the model holds (the receiver tracks it, whichever way it came)."""
        return self.receiver.version

    @version.setter
    def version(self, value: int) -> None:
        self.receiver.version = value

    def set_weights(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Load a weights version given as tensors (full state or LoRA adapter tensors)."""
        self.engine.load_weights(state)
        self.version = version
        return version

    def rollout(self, n_groups: int, batch: int) -> list[TrajectoryGroup]:
        """Sample G completions for each of the n_groups prompts of rollout batch `batch`, score them.

        Given a behaviour pass (max_staleness >= 1 with BGPO or naive ELBO) each group also carries
        the ELBO terms l_old of the weights that generated it (rollout/behaviour.py), so the learner
        measures d against the behaviour policy however far its own weights have moved since."""
        examples = self.examples(batch, n_groups)
        generator = torch.Generator(device=self.device).manual_seed(
            mix_seed(self.spec.train.seed, self.index, batch, 0x5A))
        g = self.spec.rollout.group_size
        prompts = [encode_prompt(self.tokenizer, self.task, ex, self.spec.task.style) for ex in examples]
        t0 = time.perf_counter()
        completions, steps, self.sampler_stats = sample_completions(
            self.engine, [p for p in prompts for _ in range(g)], self.spec.rollout,
            self.spec.rollout.batch_size, generator,
        )
        t_gen = time.perf_counter() - t0
        groups = []
        for k, (ex, prompt) in enumerate(zip(examples, prompts)):
            rows = slice(k * g, (k + 1) * g)
            texts = [decode_completion(self.tokenizer, c, self.ids) for c in completions[rows]]
            t1 = time.perf_counter()
            rewards = [score(self.task, text, ex, self.reward_errors) for text in texts]
            groups.append(TrajectoryGroup(
                group_id=group_id(self.run_id, batch, self.index, k),
                task=self.task.name,
                prompt_id=ex.id,
                prompt_ids=np.asarray(prompt),
                completion_ids=completions[rows],
                rewards=np.asarray(rewards),
                policy_version=self.version,
                mask_seed=mix_seed(self.spec.train.seed, batch, self.index, k),
                unmask_steps=steps[rows],
                timings={"generate": t_gen / len(examples), "reward": time.perf_counter() - t1},
            ))
        if self.behaviour is not None:
            groups = with_behaviour_elbo(self.model, groups, self.spec.train, self.behaviour, self.ids, self.device)
        return groups

    def sync_weights(self, handle: WeightHandle | None) -> dict[str, float]:
        """Take the published version `handle` names from the object store, unless this worker holds
        it already (it came by broadcast, or this is a second call for the same batch) or a newer one.

        Newer: Ray may run a call it retries after a restart behind calls sent later (the worker
        died after its batch's puts landed, before the reply; the driver moved on). The redone
        batch is then made by the newer weights held, and stamped with them: it is only less
        stale, and its group ids make it a duplicate that the learner drops if the first try
        landed (dlrl.weights.update.check_version never moves a receiver back in policy time)."""
        if handle is None or (handle.generation, handle.version) < (self.receiver.generation, self.version):
            return {"weight_sync_seconds": 0.0, "weight_sync_bytes": 0.0}
        return self.receiver.receive(handle).metrics()

    def join_weight_group(self, address: GroupAddress, rank: int) -> bool:
        """Join the learner's broadcast group (called on all members at once by the driver)."""
        return self.receiver.join_group(address, rank)

    def recv_weights(self) -> SyncStats:
        """Take part in the learner's broadcast of its next version (between two batches)."""
        return self.receiver.recv()

    def rollout_to_queue(self, batch: int, n_groups: int, handle: WeightHandle | None = None) -> dict[str, float]:
        """Rollout batch `batch` with the weights `handle` names, onto the trajectory queue.

        Returns rollout metrics. A retried call (this actor was restarted by Ray) produces the
        same group ids, so the learner trains on each group once.
        """
        sync = self.sync_weights(handle)
        if self.queue is None:
            self.queue = open_queue(self.spec, self.run_id, consumer=f"worker-{self.index}")
        self.reward_errors = []
        t0 = time.perf_counter()
        groups = self.rollout(n_groups, batch)
        seconds = time.perf_counter() - t0
        for group in groups:
            self.queue.put(group, timeout=PUT_TIMEOUT_S)
        return {
            "rollout_seconds": seconds,
            "rollout_tokens": sum(gr.completion_ids.size for gr in groups),
            "reward_errors": len(self.reward_errors),
            "behaviour_elbo_seconds": sum(gr.timings.get("behaviour_elbo", 0.0) for gr in groups),
            "restarted": int(self._restarted()),
            **self.sampler_stats.metrics(),
            **sync,
        }

    def _restarted(self) -> bool:
        """True in the first rollout call after Ray restarted this actor after a crash, so the
        driver's per-step `worker_restarts` counts each restart once (a restarted actor is a fresh
        process: this flag starts False again)."""
        if self._restart_reported:
            return False
        self._restart_reported = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray warns on every call of this property
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)

    def evaluate(self, n: int, steps: int | None = None, seed: int = EVAL_SEED,
                 handle: WeightHandle | None = None) -> dict[str, float]:
        """Greedy mean reward on n held-out test examples (the same set every call)."""
        self.sync_weights(handle)
        examples = self.task.examples("test", n, seed)
        r = self.spec.rollout
        decoding = r.decoding(steps=steps or r.steps, remasking=self.spec.eval.remasking)
        return evaluate(self.engine, self.tokenizer, self.task, examples, decoding, r.batch_size,
                        self.spec.task.style, samples=self.spec.eval.samples)

    def evaluate_protocol(self, step: int, out_dir: str, handle: WeightHandle | None = None) -> dict[str, float]:
        """eval.protocol on the weights `handle` names, through rollout.evaluation.evaluate_model
        (what `dlrl eval` runs): the protocol's own task, eval set, prompts, extraction and
        decoding. Writes results.jsonl, summary.json and summary.md into `out_dir`; returns the
        metrics record (eval_score, eval_reward, ...)."""
        self.sync_weights(handle)
        if self._protocol is None:
            protocol = EvalProtocol.from_toml(self.spec.eval.protocol)
            task = resolve_task(self.spec.task.name, protocol)
            self._protocol = protocol, task, load_examples(protocol, task)
        protocol, task, examples = self._protocol
        summary = evaluate_model(self.model, self.tokenizer, task, protocol, model_name=f"{self.run_id}@step-{step}",
                                 out_dir=out_dir, resume=False, examples=examples)
        samples = read_samples(out_dir, task, protocol, examples, self.spec.eval.samples)
        return {**run_metrics(summary), **({"samples": samples} if samples else {})}
