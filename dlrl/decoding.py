"""`Decoding`: how completions are decoded, the one type of the job spec, the eval protocol and the
rollout engines.

`rollout` in a job spec (dlrl.config.RolloutSpec, which adds batching and worker counts) and
`[decoding]` in an eval protocol (dlrl.eval_protocol) are this type, and the engines
(rollout/engines/) take it as it is, so a bound or a cross-field rule is written once, here.

What is checked where:

* here, whatever the engine: each field's type and bounds, and the block arithmetic every
  semi-autoregressive engine relies on (gen_length a multiple of block_length, steps a multiple
  of the number of blocks);
* by the engine the spec names, when a worker or `dlrl eval` makes it (rollout.engines.make_engine):
  whether the name is a registered engine, and which options it takes and how they combine
  (`cache`, `threshold`, `factor`, `cfg_scale`). The core imports no role, so a spec can name an
  engine this process does not know; the engine's own check is the one place its rules live.

Bounds, and why these (the job spec and the eval protocol used to disagree):

* `temperature` <= 10: the Gumbel-max form draws (-log u)^T in float64 with u < 1, so -log u can
  be ~1e-16 and (1e-16)^T underflows to 0 for T above ~20, which turns scores into inf and the
  argmax into "the first position" rather than a sample. 10 keeps every draw finite; a softmax at
  T = 10 is already nearly uniform, so nothing useful lies above it.
* `gen_length`, `block_length`, `steps` <= 131,072: the model's context is the real limit (its
  forward rejects a longer sequence); the schema only stops absurd values. 8,192 would forbid
  the long-CoT lengths block-diffusion models are evaluated at. The job API applies its own,
  much smaller limits (services.admission).
* `factor` > 0 and finite, no upper cap: (n + 1)(1 - p) <= n + 1 <= block_length + 1, so any
  factor at or above block_length + 1 simply commits the whole block in one step. Every finite
  positive value means something; a cap such as 64 would be arbitrary.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TOKENS = 131_072
"""Upper bound of every length and step count (see the module docstring)."""

Tokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
"""A token count or step count: 1 .. MAX_TOKENS."""
Temperature = Annotated[float, Field(ge=0.0, le=10.0)]
"""Gumbel-max temperature: 0 (argmax) .. 10 (see the module docstring)."""


class Decoding(BaseModel):
    """The decoding parameters of one generate call; see the module docstring."""

    # As dlrl.config.Section: strict types, no unknown keys, finite numbers, immutable.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)

    engine: str = Field("reference", min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    """Registered rollout engine (rollout/engines/): 'reference' is LLaDA's sampler, one full
    forward per step (rollout/sampler.py); 'cached' the block-KV-cached engine with optional
    parallel decoding and end-of-text early stop (rollout/engines/cached.py; approximate, see
    rollout/README.md)."""
    gen_length: Tokens
    """Generated tokens per completion (L), all masked at the start."""
    block_length: Tokens
    """Semi-autoregressive block length; gen_length must be a multiple of it."""
    steps: Tokens
    """Diffusion steps for the whole response; a multiple of the number of blocks."""
    temperature: Temperature = 0.0
    """Gumbel-max sampling temperature; 0 is greedy (argmax)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    """Which predicted tokens are kept at each step. 'low_confidence' re-draws unlikely samples
    until a confident token appears, which suppresses exploration on small models; 'random'
    commits tokens in random order, as the ELBO's forward process does."""
    cfg_scale: float = Field(0.0, ge=0.0, le=100.0)
    """Classifier-free guidance scale (0 = off; the reference engine only)."""
    cache: Literal["prefix", "dual"] = "dual"
    """Cached engine only: 'prefix' caches the prompt and decoded blocks and forwards the block and
    the suffix; 'dual' also caches the suffix and forwards the block alone. Refreshed at each block."""
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    """Cached engine only: commit every masked position of the block whose probability exceeds
    this (at least one per step), taking as many steps as needed; None = the fixed `steps` schedule."""
    factor: float | None = Field(None, gt=0.0)
    """Cached engine only: Fast-dLLM's factor rule as their published code applies it: commit the
    n most probable masked positions of the block with (n + 1)(1 - p_n) <= factor, at least one,
    and all of them when only the least probable fails (a rule their paper does not state;
    rollout/commit_policy.py, with where dlrl still departs). None = off."""

    @model_validator(mode="after")
    def _blocks_divide(self) -> Decoding:
        if self.gen_length % self.block_length:
            raise ValueError(f"gen_length {self.gen_length} is not a multiple of block_length {self.block_length}")
        blocks = self.gen_length // self.block_length
        if self.steps % blocks:
            raise ValueError(f"steps {self.steps} is not a multiple of the number of blocks {blocks}")
        return self

    def decoding(self, **changes) -> Decoding:
        """These decoding fields alone (a subclass's other fields dropped), with `changes`, validated."""
        fields = {name: getattr(self, name) for name in Decoding.model_fields}
        return Decoding.model_validate({**fields, **changes})
