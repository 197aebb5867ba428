"""One learner step: old-policy terms, then the batch's loss backwarded piece by piece (and, for
BGPO, MC chunk by MC chunk, each chunk's forward and backward run at once so only one chunk's graph
is ever alive: arXiv 2510.11683, Alg. 1), gradients accumulated over pieces, one optimizer step.

The objective (train.algorithm) is a unit of learner/objectives/: this harness runs any of them
and names none.
"""

from __future__ import annotations

import time

import torch

from dlrl.batch import TrainBatch
from dlrl.block_elbo import bd3_columns, block_size_of
from dlrl.config import TrainSpec
from dlrl.elbo_terms import Piece, micro_batches
from dlrl.precision import low_precision_masters
from learner import sharding
from learner.objectives import RatioStats, objective_for
from learner.sharding import Rank


def _pieces(batch: TrainBatch, size: int, rank: Rank) -> list[Piece]:
    """This rank's micro-batches of the global batch, each with its rows in the rank's share
    (local indices), padded with zero-weighted passes (rows None) to the count every rank runs:
    each pass is a forward (and backward) whose collectives all ranks must join. A single process
    gets exactly its micro-batches, as before the learner group existed."""
    rows = rank.rows(batch.size)
    out = micro_batches(batch.rows(rows.start, rows.stop), size)
    while len(out) < rank.passes(batch.size, size):
        out.append((batch.rows(0, 1), None))
    return out


def old_policy_terms(
    model: torch.nn.Module, batch: TrainBatch, spec: TrainSpec, mask_id: int, rank: Rank = Rank()
) -> torch.Tensor:
    """The objective's old terms before any update, for this rank's n rows of the batch (all N
    rows in a single process): ELBO terms (n, n_mc), or diffu-GRPO's log-probs (updates, n, L)."""
    return objective_for(spec).old_terms(model, _pieces(batch, spec.micro_batch, rank), spec, mask_id)


def accumulate_gradients(
    model: torch.nn.Module,
    batch: TrainBatch,
    old: torch.Tensor,
    spec: TrainSpec,
    mask_id: int,
    update: int = 0,
    rank: Rank = Rank(),
    on_policy: torch.Tensor | None = None,
) -> dict[str, float]:
    """Backward this rank's part of the batch's loss in pieces; returns the loss value and ratio
    statistics (summed over the learner group), and behaviour_elbo_gap given `on_policy` (this
    rank's rows made by the current weights, RatioStats) and at least one such row in the group.

    Each piece's loss is scaled by its share of the *global* batch (m / N), so the gradient
    accumulated over pieces (and summed over ranks by the reduce-scatter, learner.sharding) is the
    gradient of the full-batch loss whatever the micro-batch, chunk sizes and number of ranks.
    `old` holds this rank's rows (old_policy_terms with the same rank).
    """
    objective = objective_for(spec)
    stats = RatioStats(on_policy=on_policy)
    for mb, rows in _pieces(batch, spec.micro_batch, rank):
        if rows is None:  # padding pass: same collectives, no gradient
            objective.pad(model, mb, spec, mask_id, update)
        else:
            objective.backward(model, mb, rows, old, spec, mask_id, update, mb.size / batch.size, stats)
    loss_total, d_abs, clipped, count = stats.loss, stats.d_abs, stats.clipped, stats.count
    gap_abs, gap_count = stats.gap_abs, stats.gap_count
    if rank.sharded:
        sums = [loss_total, d_abs, clipped, count] + ([gap_abs, gap_count] if on_policy is not None else [])
        loss_total, d_abs, clipped, count, *gap = sharding.all_sum(sums, batch.tokens.device)
        if gap:
            gap_abs, gap_count = gap
    metrics = {
        "loss": loss_total,
        "d_abs": d_abs / max(count, 1),
        "clip_frac": clipped / max(count, 1),
    }
    if gap_count:
        metrics["behaviour_elbo_gap"] = gap_abs / gap_count
    return metrics


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    spec: TrainSpec,
    mask_id: int,
    rank: Rank = Rank(),
    *,
    old: torch.Tensor | None = None,
    on_policy: torch.Tensor | None = None,
) -> dict[str, float]:
    """One rollout batch -> `spec.updates_per_batch` optimizer steps. Returns metrics.

    In a learner group every rank calls this with the same global batch and trains its rows.

    `old`: the behaviour policy's ELBO terms l_old (N, n_mc) of the whole batch, measured by the
    weights that generated it (asynchronous runs, rollout/behaviour.py), so d = l_new - l_old shows
    and clips the staleness from the first update on. None: this model's own terms before any
    update, the behaviour policy when the batch is on-policy (d = 0 at the first update). Only
    for objectives whose old terms are ELBO terms (Objective.elbo_old): diffu-GRPO's are per-update
    log-probs the learner always computes itself. d_abs_first / clip_frac_first are the first
    update's |d| and clip fraction.

    `on_policy` (N,) bool, with `old`: the rows whose group the current weights generated. Before
    the first optimizer step their d is the gap between the workers' behaviour terms (rollout-dtype
    weights, bf16 on GPUs) and this model's, logged as behaviour_elbo_gap (mean |d| over their
    terms; absent when the batch has none), the way AR RL systems log the train/inference log-prob
    gap (verl's rollout_probs_diff). It is measured, not corrected: bench/rollout_dtype.py puts
    it at about 1e-3 (max 7e-3) against clip_eps 0.2, the size of the gap between the learner's
    own autocast and float32 terms.
    """
    t0 = time.perf_counter()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if low := low_precision_masters(params):
        raise ValueError(
            f"trainable weights are {', '.join(low)}: AdamW's updates at lr {spec.lr:g} round away in "
            f"them. Keep the trained weights in float32 (model.dtype = 'float32') and compute in bf16 "
            f"(train.compute_dtype = 'bfloat16'), or train a LoRA adapter (model.lora)"
        )
    objective = objective_for(spec)
    old_shipped = old is not None  # else the old-policy pass runs here
    if old is None:
        old = old_policy_terms(model, batch, spec, mask_id, rank)
    elif not objective.elbo_old or old.shape != (batch.size, spec.n_mc):
        raise ValueError(f"behaviour terms {tuple(old.shape)} for {spec.algorithm}: expected ELBO terms "
                         f"({batch.size}, {spec.n_mc}) of an objective whose old terms are ELBO terms")
    else:
        old = old[rank.rows(batch.size)]  # this rank's rows, as old_policy_terms gives them
        if on_policy is not None:
            on_policy = on_policy[rank.rows(batch.size)]
    metrics: dict[str, float] = {}
    for update in range(spec.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(model, batch, old, spec, mask_id, update, rank,
                                       on_policy if update == 0 and old_shipped else None)
        metrics["grad_norm"] = (sharding.clip_grad_norm(params, spec.grad_clip) if rank.sharded
                                else float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)))
        optimizer.step()
        if update == 0:
            first = {"d_abs_first": metrics["d_abs"], "clip_frac_first": metrics["clip_frac"]}
            if "behaviour_elbo_gap" in metrics:
                first["behaviour_elbo_gap"] = metrics.pop("behaviour_elbo_gap")
    metrics.update(first)
    seconds = time.perf_counter() - t0
    # Throughput in the batch's own tokens: each row's T tokens once per forward of it (n_mc per
    # update for an ELBO objective, and the old-policy pass when it ran here), whatever layout the
    # model forwards them in -- so the figure compares across families and with rollout tokens/s.
    # A block-diffusion family forwards [x_t ; x_0] cropped to the columns the response depends on
    # (dlrl.block_elbo.bd3_columns: up to 2T positions a row): the positions through the model, the
    # figure for hardware throughput, are `forward_tokens` (counted on the whole batch's crop; a
    # micro batch's own crop can only be smaller).
    forwards = objective.passes(spec) * spec.updates_per_batch + (0 if old_shipped else objective.old_passes(spec))
    tokens = batch.tokens.numel() * forwards
    forward_tokens = tokens
    if (block := block_size_of(model)) is not None:
        noisy_from, clean_to = bd3_columns(batch.attention, batch.prompt_len, block)
        width = batch.tokens.shape[1]
        forward_tokens = tokens * (width - noisy_from + clean_to) // width
    kept = objective.kept_old(old, batch.valid[rank.rows(batch.size)])
    total, count = float(kept.sum()), kept.numel()
    if rank.sharded:
        total, count = sharding.all_sum([total, count], batch.tokens.device)
    metrics.update(
        elbo_old=total / max(count, 1),
        learner_seconds=seconds,
        learner_tokens_per_s=tokens / seconds,
        learner_forward_tokens_per_s=forward_tokens / seconds,
    )
    return metrics
