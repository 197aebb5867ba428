"""BGPO (arXiv 2510.11683, Alg. 1): the bound is a sum over MC samples, so each chunk of
train.mc_chunk samples is forwarded and backwarded at once and its graph freed before the next:
memory holds one chunk's graphs whatever n_mc."""

from __future__ import annotations

import torch

from dlrl.batch import TrainBatch
from dlrl.config import TrainSpec
from dlrl.elbo_terms import ElboPass, elbo_chunk
from learner.losses import bgpo_loss
from learner.objectives.objective import ElboObjective, RatioStats, pad_backward


class Bgpo(ElboObjective):
    name = "bgpo"
    chunked = True  # memory term: mc_chunk copies (ElboObjective.graph_copies)

    def backward(self, model: torch.nn.Module, piece: TrainBatch, rows: slice, old: torch.Tensor,
                 spec: TrainSpec, mask_id: int, update: int, share: float, stats: RatioStats) -> None:
        adv = piece.advantages.to(old.dtype)
        for js in ElboPass.of(spec).chunks():
            terms = elbo_chunk(model, piece, js, mask_id, spec.normalize, spec.compute_dtype)
            old_j = old[rows, js]
            loss = sum(
                bgpo_loss(terms[:, k], old_j[:, k], adv, spec.n_mc, spec.clip_eps, spec.dual_clip)
                for k in range(terms.shape[1])
            ) * share
            loss.backward()  # this chunk's graph is freed here
            stats.loss += loss.item()
            d = (terms.detach() - old_j)
            stats.add_d(d, rows)
            if spec.clip_eps is not None:
                ratio = torch.where(adv[:, None] >= 0, 1 + d, d.exp())
                stats.clipped += ((ratio - 1).abs() > spec.clip_eps).sum().item()

    def pad(self, model: torch.nn.Module, piece: TrainBatch, spec: TrainSpec, mask_id: int, update: int) -> None:
        for js in ElboPass.of(spec).chunks():  # chunk by chunk, as its real pieces run
            pad_backward(elbo_chunk(model, piece, js, mask_id, spec.normalize, spec.compute_dtype))


OBJECTIVE = Bgpo()
