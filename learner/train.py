"""The learner: pop a batch of trajectory groups, run one chunked BGPO step, publish weights.

A plain class; the job driver runs it as a Ray actor. `step` reads top to bottom:
pop batch -> advantages + MC masks -> old-policy ELBO -> chunked loss/backward -> optimizer step
-> new weights version.

Delivery is at-least-once (a restarted rollout worker redoes its batch; a resumed run re-reads
what it had not acknowledged), so the learner makes it exactly-once: a group whose id it has
already trained on is dropped and counted, and queue entries are acknowledged only once the step
that used them is in a checkpoint (`save`). A group more than `max_staleness` versions older than
the weights is dropped and counted too.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Container
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dlrl.config import JobSpec
from dlrl.models import load_model, load_trainable, save_checkpoint, special_ids
from dlrl.queue import Delivery, TrajectoryQueue, open_queue
from dlrl.runtime import peak_memory_bytes, pick_device, set_threads
from dlrl.trajectory import TrajectoryGroup
from dlrl.weights import GroupAddress, SyncStats, WeightPublisher, WeightUpdate, encode
from learner.batch import collate
from learner.schedule import lr_factor
from learner.step import train_step

STATE_JSON = "trainer_state.json"
STATE_PT = "trainer_state.pt"


def read_state(checkpoint: str | Path) -> dict | None:
    """The JSON half of a checkpoint's resume state (step, version, trained group ids, driver cursor)."""
    path = Path(checkpoint) / STATE_JSON
    return json.loads(path.read_text()) if path.exists() else None


class Learner:
    def __init__(self, spec: JobSpec, run_id: str | None = None, resume_from: str | None = None) -> None:
        set_threads(spec.runtime.threads)
        torch.manual_seed(spec.train.seed)
        self.spec = spec
        self.run_id = run_id or spec.name
        self.device = pick_device(spec.runtime.device)
        self.model, self.tokenizer = load_model(
            spec.model.path, dtype=spec.model.dtype, device=self.device,
            trust_remote_code=spec.model.trust_remote_code, lora=spec.model.lora,
        )
        self.ids = special_ids(self.model, self.tokenizer)
        t = spec.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, partial(
            lr_factor, warmup_steps=t.warmup_steps, total_steps=t.steps, decay=t.lr_decay,
            final_ratio=t.final_lr_ratio,
        ))
        self.version = 0
        self.trained: list[str] = []  # group ids, in the order they were trained on
        self._trained_set: set[str] = set()
        self.unacked: list[str] = []  # queue entries used by steps not yet in a checkpoint
        self.counts = {"duplicates_dropped": 0, "stale_dropped": 0, "future_dropped": 0}
        if resume_from is not None:
            self._restore(Path(resume_from))
        self.publisher = WeightPublisher.from_spec(spec.weights)
        self.queue: TrajectoryQueue | None = None  # opened by the first step_from_queue
        self.backlog: list[Delivery] = []

    # -- the step ---------------------------------------------------------------------------

    def step(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """One learner step on these groups; the weights version goes up by one."""
        t = self.spec.train
        batch = collate(groups, pad_id=self.ids.pad_id, eos_ids=self.ids.eos_ids, n_mc=t.n_mc,
                        mask_scheme=t.mask_scheme, time_form=t.time_form,
                        mask_coupling=t.mask_coupling).to(self.device)
        metrics = train_step(self.model, self.optimizer, batch, t, self.ids.mask_id)
        metrics["lr"] = self.schedule.get_last_lr()[0]
        self.schedule.step()
        staleness = [self.version - g.policy_version for g in groups]
        self.version += 1
        for g in groups:
            self.trained.append(g.group_id)
            self._trained_set.add(g.group_id)
        metrics.update(
            version=self.version,
            reward=float(batch.rewards.mean()),
            reward_std_in_group=float(np.mean([np.std(g.rewards) for g in groups])),
            zero_adv_groups=sum(float(g.rewards.max() == g.rewards.min()) for g in groups) / len(groups),
            max_staleness=max(staleness),
            learner_memory_bytes=peak_memory_bytes(self.device),
            staleness_hist={str(s): staleness.count(s) for s in sorted(set(staleness))},
        )
        return metrics

    def _accept(self, d: Delivery, batch_ids: Container[str]) -> bool:
        """Whether a delivered group is trained on now; drops are counted and acknowledged at once."""
        g = d.group
        if g.group_id in self._trained_set or g.group_id in batch_ids:
            self.counts["duplicates_dropped"] += 1
        elif g.policy_version > self.version:  # made by weights this learner has not reached (rewound)
            self.counts["future_dropped"] += 1
        elif self.version - g.policy_version > self.spec.runtime.max_staleness:
            self.counts["stale_dropped"] += 1
        else:
            return True
        self.queue.ack([d.entry_id])
        return False

    def step_from_queue(self, n_groups: int, timeout: float = 3600.0) -> dict[str, float]:
        """Wait for n_groups fresh, new groups on the trajectory queue, then `step` on them.

        The batch is sorted by (policy version, group id), so which worker delivered first does not
        change the update (a resumed synchronous run is bit-identical to an uninterrupted one).
        """
        if self.queue is None:
            self.queue = open_queue(self.spec, self.run_id, consumer=f"learner-{os.getpid()}")
            # One learner per run: whatever an earlier learner process took and never acknowledged
            # (it died, or the run was killed) is ours to redo.
            self.backlog = self.queue.reclaim(min_idle_s=0.0)
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        taken: dict[str, Delivery] = {}
        before = dict(self.counts)
        while len(taken) < n_groups:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"learner waited {timeout:.0f}s for {n_groups} groups, got {len(taken)}")
            if self.backlog:
                # Oldest first, so a rewound synchronous run takes exactly the batch it redoes.
                self.backlog.sort(key=lambda d: (d.group.policy_version, d.group.group_id))
                arrived, self.backlog = self.backlog[:n_groups - len(taken)], self.backlog[n_groups - len(taken):]
            else:
                arrived = self.queue.get(n_groups - len(taken), timeout=min(left, 5.0))
            for d in arrived:
                if self._accept(d, taken):
                    taken[d.group.group_id] = d
        waited = time.perf_counter() - t0
        chosen = sorted(taken.values(), key=lambda d: (d.group.policy_version, d.group.group_id))
        metrics = self.step([d.group for d in chosen])
        self.unacked += [d.entry_id for d in chosen]
        if not self.spec.runtime.checkpoint_every:  # no checkpoint to wait for: nothing could resume
            self.queue.ack(self.unacked)
            self.unacked = []
        metrics.update(
            learner_wait_seconds=waited,
            redeliveries=sum(d.deliveries > 1 for d in chosen),
            queue_depth=self.queue.depth(),
            **{k: self.counts[k] - before[k] for k in self.counts},
        )
        return metrics

    # -- weights and checkpoints --------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """Trainable weights on the CPU (the full model, or only the LoRA adapter tensors)."""
        state = self.model.state_dict()
        if self.spec.model.lora is not None:
            state = {k: v for k, v in state.items() if "lora_" in k}
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def weight_payload(self) -> tuple[WeightUpdate, list[np.ndarray]]:
        """This version's manifest and bytes; called with num_returns=2 so the driver owns both
        (dlrl.weights.object_store.adopt) and the version outlives this actor."""
        return encode(self.version, self.weights())

    def open_weight_group(self, world_size: int, host: str = "127.0.0.1") -> GroupAddress:
        """Rank 0 of a broadcast group of this learner and world_size - 1 rollout workers."""
        return self.publisher.open_group(world_size, host)

    def join_weight_group(self) -> bool:
        return self.publisher.join_group()

    def send_weights(self) -> SyncStats:
        """Broadcast the current version (every worker calls recv_weights at the same time)."""
        return self.publisher.send(self.version, self.weights())

    def save(self, path: str | Path) -> str:
        """Atomically write an HF checkpoint plus the resume state to `path`, then acknowledge
        the queue entries of every step it contains (never earlier: a crash before the rename
        leaves them pending, to be re-read by the resumed run)."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(self.model, self.tokenizer, tmp)
        torch.save({"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                    "torch_rng": torch.get_rng_state()}, tmp / STATE_PT)
        # One step per version, and rollout batch b is trained at step b: the version is also the
        # step and the prompt cursor a resumed run starts from.
        state = {"version": self.version, "step": self.version, "trained_groups": self.trained,
                 "counts": self.counts}
        (tmp / STATE_JSON).write_text(json.dumps(state) + "\n")
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        if self.unacked and self.queue is not None:
            self.queue.ack(self.unacked)
        self.unacked = []
        return str(path)

    def _restore(self, path: Path) -> None:
        load_trainable(self.model, path)
        blob = torch.load(path / STATE_PT, weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.schedule.load_state_dict(blob["schedule"])
        torch.set_rng_state(blob["torch_rng"])
        state = read_state(path)
        self.version = state["version"]
        self.trained = list(state["trained_groups"])
        self._trained_set = set(self.trained)
        self.counts = dict(state["counts"])
