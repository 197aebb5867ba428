"""The naive ELBO ratio (Eq. 6, "VRPO-OL" in the BGPO paper): exp of the mean d over all n_mc
samples is not a sum over them, so every MC sample's graph stays alive until one backward. The
memory baseline BGPO is measured against: its memory term is n_mc, whatever train.mc_chunk (which
only splits the forwards)."""

from __future__ import annotations

import torch

from dlrl.batch import TrainBatch
from dlrl.config import TrainSpec
from dlrl.elbo_terms import ElboPass, piece_terms
from learner.losses import naive_elbo_ratio_loss
from learner.objectives.objective import ElboObjective, RatioStats


class NaiveElbo(ElboObjective):
    name = "naive_elbo"
    chunked = False  # memory term: all n_mc copies, whatever mc_chunk

    def backward(self, model: torch.nn.Module, piece: TrainBatch, rows: slice, old: torch.Tensor,
                 spec: TrainSpec, mask_id: int, update: int, share: float, stats: RatioStats) -> None:
        adv = piece.advantages.to(old.dtype)
        terms = piece_terms(model, piece, ElboPass.of(spec), mask_id)  # (m, n_mc): every MC graph alive
        loss = naive_elbo_ratio_loss(terms, old[rows], adv) * share
        loss.backward()
        stats.loss += loss.item()
        stats.add_d(terms.detach() - old[rows], rows)


OBJECTIVE = NaiveElbo()
