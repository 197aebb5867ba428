"""What an objective is to the learner step (learner.step) and to the memory plan.

An objective says which old-policy terms it needs, how it backwards one piece (a micro-batch of
this rank's rows) of the batch and with which passes, what a padding pass runs, its ratio
statistics, and its memory term: how many MC copies of a row have their graph alive at once,
which `dlrl plan` and train.mc_chunk = "auto" size the learner's activations by
(dlrl.footprint's `graph_copies`). The losses themselves are pure functions in learner.losses.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from dlrl.batch import TrainBatch
from dlrl.config import TrainSpec
from dlrl.elbo_terms import ElboPass, Piece, elbo_terms, piece_terms


@dataclass
class RatioStats:
    """A rank's running sums over the pieces it backwarded: the loss, |d| = |l_new - l_old| and
    the ratios past the clip, over `count` d's. Summed chunk by chunk, in the order they ran.

    `on_policy` (this rank's rows, bool; given at the first update of a batch whose l_old the
    workers shipped): the rows made by the learner's current weights. Their d before any update
    is not staleness but the precision gap between the workers' rollout-dtype weights and the
    learner's float32 masters (dlrl.precision.rollout_dtype), summed in `gap_abs` over
    `gap_count` d's: the behaviour_elbo_gap metric (bench/rollout_dtype.py measures its size)."""

    loss: float = 0.0
    d_abs: float = 0.0
    clipped: float = 0.0
    count: int = 0
    on_policy: torch.Tensor | None = None
    gap_abs: float = 0.0
    gap_count: int = 0

    def add_d(self, d: torch.Tensor, rows: slice) -> None:
        """Count d (m, c) of this rank's rows `rows`: |d| always, the gap on on-policy rows."""
        self.d_abs += d.abs().sum().item()
        self.count += d.numel()
        if self.on_policy is not None:
            fresh = self.on_policy[rows]  # (m,)
            self.gap_abs += d[fresh].abs().sum().item()
            self.gap_count += int(fresh.sum()) * d.shape[1]


def pad_backward(out: torch.Tensor) -> None:
    """A padding pass's backward: zero gradient, but the same reduce-scatters as a real one."""
    (out.sum() * 0.0).backward()


class Objective(ABC):
    name: ClassVar[str]
    elbo_old: ClassVar[bool]
    """Its old-policy terms are ELBO terms (n, n_mc), one per MC mask, measured once per batch: a
    rollout worker can measure them for the weights that generated a group and ship them
    (rollout/behaviour.py). False: per-update terms the learner always measures itself."""
    chunked: ClassVar[bool]
    """Its MC samples may be backwarded in chunks of train.mc_chunk, each graph freed before the next."""

    @abstractmethod
    def graph_copies(self, n_mc: int, mc_chunk: int) -> int:
        """The memory term: MC copies of one row whose forward graph is alive at once in a backward."""

    @abstractmethod
    def passes(self, spec: TrainSpec) -> int:
        """Forwards of each row per update (the learner's tokens/s counts them)."""

    @abstractmethod
    def old_passes(self, spec: TrainSpec) -> int:
        """Forwards of each row in `old_terms`, once per batch (counted when the learner runs them)."""

    @abstractmethod
    def old_terms(self, model: torch.nn.Module, pieces: list[Piece], spec: TrainSpec,
                  mask_id: int) -> torch.Tensor:
        """The old policy's terms of the pieces' rows, before any update (no graph)."""

    @abstractmethod
    def backward(self, model: torch.nn.Module, piece: TrainBatch, rows: slice, old: torch.Tensor,
                 spec: TrainSpec, mask_id: int, update: int, share: float, stats: RatioStats) -> None:
        """Backward `share` x the piece's loss (its rows `rows` of `old`), adding to `stats`."""

    @abstractmethod
    def pad(self, model: torch.nn.Module, piece: TrainBatch, spec: TrainSpec, mask_id: int, update: int) -> None:
        """A padding pass: the forwards and backwards of a real piece, with zero gradient."""

    @abstractmethod
    def kept_old(self, old: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The old terms the elbo_old metric averages; `valid` (n, L) are the rows' counted tokens."""


class ElboObjective(Objective, ABC):
    """An objective on ELBO terms: l_old (n, n_mc) measured once per batch, n_mc forwards per row."""

    elbo_old = True

    def passes(self, spec: TrainSpec) -> int:
        return spec.n_mc

    def old_passes(self, spec: TrainSpec) -> int:
        return spec.n_mc  # the same n_mc masks, scored once by the weights before the update

    def graph_copies(self, n_mc: int, mc_chunk: int) -> int:
        """One chunk's MC copies when each chunk is backwarded alone, else all n_mc at once."""
        return mc_chunk if self.chunked else n_mc

    def old_terms(self, model: torch.nn.Module, pieces: list[Piece], spec: TrainSpec,
                  mask_id: int) -> torch.Tensor:
        return elbo_terms(model, pieces, ElboPass.of(spec), mask_id)

    def pad(self, model: torch.nn.Module, piece: TrainBatch, spec: TrainSpec, mask_id: int, update: int) -> None:
        pad_backward(piece_terms(model, piece, ElboPass.of(spec), mask_id))

    def kept_old(self, old: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return old
