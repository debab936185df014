"""Wanda pruning (Sun et al., "A Simple and Effective Pruning Approach for Large Language Models",
ICLR 2024), and magnitude pruning as its baseline.

1. Score ``|W_ij| * ||x_j||`` (:func:`~llmc.passes.sparsity.wanda_scores`), compared within each
   output row (a ratio per row) or within each group of M inputs (N:M); magnitude scores ``|W_ij|``
   the same way.
2. No weight update: the kept weights keep their values.
3. Blocks are calibrated sequentially on the pruned outputs of the blocks before them
   (:mod:`llmc.passes.prune_blocks`, its rule 1); magnitude pruning reads no data.
4. A linear quantized jointly (GPTQ scheme) keeps the mask of rule 1 and is then quantized with
   GPTQ's error feedback holding the removed weights at zero
   (:func:`~llmc.passes.prune_sparsegpt.sparsegpt_prune` with a fixed mask).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmc.passes.prune_blocks import Pruned, SequentialPrunePass
from llmc.passes.prune_sparsegpt import sparsegpt_prune
from llmc.passes.sparsity import magnitude_scores, sparsity_mask, wanda_scores


@dataclass(frozen=True)
class WandaPrunePass(SequentialPrunePass):
    """Prune the linears the rules select by weight x input norm (rules 1-4)."""

    name = "prune-wanda"
    method = "wanda"

    def scores(self, weight, stats):
        return wanda_scores(weight, stats.mean_square)

    def prune(self, name, weight, sparsity, stats, scheme) -> Pruned:
        mask = sparsity_mask(self.scores(weight, stats), sparsity)  # rule 1
        if scheme is not None:  # rule 4
            result = sparsegpt_prune(weight, stats.hessian, mask=mask, bits=scheme.bits, group_size=scheme.group_size,
                                     symmetric=scheme.symmetric, damp=self.damp, block_size=self.block_size)
            return Pruned(result.weight, mask, result.packed, dict(damp=result.damp, loss=result.loss,
                                                                   reference=result.reference))
        return Pruned(weight.float().masked_fill(mask, 0.0), mask, None, {})  # rule 2


@dataclass(frozen=True)
class MagnitudePrunePass(WandaPrunePass):
    """Prune the smallest weights of each row (or N:M group): the baseline Wanda and SparseGPT beat."""

    name = "prune-magnitude"
    method = "magnitude"

    def needs_inputs(self) -> bool:
        return False

    def scores(self, weight, stats):
        return magnitude_scores(weight)
