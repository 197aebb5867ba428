"""One learner step: old-policy ELBO terms, then MC samples processed in chunks, each chunk's
forward and backward run at once so only one chunk's graph is ever alive (BGPO, arXiv
2510.11683, Alg. 1), gradients accumulated over chunks and micro-batches, one optimizer step.

The naive ELBO ratio and diffu-GRPO run in the same harness for comparison.
"""

from __future__ import annotations

import time

import torch

from dlrl import diffusion
from dlrl.config import TrainSpec
from dlrl.models.forward import diffusion_logits
from learner.batch import TrainBatch
from learner.losses import bgpo_loss, diffu_grpo_loss, naive_elbo_ratio_loss
from learner import sharding
from learner.precision import autocast, low_precision_masters
from learner.sharding import Rank


def elbo_chunk(
    model: torch.nn.Module, batch: TrainBatch, js: slice, mask_id: int, normalize: str,
    compute_dtype: str = "auto",
) -> torch.Tensor:
    """ELBO terms l_ij for the batch's rows i and MC samples j in `js`: (m, c).

    The c masked copies of each row go through the model as one (m * c, T) forward, its matmuls
    in `compute_dtype` (learner.precision); the ELBO itself is summed in float32 or wider.
    """
    P = batch.prompt_len
    m = batch.size
    masks = batch.masks[:, js]  # (m, c, L)
    c = masks.shape[1]
    response = batch.tokens[:, P:]  # (m, L)
    noisy = diffusion.apply_mask(response[:, None].expand(-1, c, -1), masks, mask_id)  # (m, c, L)
    inputs = torch.cat([batch.tokens[:, None, :P].expand(-1, c, -1), noisy], -1).flatten(0, 1)
    attention = batch.attention[:, None].expand(-1, c, -1).flatten(0, 1)
    with autocast(inputs.device, compute_dtype):
        logits = diffusion_logits(model, inputs, attention)[:, P:]  # (m * c, L, V)
    terms = diffusion.elbo_term(
        logits,
        response.repeat_interleave(c, 0),
        masks.flatten(0, 1),
        batch.weights[:, js].flatten(),
        normalize,
    )
    return terms.view(m, c)


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
    """diffu-GRPO per-token log-probs (m, L) from one forward of d1's one-step input."""
    P = batch.prompt_len
    response = batch.tokens[:, P:]
    inputs = diffusion.one_step_input(
        batch.tokens[:, :P], batch.attention[:, :P].bool(), response, mask_id, p_mask_prompt,
        _prompt_noise(batch, update),
    )
    with autocast(inputs.device, compute_dtype):
        logits = diffusion_logits(model, inputs, batch.attention)[:, P:]
    return diffusion.token_logprobs(logits, response)


def _pieces(batch: TrainBatch, size: int, rank: Rank) -> list[tuple[TrainBatch, slice | None]]:
    """This rank's micro-batches of the global batch, each with its rows in the rank's share
    (local indices), padded with zero-weighted passes (rows None) to the count every rank runs:
    each pass is a forward (and backward) whose collectives all ranks must join. A single process
    gets exactly its micro-batches, as before the learner group existed."""
    rows = rank.rows(batch.size)
    out: list[tuple[TrainBatch, slice | None]] = [
        (batch.rows(s, min(s + size, rows.stop)), slice(s - rows.start, min(s + size, rows.stop) - rows.start))
        for s in range(rows.start, rows.stop, size)
    ]
    while len(out) < rank.passes(batch.size, size):
        out.append((batch.rows(0, 1), None))
    return out


def _chunks(spec: TrainSpec) -> list[slice]:
    return [slice(j, min(j + spec.mc_chunk, spec.n_mc)) for j in range(0, spec.n_mc, spec.mc_chunk)]


def _pad_backward(out: torch.Tensor) -> None:
    """A padding pass's backward: zero gradient, but the same reduce-scatters as a real one."""
    (out.sum() * 0.0).backward()


@torch.no_grad()
def old_policy_terms(
    model: torch.nn.Module, batch: TrainBatch, spec: TrainSpec, mask_id: int, rank: Rank = Rank()
) -> torch.Tensor:
    """l_old: (n, n_mc) ELBO terms (diffu-GRPO: (updates, n, L) log-probs) before any update, for
    this rank's n rows of the batch (all N rows in a single process)."""
    pieces = _pieces(batch, spec.micro_batch, rank)
    if spec.algorithm == "diffu_grpo":
        per_update = []
        for u in range(spec.updates_per_batch):
            outs = [(one_step_logprobs(model, mb, mask_id, spec.p_mask_prompt, u, spec.compute_dtype), rows)
                    for mb, rows in pieces]
            per_update.append(torch.cat([o for o, rows in outs if rows is not None]))
        return torch.stack(per_update)
    out = []
    for mb, rows in pieces:
        terms = torch.cat([elbo_chunk(model, mb, js, mask_id, spec.normalize, spec.compute_dtype)
                           for js in _chunks(spec)], dim=1)
        if rows is not None:
            out.append(terms)
    return torch.cat(out)


def accumulate_gradients(
    model: torch.nn.Module,
    batch: TrainBatch,
    old: torch.Tensor,
    spec: TrainSpec,
    mask_id: int,
    update: int = 0,
    rank: Rank = Rank(),
) -> dict[str, float]:
    """Backward this rank's part of the batch's loss in pieces; returns the loss value and ratio
    statistics (summed over the learner group).

    Each piece's loss is scaled by its share of the *global* batch (m / N), so the gradient
    accumulated over pieces (and summed over ranks by the reduce-scatter, learner.sharding) is the
    gradient of the full-batch loss whatever the micro-batch, chunk sizes and number of ranks.
    `old` holds this rank's rows (old_policy_terms with the same rank).
    """
    n = batch.size
    loss_total, d_abs, clipped, count = 0.0, 0.0, 0.0, 0
    for mb, rows in _pieces(batch, spec.micro_batch, rank):
        if rows is None:  # padding pass: same collectives, no gradient
            if spec.algorithm == "diffu_grpo":
                _pad_backward(one_step_logprobs(model, mb, mask_id, spec.p_mask_prompt, update, spec.compute_dtype))
            elif spec.algorithm == "naive_elbo":
                _pad_backward(torch.cat([elbo_chunk(model, mb, js, mask_id, spec.normalize, spec.compute_dtype)
                                         for js in _chunks(spec)], dim=1))
            else:
                for js in _chunks(spec):
                    _pad_backward(elbo_chunk(model, mb, js, mask_id, spec.normalize, spec.compute_dtype))
            continue
        share = mb.size / n
        adv = mb.advantages.to(old.dtype)
        if spec.algorithm == "bgpo":
            for js in _chunks(spec):
                terms = elbo_chunk(model, mb, js, mask_id, spec.normalize, spec.compute_dtype)
                old_j = old[rows, js]
                loss = sum(
                    bgpo_loss(terms[:, k], old_j[:, k], adv, spec.n_mc, spec.clip_eps, spec.dual_clip)
                    for k in range(terms.shape[1])
                ) * share
                loss.backward()  # this chunk's graph is freed here
                loss_total += loss.item()
                d = (terms.detach() - old_j)
                d_abs += d.abs().sum().item()
                if spec.clip_eps is not None:
                    ratio = torch.where(adv[:, None] >= 0, 1 + d, d.exp())
                    clipped += ((ratio - 1).abs() > spec.clip_eps).sum().item()
                count += d.numel()
        elif spec.algorithm == "naive_elbo":
            terms = torch.cat([
                elbo_chunk(model, mb, js, mask_id, spec.normalize, spec.compute_dtype) for js in _chunks(spec)
            ], dim=1)  # (m, n_mc): every MC graph alive until the backward below
            loss = naive_elbo_ratio_loss(terms, old[rows], adv) * share
            loss.backward()
            loss_total += loss.item()
            d_abs += (terms.detach() - old[rows]).abs().sum().item()
            count += terms.numel()
        elif spec.algorithm == "diffu_grpo":
            logp = one_step_logprobs(model, mb, mask_id, spec.p_mask_prompt, update, spec.compute_dtype)
            old_u = old[update, rows]
            loss = diffu_grpo_loss(logp, old_u, adv, mb.valid, spec.clip_eps or 0.2) * share
            loss.backward()
            loss_total += loss.item()
            d = (logp.detach() - old_u)[mb.valid]
            d_abs += d.abs().sum().item()
            clipped += ((d.exp() - 1).abs() > (spec.clip_eps or 0.2)).sum().item()
            count += d.numel()
        else:
            raise ValueError(f"unknown algorithm {spec.algorithm!r}")
    if rank.sharded:
        loss_total, d_abs, clipped, count = sharding.all_sum([loss_total, d_abs, clipped, count],
                                                             batch.tokens.device)
    return {
        "loss": loss_total,
        "d_abs": d_abs / max(count, 1),
        "clip_frac": clipped / max(count, 1),
    }


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    spec: TrainSpec,
    mask_id: int,
    rank: Rank = Rank(),
    *,
    old: torch.Tensor | None = None,
) -> dict[str, float]:
    """One rollout batch -> `spec.updates_per_batch` optimizer steps. Returns metrics.

    In a learner group every rank calls this with the same global batch and trains its rows.

    `old`: the behaviour policy's ELBO terms l_old (N, n_mc) of the whole batch, measured by the
    weights that generated it (asynchronous runs, rollout/behaviour.py), so d = l_new - l_old shows
    and clips the staleness from the first update on. None: this model's own terms before any
    update, the behaviour policy when the batch is on-policy (d = 0 at the first update). BGPO and
    naive ELBO only: diffu-GRPO's old terms are per-update log-probs the learner always computes
    itself. d_abs_first / clip_frac_first are the first update's |d| and clip fraction.
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
    if old is None:
        old = old_policy_terms(model, batch, spec, mask_id, rank)
    elif spec.algorithm == "diffu_grpo" or old.shape != (batch.size, spec.n_mc):
        raise ValueError(f"behaviour terms {tuple(old.shape)} for {spec.algorithm}: expected ELBO terms "
                         f"({batch.size}, {spec.n_mc}) of bgpo or naive_elbo")
    else:
        old = old[rank.rows(batch.size)]  # this rank's rows, as old_policy_terms gives them
    metrics: dict[str, float] = {}
    for update in range(spec.updates_per_batch):
        optimizer.zero_grad(set_to_none=True)
        metrics = accumulate_gradients(model, batch, old, spec, mask_id, update, rank)
        metrics["grad_norm"] = (sharding.clip_grad_norm(params, spec.grad_clip) if rank.sharded
                                else float(torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)))
        optimizer.step()
        if update == 0:
            first = {"d_abs_first": metrics["d_abs"], "clip_frac_first": metrics["clip_frac"]}
    metrics.update(first)
    seconds = time.perf_counter() - t0
    passes = 1 if spec.algorithm == "diffu_grpo" else spec.n_mc
    kept = old[0][batch.valid[rank.rows(batch.size)]] if spec.algorithm == "diffu_grpo" else old
    total, count = float(kept.sum()), kept.numel()
    if rank.sharded:
        total, count = sharding.all_sum([total, count], batch.tokens.device)
    metrics.update(
        elbo_old=total / max(count, 1),
        learner_seconds=seconds,
        learner_tokens_per_s=batch.tokens.numel() * passes * (1 + spec.updates_per_batch) / seconds,
    )
    return metrics
