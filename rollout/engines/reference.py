"""The reference engine: LLaDA's semi-autoregressive remasking sampler, one full forward per step.

`engine = "reference"` (the default) runs `rollout.sampler.generate_with_steps` exactly as
before the engine seam existed: the same call, the same random stream, the same tokens. It takes
classifier-free guidance (`cfg_scale`); the cached engine's options (`threshold`, `factor`) it
refuses, and `cache` it has no use for; the block engine's (`top_k`, `top_p`, `block_remasking`)
too. It records no confidence (it stays uninstrumented, and
so bit-identical): its stats are the schedule's.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from dlrl.decoding import Decoding
from dlrl.models import SpecialIds
from rollout.engines.block import refuse_block_options
from rollout.rollout_stats import RolloutStats, reference_stats
from rollout.sampler import Sample, generate_with_steps


class ReferenceEngine:
    """rollout.sampler.generate_with_steps behind the engine protocol (rollout.engines.Engine)."""

    def __init__(self, model: torch.nn.Module, ids: SpecialIds) -> None:
        self.model, self.ids = model, ids

    @staticmethod
    def check(decoding: Decoding) -> None:
        if decoding.threshold is not None or decoding.factor is not None:
            raise ValueError(f"threshold / factor (parallel decoding) need engine = 'cached', "
                             f"not {decoding.engine!r}")
        refuse_block_options(decoding)

    def generate(self, prompt: Tensor, attention_mask: Tensor | None, decoding: Decoding,
                 generator: torch.Generator | None = None) -> tuple[Sample, RolloutStats]:
        self.check(decoding)
        d = decoding
        sample = generate_with_steps(
            self.model, prompt, steps=d.steps, gen_length=d.gen_length, block_length=d.block_length,
            temperature=d.temperature, remasking=d.remasking, mask_id=self.ids.mask_id,
            attention_mask=attention_mask, cfg_scale=d.cfg_scale, generator=generator,
        )
        return sample, reference_stats(sample.tokens[:, prompt.shape[1]:], d.steps, self.ids.eos_ids)

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)
