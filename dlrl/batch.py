"""Turn trajectory groups into one padded batch with advantages and MC masks.

Core, not the learner's: the learner trains on this batch and a rollout worker measures the
behaviour policy's ELBO terms on it (dlrl.elbo_terms), so both build it with `collate_for` and
their MC masks, weights and padding agree by construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlrl import diffusion
from dlrl.config import TrainSpec
from dlrl.models import SpecialIds
from dlrl.models.families import Family
from dlrl.trajectory import TrajectoryGroup


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO advantages A = (r - mean) / (std + eps) within each group; rewards (..., G).

    The population std (correction 0) is used so a group of one is defined; an all-equal group
    gives exactly zero (no learning signal, no rounding noise), never NaN.
    """
    mean = rewards.mean(-1, keepdim=True)
    std = rewards.std(-1, correction=0, keepdim=True)
    spread = rewards.amax(-1, keepdim=True) - rewards.amin(-1, keepdim=True)
    adv = (rewards - mean) / (std + eps)
    return torch.where(spread == 0, torch.zeros_like(adv), adv)


@dataclass
class TrainBatch:
    """N completions of the batch, prompts left-padded so every response starts at column P.

    tokens (N, P + L) long; attention (N, P + L) 1/0; advantages (N,); rewards (N,);
    masks (N, n_mc, L) bool and weights (N, n_mc) of the MC ELBO samples;
    valid (N, L) bool: response tokens up to and including the first EOS;
    seeds (N, 2) long: (group mask seed, completion index), for per-update randomness.
    """

    tokens: torch.Tensor
    attention: torch.Tensor
    prompt_len: int
    advantages: torch.Tensor
    rewards: torch.Tensor
    masks: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    seeds: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, start: int, stop: int) -> TrainBatch:
        return TrainBatch(
            self.tokens[start:stop], self.attention[start:stop], self.prompt_len,
            self.advantages[start:stop], self.rewards[start:stop], self.masks[start:stop],
            self.weights[start:stop], self.valid[start:stop], self.seeds[start:stop],
        )

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(
            self.tokens.to(device), self.attention.to(device), self.prompt_len,
            self.advantages.to(device), self.rewards.to(device), self.masks.to(device),
            self.weights.to(device), self.valid.to(device), self.seeds,
        )


def collate(
    groups: list[TrajectoryGroup],
    *,
    pad_id: int,
    eos_ids: tuple[int, ...],
    n_mc: int,
    mask_scheme: diffusion.MaskScheme = "stratified",
    time_form: diffusion.TimeForm = "discrete",
    mask_coupling: str = "group",
) -> TrainBatch:
    """Stack groups into a batch; advantages are normalised within each group (GRPO).

    mask_coupling "group" gives every completion of a group the masks of index 0 (common random
    numbers); "completion" draws them per completion index.
    """
    if not groups:
        raise ValueError("cannot build a batch from no groups")
    lengths = {g.completion_ids.shape[1] for g in groups}
    if len(lengths) != 1:
        raise ValueError(f"all completions in a batch must have one length, got {sorted(lengths)}")
    (gen_len,) = lengths
    prompt_len = max(len(g.prompt_ids) for g in groups)
    rows, attn, adv, rew, masks, weights, seeds = [], [], [], [], [], [], []
    for g in groups:
        pad = prompt_len - len(g.prompt_ids)
        prompt = torch.cat([torch.full((pad,), pad_id), torch.tensor(g.prompt_ids, dtype=torch.long)])
        rewards = torch.tensor(g.rewards, dtype=torch.float64)
        adv.append(group_advantages(rewards))
        rew.append(rewards)
        for i, completion in enumerate(g.completion_ids):
            rows.append(torch.cat([prompt, torch.tensor(completion, dtype=torch.long)]))
            a = torch.ones(prompt_len + gen_len, dtype=torch.long)
            a[:pad] = 0
            attn.append(a)
            index = 0 if mask_coupling == "group" else i
            mc = diffusion.mc_masks(g.mask_seed, index, n_mc, gen_len, mask_scheme, time_form)
            masks.append(mc.mask)
            weights.append(mc.weight)
            seeds.append(torch.tensor([g.mask_seed, i]))
    tokens = torch.stack(rows)
    return TrainBatch(
        tokens=tokens,
        attention=torch.stack(attn),
        prompt_len=prompt_len,
        advantages=torch.cat(adv),
        rewards=torch.cat(rew),
        masks=torch.stack(masks),
        weights=torch.stack(weights),
        valid=diffusion.first_eos_valid(tokens[:, prompt_len:], eos_ids),
        seeds=torch.stack(seeds),
    )


def time_form_for(spec: TrainSpec, family: Family) -> diffusion.TimeForm:
    """The ELBO's time form for a model of `family`: train.time_form, or for "auto" the form the
    family was trained with. Block-diffusion families (SDAR / TraDo, LLaDA2.x) are trained on
    Bernoulli(p) masks with p = (1 - 1e-3) t + 1e-3 and a 1/p weight (SDAR's SFT loss; the
    LLaDA2.0 report's Eq. 1 weight |alpha'_t / (1 - alpha_t)| = 1/t), so their ELBO terms match
    their training loss (reference/block-diffusion.md §2); full-attention families keep the
    mask-count form BGPO's LLaDA runs use."""
    if spec.time_form != "auto":
        return spec.time_form
    return "bernoulli" if family.attention == "block_causal" else "discrete"


def collate_for(groups: list[TrajectoryGroup], spec: TrainSpec, ids: SpecialIds, family: Family) -> TrainBatch:
    """`collate` with a job's settings for a model of `family` (dlrl.models.families.model_family).
    The learner's batch and a rollout worker's behaviour ELBO terms (rollout/behaviour.py) are both
    built by this call."""
    return collate(groups, pad_id=ids.pad_id, eos_ids=ids.eos_ids, n_mc=spec.n_mc, mask_scheme=spec.mask_scheme,
                   time_form=time_form_for(spec, family), mask_coupling=spec.mask_coupling)
