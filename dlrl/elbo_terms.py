"""The ELBO terms l_ij of a batch: completion i under MC mask j, by one model.

Core, not the learner's: the learner measures them for its ratio (the old policy's before any
update, the trained policy's in every chunk) and a rollout worker measures the behaviour policy's
for the groups it generated (rollout/behaviour.py), with this one code, on a batch both build with
`dlrl.batch.collate_for`. So for the same weights and groups the two agree by construction.

The pass takes resolved numbers (`ElboPass`): a spec's mc_chunk = "auto" is decided by whoever
owns the memory (the learner from its free memory, learner.memory; the driver for a worker,
`rollout_pass`) before anything reaches here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dlrl import diffusion
from dlrl.batch import TrainBatch
from dlrl.block_elbo import bd3_hidden, block_size_of
from dlrl.config import JobSpec, TrainSpec
from dlrl.models.forward import diffusion_hidden
from dlrl.models.output_head import head_logprobs
from dlrl.precision import autocast

Piece = tuple[TrainBatch, slice | None]
"""A micro-batch and its rows in the caller's share of the batch (local indices); rows None is a
padding pass (a learner group's rank with fewer rows runs it so all ranks join the same collectives)."""


@dataclass(frozen=True)
class ElboPass:
    """How a batch's ELBO terms are measured: n_mc masks per completion, mc_chunk of them per
    forward over micro_batch completions, each term normalised by `normalize`, matmuls in
    `compute_dtype` (dlrl.precision). Numbers only: no "auto"."""

    n_mc: int
    mc_chunk: int
    micro_batch: int
    normalize: str = "token"
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.mc_chunk, int) or not 1 <= self.mc_chunk <= self.n_mc:
            raise ValueError(f"mc_chunk must be a number in 1..n_mc ({self.n_mc}), got {self.mc_chunk!r}: "
                             f"resolve train.mc_chunk = 'auto' before measuring ELBO terms")

    @classmethod
    def of(cls, train: TrainSpec, mc_chunk: int | None = None) -> ElboPass:
        """The pass of a train spec whose mc_chunk is a number (or with `mc_chunk` in its place)."""
        return cls(train.n_mc, train.mc_chunk if mc_chunk is None else mc_chunk, train.micro_batch,
                   train.normalize, train.compute_dtype)

    def chunks(self) -> list[slice]:
        """The MC samples of each forward: [0, c), [c, 2c), ... up to n_mc."""
        return [slice(j, min(j + self.mc_chunk, self.n_mc)) for j in range(0, self.n_mc, self.mc_chunk)]


def rollout_pass(spec: JobSpec) -> ElboPass:
    """The pass a rollout worker runs for its groups' behaviour terms: the job's numbers, and for
    mc_chunk = "auto" the largest chunk whose forwards hold at most rollout.batch_size rows.

    The worker's pass has no backward, so its chunk only sets how many rows one forward takes: a
    no-grad forward's peak per row (its hidden states, and logits only of its masked response
    rows, one chunk of LOGIT_CHUNK at a time: dlrl.models.output_head) is below the sampler's own
    per row (dlrl.footprint.sampling_bytes, at least (2 b + 8) T V), which the worker already
    holds for rollout.batch_size rows. The learner's
    "auto" is sized for its backward and its own device (learner.memory), so it is not this one;
    a numeric mc_chunk is used as it is, as the learner uses it.
    """
    t = spec.train
    chunk = t.mc_chunk
    if chunk == "auto":
        chunk = max(1, min(t.n_mc, spec.rollout.batch_size // t.micro_batch))
    return ElboPass.of(t, chunk)


def micro_batches(batch: TrainBatch, size: int) -> list[Piece]:
    """The batch in micro-batches of `size` rows: a single process's pieces (no padding)."""
    return [(batch.rows(s, min(s + size, batch.size)), slice(s, min(s + size, batch.size)))
            for s in range(0, batch.size, size)]


def elbo_chunk(
    model: torch.nn.Module, batch: TrainBatch, js: slice, mask_id: int, normalize: str,
    compute_dtype: str = "auto",
) -> torch.Tensor:
    """ELBO terms l_ij for the batch's rows i and MC samples j in `js`: (m, c).

    The c masked copies of each row go through the model as one (m * c, T) forward, its matmuls
    in `compute_dtype` (dlrl.precision); the ELBO itself is summed in float32 or wider. A
    block-diffusion model (its family block-causal) is scored as it was trained: each copy as
    [noisy ; clean] (m * c, at most 2T: cropped to the columns the response depends on) under the
    BD3-LM mask, the logits of the noisy half's response only (dlrl.block_elbo), which gives the
    per-block ELBO summed over blocks.

    Only the masked response positions, the ones the term sums over, are projected onto the
    vocabulary, in chunks (dlrl.models.output_head): the forward returns hidden states, never
    (m * c, T, V) logits.
    """
    P = batch.prompt_len
    m = batch.size
    masks = batch.masks[:, js]  # (m, c, L)
    c = masks.shape[1]
    response = batch.tokens[:, P:]  # (m, L)
    noisy = diffusion.apply_mask(response[:, None].expand(-1, c, -1), masks, mask_id)  # (m, c, L)
    inputs = torch.cat([batch.tokens[:, None, :P].expand(-1, c, -1), noisy], -1).flatten(0, 1)
    attention = batch.attention[:, None].expand(-1, c, -1).flatten(0, 1)
    block = block_size_of(model)
    flat = masks.flatten(0, 1)  # (m * c, L)
    targets = response.repeat_interleave(c, 0)[flat]  # (K,) the masked positions' clean tokens
    with autocast(inputs.device, compute_dtype):
        if block is None:
            hidden = diffusion_hidden(model, inputs, attention)[:, P:]  # (m * c, L, d)
        else:
            clean = batch.tokens.repeat_interleave(c, 0)
            hidden = bd3_hidden(model, inputs, clean, attention, block, slice(P, batch.tokens.shape[1]))
        logp = head_logprobs(model, hidden[flat], targets)  # (K,) float32, projected in chunks
    terms = diffusion.masked_elbo_term(logp, flat, batch.weights[:, js].flatten(), normalize)
    return terms.view(m, c)


def piece_terms(model: torch.nn.Module, piece: TrainBatch, p: ElboPass, mask_id: int) -> torch.Tensor:
    """All n_mc terms (m, n_mc) of one micro-batch, chunk by chunk."""
    return torch.cat([elbo_chunk(model, piece, js, mask_id, p.normalize, p.compute_dtype) for js in p.chunks()],
                     dim=1)


@torch.no_grad()
def elbo_terms(model: torch.nn.Module, pieces: list[Piece], p: ElboPass, mask_id: int) -> torch.Tensor:
    """l (n, n_mc) of the pieces' rows, in order, without a graph: the old policy's terms before
    an update, or the behaviour policy's in a rollout worker. Padding passes run and are dropped."""
    out = []
    for mb, rows in pieces:
        terms = piece_terms(model, mb, p, mask_id)
        if rows is not None:
            out.append(terms)
    return torch.cat(out)
