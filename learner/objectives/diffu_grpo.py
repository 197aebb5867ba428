"""diffu-GRPO (d1, arXiv 2504.12216): a token-level clipped ratio on one-step log-probs, one
forward per row per update with a fresh prompt mask each update (on a block-diffusion model, one
forward of its [noisy ; clean] training layout: `one_step_logprobs`). Its old terms are per-update
log-probs (updates, n, L) the learner measures itself (never shipped by a rollout worker), and it
has no MC samples: its memory term is one copy. train.clip_eps = None means no clip."""

from __future__ import annotations

import torch

from dlrl import diffusion
from dlrl.batch import TrainBatch
from dlrl.block_elbo import bd3_hidden, block_size_of
from dlrl.config import TrainSpec
from dlrl.elbo_terms import Piece
from dlrl.models.forward import diffusion_hidden
from dlrl.models.output_head import head_logprobs
from dlrl.precision import autocast
from learner.losses import diffu_grpo_loss
from learner.objectives.objective import Objective, RatioStats, pad_backward


def _prompt_noise(batch: TrainBatch, update: int) -> torch.Tensor:
    """Uniform noise (m, P) for diffu-GRPO's prompt masks: a pure function of (seed, i, update)."""
    rows = []
    for seed, i in batch.seeds.tolist():
        gen = torch.Generator().manual_seed(diffusion.mix_seed(seed, i, update, 0xD1))
        rows.append(torch.rand(batch.prompt_len, generator=gen))
    return torch.stack(rows).to(batch.tokens.device)


def one_step_logprobs(
    model: torch.nn.Module, batch: TrainBatch, mask_id: int, p_mask_prompt: float, update: int,
    compute_dtype: str = "auto",
) -> torch.Tensor:
    """diffu-GRPO per-token log-probs (m, L) from one forward of d1's one-step input.

    On a block-diffusion model the one step is taken in its training layout (dlrl.block_elbo):
    the noisy half is d1's input (the whole response masked, the prompt with its random masks),
    the clean half the same noisy prompt followed by the clean response, under the BD3-LM mask.
    Each response token of block b is then predicted from the prompt, the clean blocks before b
    and a fully masked block b: the first denoising step of its block, given the blocks a sampler
    has committed before it, which is what "one step" is for a block-causal model (a single fully
    masked forward without the clean half would condition every block on masked blocks the model
    never sees at that position in training or decoding).
    """
    P = batch.prompt_len
    response = batch.tokens[:, P:]
    inputs = diffusion.one_step_input(
        batch.tokens[:, :P], batch.attention[:, :P].bool(), response, mask_id, p_mask_prompt,
        _prompt_noise(batch, update),
    )
    block = block_size_of(model)
    with autocast(inputs.device, compute_dtype):
        if block is None:
            hidden = diffusion_hidden(model, inputs, batch.attention)[:, P:]  # (m, L, d)
        else:
            clean = torch.cat([inputs[:, :P], response], dim=1)
            hidden = bd3_hidden(model, inputs, clean, batch.attention, block, slice(P, inputs.shape[1]))
        # Every response position is masked, so every one is scored: (m * L) rows, in chunks.
        logp = head_logprobs(model, hidden.flatten(0, 1), response.flatten())
    return logp.view(response.shape)


class DiffuGrpo(Objective):
    name = "diffu_grpo"
    elbo_old = False
    chunked = False

    def graph_copies(self, n_mc: int, mc_chunk: int) -> int:
        return 1

    def passes(self, spec: TrainSpec) -> int:
        return 1

    def old_passes(self, spec: TrainSpec) -> int:
        return spec.updates_per_batch  # each update's prompt mask, scored before any update

    @torch.no_grad()
    def old_terms(self, model: torch.nn.Module, pieces: list[Piece], spec: TrainSpec,
                  mask_id: int) -> torch.Tensor:
        """(updates, n, L): each update's prompt masks, before any update."""
        per_update = []
        for u in range(spec.updates_per_batch):
            outs = [(one_step_logprobs(model, mb, mask_id, spec.p_mask_prompt, u, spec.compute_dtype), rows)
                    for mb, rows in pieces]
            per_update.append(torch.cat([o for o, rows in outs if rows is not None]))
        return torch.stack(per_update)

    def backward(self, model: torch.nn.Module, piece: TrainBatch, rows: slice, old: torch.Tensor,
                 spec: TrainSpec, mask_id: int, update: int, share: float, stats: RatioStats) -> None:
        adv = piece.advantages.to(old.dtype)
        logp = one_step_logprobs(model, piece, mask_id, spec.p_mask_prompt, update, spec.compute_dtype)
        old_u = old[update, rows]
        loss = diffu_grpo_loss(logp, old_u, adv, piece.valid, spec.clip_eps) * share
        loss.backward()
        stats.loss += loss.item()
        d = (logp.detach() - old_u)[piece.valid]
        stats.d_abs += d.abs().sum().item()
        if spec.clip_eps is not None:
            stats.clipped += ((d.exp() - 1).abs() > spec.clip_eps).sum().item()
        stats.count += d.numel()

    def pad(self, model: torch.nn.Module, piece: TrainBatch, spec: TrainSpec, mask_id: int, update: int) -> None:
        pad_backward(one_step_logprobs(model, piece, mask_id, spec.p_mask_prompt, update, spec.compute_dtype))

    def kept_old(self, old: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return old[0][valid]


OBJECTIVE = DiffuGrpo()
