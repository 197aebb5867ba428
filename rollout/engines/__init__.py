"""Rollout engines: how a batch of prompts becomes completions. One protocol, one registry.

    engine = make_engine(decoding, model, ids)          # decoding: dlrl.decoding.Decoding
    sample, stats = engine.generate(prompt, attention_mask, decoding, generator)

The rollout worker, the built-in evaluation and `dlrl eval` all come through here, so a job's
evaluations decode with the engine its spec (or its protocol) names.

Engines: 'reference' (reference.py: LLaDA's sampler, rollout/sampler.py, one full forward per
step; the default, and what the cached engine is tested against), 'cached' (cached.py:
Fast-dLLM-style block KV cache, parallel commits by threshold or factor, end-of-text early stop)
and 'block' (block.py: block-diffusion models, SDAR / TraDo and LLaDA2.x, decoded as their
published samplers do, on the global block grid with an exact KV cache; tested against
restatements of those samplers).

What a new engine must provide (a class with the methods of `Engine`, one module here, one line
in `ENGINES`; rollout/README.md says the same):

* **Decoding**: it takes `dlrl.decoding.Decoding` as it is. `check(decoding)` raises ValueError,
  naming the field, for every option it cannot honour (an option of another engine, a
  combination it does not do): the one place its rules live. The shared bounds and the block
  arithmetic are the type's, already checked. An option no engine had before is a new field of
  Decoding (its type and bounds), taken up by the engines that understand it and refused by the
  others' `check`.
* **Batches**: `generate` takes left-padded prompts (B, P) and their (B, P) 1/0 attention mask
  (None: no padding) and returns `rollout.sampler.Sample` (tokens (B, P + gen_length), the
  prompt as given followed by the response, and the step at which each response token was
  committed) and the batch's `RolloutStats`. A padded row must decode as the same prompt alone.
* **EOS**: a completion ends at its first end-of-text token (`ids.eos_ids`); what follows is not
  read. An engine may stop a row early there, and must then fill the rest with EOS.
* **Sampler statistics**: `RolloutStats` for every batch (rows, forwards, row steps, committed
  tokens, EOS positions; the committed tokens' mean probability where the engine records it):
  the worker logs them as rollout_* and the evaluation as eval_*, whichever engine ran.
* **Determinism**: every random draw comes from the `torch.Generator` passed in (none from the
  global RNG), so the same weights, prompts, decoding and generator seed give the same tokens:
  a restarted worker redoes a batch exactly, and a resumed evaluation redraws what it would have.
* **Weights**: it decodes with the `model` it was made with and keeps no copy of its weights,
  so the worker's in-place updates of that module (dlrl.weights.WeightReceiver, by broadcast or
  object store) reach it at the next call; `load_weights(state)` takes a name -> tensor state
  (full, or LoRA adapter tensors) into it. An engine that holds weights elsewhere (a server, a
  compiled graph) must apply them in `load_weights` and say how the receiver reaches it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch import Tensor

from dlrl.decoding import Decoding
from dlrl.models import SpecialIds
from rollout.engines.block import BlockEngine
from rollout.engines.cached import CachedEngine
from rollout.engines.reference import ReferenceEngine
from rollout.rollout_stats import RolloutStats
from rollout.sampler import Sample

__all__ = ["ENGINES", "Engine", "check_decoding", "engine_class", "make_engine"]


class Engine(Protocol):
    """A rollout engine bound to one model (see the module docstring for the contract)."""

    model: torch.nn.Module
    """The module it decodes with; the worker's weight receiver updates it in place."""
    ids: SpecialIds
    """The model's mask, pad and end-of-text ids."""

    def __init__(self, model: torch.nn.Module, ids: SpecialIds) -> None: ...

    @staticmethod
    def check(decoding: Decoding) -> None:
        """ValueError, naming the field, for an option this engine cannot honour."""

    def generate(self, prompt: Tensor, attention_mask: Tensor | None, decoding: Decoding,
                 generator: torch.Generator | None = None) -> tuple[Sample, RolloutStats]:
        """Decode `decoding.gen_length` tokens after each left-padded prompt (B, P)."""

    def load_weights(self, state: Mapping[str, Tensor]) -> None:
        """Take new weights (a full state or adapter tensors, by name) before the next call."""


ENGINES: dict[str, type[Engine]] = {
    "reference": ReferenceEngine,
    "cached": CachedEngine,
    "block": BlockEngine,
}
"""`decoding.engine` -> engine class: the one registry."""


def engine_class(name: str) -> type[Engine]:
    """The registered engine called `name`; ValueError listing the registered ones otherwise."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ValueError(f"engine {name!r} is not a rollout engine: one of {', '.join(ENGINES)}") from None


def check_decoding(decoding: Decoding) -> None:
    """ValueError if no registered engine is called `decoding.engine`, or it refuses the options."""
    engine_class(decoding.engine).check(decoding)


def make_engine(decoding: Decoding, model: torch.nn.Module, ids: SpecialIds) -> Engine:
    """The engine `decoding` names, bound to `model`, its options checked."""
    cls = engine_class(decoding.engine)
    cls.check(decoding)
    return cls(model, ids)
