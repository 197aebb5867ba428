"""The learner: pop a batch of trajectory groups, run one chunked BGPO step, publish weights.

A plain class; the job driver runs it as a Ray actor. `step` reads top to bottom:
pop batch -> advantages + MC masks -> old-policy ELBO -> chunked loss/backward -> optimizer step
-> new weights version.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from dlrl.config import JobSpec
from dlrl.models import load_model, save_checkpoint, special_ids
from dlrl.runtime import pick_device, set_threads
from dlrl.trajectory import TrajectoryGroup
from learner.batch import collate
from learner.step import train_step


class Learner:
    def __init__(self, spec: JobSpec) -> None:
        set_threads(spec.runtime.threads)
        torch.manual_seed(spec.train.seed)
        self.spec = spec
        self.device = pick_device(spec.runtime.device)
        self.model, self.tokenizer = load_model(
            spec.model.path, dtype=spec.model.dtype, device=self.device,
            trust_remote_code=spec.model.trust_remote_code, lora=spec.model.lora,
        )
        self.ids = special_ids(self.model, self.tokenizer)
        t = spec.train
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=t.lr, betas=t.betas, weight_decay=t.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (t.warmup_steps + 1))
        )
        self.version = 0

    def step(self, groups: list[TrajectoryGroup]) -> dict[str, float]:
        """One learner step on these groups; the weights version goes up by one."""
        t = self.spec.train
        batch = collate(groups, pad_id=self.ids.pad_id, eos_ids=self.ids.eos_ids, n_mc=t.n_mc,
                        mask_scheme=t.mask_scheme, time_form=t.time_form,
                        mask_coupling=t.mask_coupling).to(self.device)
        metrics = train_step(self.model, self.optimizer, batch, t, self.ids.mask_id)
        metrics["lr"] = self.schedule.get_last_lr()[0]
        self.schedule.step()
        self.version += 1
        staleness = [self.version - 1 - g.policy_version for g in groups]
        metrics.update(
            version=self.version,
            reward=float(batch.rewards.mean()),
            reward_std_in_group=float(np.mean([np.std(g.rewards) for g in groups])),
            zero_adv_groups=sum(float(g.rewards.max() == g.rewards.min()) for g in groups) / len(groups),
            max_staleness=max(staleness),
        )
        return metrics

    def step_from_queue(self, queue, n_groups: int, timeout: float | None = None) -> dict[str, float]:
        """Block on the trajectory queue for n_groups groups, then `step` on them."""
        t0 = time.perf_counter()
        groups = [queue.get(block=True, timeout=timeout) for _ in range(n_groups)]
        waited = time.perf_counter() - t0
        metrics = self.step(groups)
        metrics["learner_wait_seconds"] = waited
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        """Trainable weights on the CPU (the full model, or only the LoRA adapter tensors)."""
        state = self.model.state_dict()
        if self.spec.model.lora is not None:
            state = {k: v for k, v in state.items() if "lora_" in k}
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save(self, path: str | Path) -> str:
        """Atomically write an HF checkpoint (full model or adapter) to `path`."""
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(self.model, self.tokenizer, tmp)
        if path.exists():
            old = path.with_name(path.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        return str(path)
