"""Pruning masks and scores: pure functions on tensors, shared by the prune passes.

A mask is a bool tensor shaped like the weight [out, in], ``True`` where a weight is removed.
The rules, referred to by number from the code and the tests:

1. Per-row ratio: every output row loses exactly ``floor(ratio * in)`` weights, its lowest
   scores (Wanda compares weights within an output row; magnitude pruning here does the same,
   so the two differ only in the score).
2. N:M (keep N of every M): in every group of M consecutive inputs of a row, the ``M - N``
   lowest scores are removed, so each group holds exactly ``M - N`` zeros.
3. Ties are broken by position (stable sort): a mask is a function of the scores alone.
4. Magnitude score ``|W_ij|``; Wanda score ``|W_ij| * ||x_j||`` with ``||x_j||`` the root mean
   square of input ``j`` over the calibration tokens (Sun et al., "A Simple and Effective Pruning
   Approach for Large Language Models", 2023; their L2 norm over tokens is this times a constant,
   which ranks the same).
5. Whole-block ratio (SparseGPT's adaptive mask): the ``floor(ratio * numel)`` lowest scores of
   the whole block are removed, rows competing with each other, so a block loses exactly its
   share while single rows may lose more or less.
"""

from __future__ import annotations

import torch


def row_ratio_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rule 1: in each row of ``scores`` [out, in], the ``floor(ratio * in)`` lowest are removed."""
    if scores.dim() != 2:
        raise ValueError(f"row_ratio_mask: scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    if not 0 <= ratio < 1:
        raise ValueError(f"row_ratio_mask: ratio must be in [0, 1), got {ratio}")
    removed = int(scores.shape[1] * ratio)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if removed:
        order = torch.sort(scores, dim=1, stable=True).indices  # rule 3
        mask.scatter_(1, order[:, :removed], True)
    return mask


def n_m_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Rule 2: in each group of ``m`` consecutive inputs of a row, the ``m - n`` lowest are removed."""
    if scores.dim() != 2:
        raise ValueError(f"n_m_mask: scores must be 2-D [out, in], got shape {tuple(scores.shape)}")
    if not 0 < n < m:
        raise ValueError(f"n_m_mask: need 0 < n < m, got {n}:{m}")
    rows, columns = scores.shape
    if columns % m:
        raise ValueError(f"n_m_mask: groups of {m} do not divide the input dimension {columns}")
    grouped = scores.reshape(rows, columns // m, m)
    order = torch.sort(grouped, dim=2, stable=True).indices  # rule 3
    mask = torch.zeros_like(grouped, dtype=torch.bool)
    mask.scatter_(2, order[..., : m - n], True)
    return mask.reshape(rows, columns)


def block_ratio_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rule 5: the ``floor(ratio * numel)`` lowest of ``scores``, wherever they lie."""
    if not 0 <= ratio < 1:
        raise ValueError(f"block_ratio_mask: ratio must be in [0, 1), got {ratio}")
    flat = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    removed = int(scores.numel() * ratio)
    if removed:
        flat[torch.sort(scores.reshape(-1), stable=True).indices[:removed]] = True  # rule 3
    return flat.reshape(scores.shape)


def sparsity_mask(scores: torch.Tensor, sparsity) -> torch.Tensor:
    """The mask for an :class:`llmc.pruning.Sparsity`: its N:M pattern, else its per-row ratio."""
    if sparsity.n is not None:
        return n_m_mask(scores, sparsity.n, sparsity.m)
    return row_ratio_mask(scores, sparsity.ratio)


def n_m_violations(weight: torch.Tensor, n: int, m: int) -> int:
    """Groups of ``m`` consecutive inputs of a row of ``weight`` [out, in] holding more than ``n`` nonzeros."""
    rows, columns = weight.shape
    if columns % m:
        raise ValueError(f"n_m_violations: groups of {m} do not divide the input dimension {columns}")
    return int(((weight != 0).reshape(rows, columns // m, m).sum(dim=2) > n).sum())


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """Rule 4: ``|W|``."""
    return weight.detach().abs().to(torch.float32)


def wanda_scores(weight: torch.Tensor, mean_square: torch.Tensor) -> torch.Tensor:
    """Rule 4: ``|W_ij| * sqrt(mean_square_j)``; ``mean_square`` [in] is the mean of x_j² over tokens."""
    if mean_square.shape != (weight.shape[1],):
        raise ValueError(f"wanda_scores: {tuple(mean_square.shape)} input statistics for a weight with "
                         f"{weight.shape[1]} inputs")
    return magnitude_scores(weight) * mean_square.to(torch.float32).clamp(min=0).sqrt()[None, :]


class MeanSquareAccumulator:
    """Mean of x_j² per input column over every row added (float64: no cancellation at any count)."""

    def __init__(self, columns: int, device=None):
        self.sum = torch.zeros(columns, dtype=torch.float64, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.sum += rows.square().sum(dim=0)
        self.samples += rows.shape[0]

    def mean_square(self) -> torch.Tensor:
        if self.samples == 0:
            raise ValueError("MeanSquareAccumulator: no inputs were added")
        return (self.sum / self.samples).to(torch.float32)
