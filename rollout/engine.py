"""The one entry point for sampling a batch: the reference sampler or the cached engine, by name.

`rollout.engine = "reference"` runs `rollout.sampler.generate_with_steps` exactly as before (the
same call, the same random stream, the same tokens); `"cached"` runs `rollout.cached_engine` with
`rollout.cache`, `rollout.threshold` / `rollout.factor`. Rollout workers and evaluation both come
through here, so eval decodes with the engine its spec names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlrl.config import RolloutSpec
from dlrl.models import SpecialIds
from rollout.cached_engine import check_options, generate_cached
from rollout.rollout_stats import RolloutStats, reference_stats
from rollout.sampler import Sample, generate_with_steps

ENGINES = ("reference", "cached")


@dataclass(frozen=True)
class SamplingParams:
    """How completions are sampled (the sampling half of RolloutSpec, plus batching)."""

    gen_length: int
    block_length: int
    steps: int
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    batch_size: int = 64
    engine: str = "reference"
    cache: str = "dual"
    threshold: float | None = None
    factor: float | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine == "cached":
            check_options(self.cache, self.threshold, self.factor, self.remasking)
            if self.cfg_scale > 0:
                raise ValueError("the cached engine does not do classifier-free guidance: use engine='reference'")
        elif self.threshold is not None or self.factor is not None:
            raise ValueError("threshold / factor (parallel decoding) need engine='cached'")

    @classmethod
    def from_spec(cls, r: RolloutSpec) -> "SamplingParams":
        return cls(r.gen_length, r.block_length, r.steps, r.temperature, r.remasking, r.cfg_scale,
                   r.batch_size, r.engine, r.cache, r.threshold, r.factor)


def generate(
    model: torch.nn.Module,
    prompt: Tensor,
    attention_mask: Tensor | None,
    params: SamplingParams,
    ids: SpecialIds,
    generator: torch.Generator | None = None,
) -> tuple[Sample, RolloutStats]:
    """Sample one batch of left-padded prompts (B, P) with the engine `params` names."""
    if params.engine == "reference":
        sample = generate_with_steps(
            model, prompt, steps=params.steps, gen_length=params.gen_length,
            block_length=params.block_length, temperature=params.temperature,
            remasking=params.remasking, mask_id=ids.mask_id, attention_mask=attention_mask,
            cfg_scale=params.cfg_scale, generator=generator,
        )
        return sample, reference_stats(sample.tokens[:, prompt.shape[1]:], params.steps, ids.eos_ids)
    return generate_cached(
        model, prompt, steps=params.steps, gen_length=params.gen_length, block_length=params.block_length,
        mask_id=ids.mask_id, eos_ids=ids.eos_ids, temperature=params.temperature, remasking=params.remasking,
        attention_mask=attention_mask, cache=params.cache, threshold=params.threshold, factor=params.factor,
        generator=generator,
    )
