"""`Decoding`: how completions are decoded, the one type of the job spec, the eval protocol and the
rollout engines.

`rollout` in a job spec (dlrl.config.RolloutSpec, which adds batching and worker counts) and
`[decoding]` in an eval protocol (dlrl.eval_protocol) are this type, and the engines
(rollout/engines/) take it as it is, so a bound or a cross-field rule is written once, here.

What is checked where:

* here, whatever the engine: each field's type and bounds, and the block arithmetic the engine's
  meaning of `steps` needs. LLaDA's semi-autoregressive engines ('reference', 'cached') count
  `steps` for the whole response, shared over gen_length / block_length response blocks: gen_length
  a multiple of block_length, steps a multiple of the number of blocks. The block-diffusion engine
  ('block', `PER_BLOCK_STEPS`) counts them per block, as the published SDAR and LLaDA2 samplers do
  ("denoising steps" per block), on the global grid of prompt + response, where a response touches
  a number of blocks that depends on its prompt's length: steps <= block_length (each step commits
  at least one token), any gen_length. This is the one rule here that reads the engine's name:
  what `steps` counts is the field's meaning, not an engine option;
* by the engine the spec names, when a worker or `dlrl eval` makes it (rollout.engines.make_engine):
  whether the name is a registered engine, and which options it takes and how they combine
  (`cache`, `threshold`, `factor`, `cfg_scale`, `top_k`, `top_p`, `block_remasking`). The core
  imports no role, so a spec can name an engine this process does not know; the engine's own check
  is the one place its rules live.

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
* `top_k` <= 2^20: above any vocabulary (the largest published is 262,144), where it keeps every
  token; `top_p` in (0, 1): 1 keeps every token, so "off" is None, as for top_k (the published
  samplers' 0 and 1.0).
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
PER_BLOCK_STEPS = ("block",)
"""Engines whose `steps` count denoising steps per block (the published block-diffusion samplers')."""


class Decoding(BaseModel):
    """The decoding parameters of one generate call; see the module docstring."""

    # As dlrl.config.Section: strict types, no unknown keys, finite numbers, immutable.
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True, strict=True,
                              allow_inf_nan=False)

    engine: str = Field("reference", min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_]*$")
    """Registered rollout engine (rollout/engines/): 'reference' is LLaDA's sampler, one full
    forward per step (rollout/sampler.py); 'cached' the block-KV-cached engine with optional
    parallel decoding and end-of-text early stop (rollout/engines/cached.py; approximate, see
    rollout/README.md); 'block' the block-diffusion sampler of SDAR / TraDo and LLaDA2.x, exact KV
    cache (rollout/engines/block.py)."""
    gen_length: Tokens
    """Generated tokens per completion (L), all masked at the start."""
    block_length: Tokens
    """Semi-autoregressive block length; gen_length must be a multiple of it (engine 'block': the
    model's trained block size, on the global grid, any gen_length)."""
    steps: Tokens
    """Diffusion steps for the whole response; a multiple of the number of blocks (engine 'block':
    denoising steps per block, <= block_length)."""
    temperature: Temperature = 0.0
    """Gumbel-max sampling temperature; 0 is greedy (argmax)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    """Which predicted tokens are kept at each step. 'low_confidence' re-draws unlikely samples
    until a confident token appears, which suppresses exploration on small models; 'random'
    commits tokens in random order, as the ELBO's forward process does. The LLaDA engines' rule;
    engine 'block' commits by `block_remasking` and refuses 'random'."""
    cfg_scale: float = Field(0.0, ge=0.0, le=100.0)
    """Classifier-free guidance scale (0 = off; the reference engine only)."""
    cache: Literal["prefix", "dual"] = "dual"
    """Cached engine only: 'prefix' caches the prompt and decoded blocks and forwards the block and
    the suffix; 'dual' also caches the suffix and forwards the block alone. Refreshed at each block."""
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    """Cached engine: commit every masked position of the block whose probability exceeds this (at
    least one per step), taking as many steps as needed; None = the fixed `steps` schedule. Block
    engine: the tau of block_remasking 'low_confidence_dynamic' (SDAR's confidence_threshold,
    LLaDA2's threshold)."""
    factor: float | None = Field(None, gt=0.0)
    """Cached engine only: Fast-dLLM's factor rule as their published code applies it: commit the
    n most probable masked positions of the block with (n + 1)(1 - p_n) <= factor, at least one,
    and all of them when only the least probable fails (a rule their paper does not state;
    rollout/commit_policy.py, with where dlrl still departs). None = off."""
    top_k: int | None = Field(None, ge=1, le=1 << 20)
    """Block engine only: sample among the k most probable tokens (after the temperature, before
    top_p), as the published SDAR / LLaDA2 samplers do; None = off."""
    top_p: float | None = Field(None, gt=0.0, lt=1.0)
    """Block engine only: nucleus sampling over the top-k-filtered distribution; None = off."""
    block_remasking: Literal["sequential", "low_confidence_static", "low_confidence_dynamic"] | None = None
    """Block engine only (and required there): SDAR's remasking strategy, the positions each step
    commits. 'sequential': the next n_s masks left to right; 'low_confidence_static': the n_s most
    confident; 'low_confidence_dynamic': every mask above `threshold` if there are n_s of them,
    else the n_s most confident (also LLaDA2's threshold rule). Confidence is the sampled token's
    probability (rollout/engines/block.py)."""

    @model_validator(mode="after")
    def _blocks_divide(self) -> Decoding:
        if self.engine in PER_BLOCK_STEPS:
            if self.steps > self.block_length:
                raise ValueError(f"steps {self.steps} (denoising steps per block, engine {self.engine!r}) "
                                 f"exceed block_length {self.block_length}")
            return self
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
