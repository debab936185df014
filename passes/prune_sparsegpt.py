"""SparseGPT pruning (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot", ICML 2023), optionally joint with GPTQ quantization.

The math is one pure function on tensors, :func:`sparsegpt_prune`, built on GPTQ's Hessian and
Cholesky machinery (:mod:`llmc.passes.quantize_gptq`: the Hessian, damping, dead columns and the
inverse's upper Cholesky factor ``U`` are GPTQ's rules 1-4). The rules, referred to by number:

1. Saliency of weight ``(r, j)`` is ``w_rj² / U_jj²``: the output error its removal costs once
   the later columns absorb it (OBS with the sequential inverse Hessians that ``U`` holds).
2. Unstructured: at the start of every block of ``block_size`` columns, the mask of the whole
   block is chosen from the error-updated weights: the ``floor(ratio x block)`` least salient,
   rows competing (:func:`~llmc.passes.sparsity.block_ratio_mask`).
3. N:M: at the first column of every group of M, the ``M - N`` least salient of the group in
   each row, from the weights as updated so far (chosen progressively, not up front).
4. A given ``mask`` (Wanda's or magnitude's) is used as it is: the loop is then GPTQ's error
   feedback with the removed weights held at zero.
5. Each column is replaced by its pruned value (removed weights 0, the others kept or, jointly,
   quantized); the error divided by ``U_jj`` is propagated to the later columns along row ``j``
   of ``U`` (GPTQ rule 4), lazily per block (GPTQ rule 5).
6. Joint quantization: kept weights are rounded on GPTQ's grid (its rule 8, ``fit_grid``), the
   grid of a group fitted when the loop reaches the group's first column on the current values
   with the removed ones taken as 0 (GPTQ rule 6); removed weights take the zero point's code,
   so they dequantize to exactly 0 and the codes keep the pattern.

The pass runs the model block by block (:class:`SparseGptPrunePass`, glue in
:mod:`llmc.passes.prune_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmc.packed import PackedLinear
from llmc.passes.quantize_gptq import SUPPORTED_BITS, fit_grid, full_float32_matmul, inverse_cholesky, one_cpu_thread
from llmc.passes.sparsity import block_ratio_mask, n_m_mask


@dataclass(frozen=True)
class SparseGptResult:
    weight: torch.Tensor  # float32 [out, in]: pruned, updated (and dequantized when joint)
    mask: torch.Tensor  # bool [out, in], True where removed
    packed: PackedLinear | None  # joint quantization's codes
    damp: float  # the damping fraction used (GPTQ rule 3)
    loss: float  # tr((W - Ŵ) H (W - Ŵ)ᵀ) with the undamped H
    reference: float  # tr(W H Wᵀ): the loss of removing every weight
    dead_columns: int


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity=None,
    *,
    mask: torch.Tensor | None = None,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
) -> SparseGptResult:
    """Prune ``weight`` [out, in] given its input Hessian [in, in] (rules 1-6).

    ``sparsity`` is an :class:`llmc.pruning.Sparsity` (a ratio or N:M); ``mask`` instead fixes
    which weights go (rule 4). ``bits`` quantizes jointly (rule 6) in groups of ``group_size``
    inputs (``None`` or -1: one group per row). Raises ``ValueError`` for shapes that do not fit,
    an N:M group that does not divide the input, a weight that is not finite, and the quantization
    settings GPTQ declines.
    """
    if weight.dim() != 2:
        raise ValueError(f"sparsegpt_prune: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"sparsegpt_prune: Hessian {tuple(hessian.shape)} does not fit a weight with {columns} inputs")
    if (sparsity is None) == (mask is None):
        raise ValueError("sparsegpt_prune: give exactly one of sparsity and mask")
    if mask is not None and tuple(mask.shape) != (rows, columns):
        raise ValueError(f"sparsegpt_prune: mask {tuple(mask.shape)} does not fit weight {(rows, columns)}")
    n, m = (sparsity.n, sparsity.m) if sparsity is not None and sparsity.n is not None else (None, None)
    if m is not None:
        if columns % m:
            raise ValueError(f"sparsegpt_prune: groups of {m} do not divide the input dimension {columns}")
        block_size = max(m, block_size // m * m)  # an N:M group never straddles two blocks
    if block_size < 1:
        raise ValueError(f"sparsegpt_prune: block_size must be positive, got {block_size}")
    quantize = bits is not None
    if quantize:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"sparsegpt_prune: bits must be one of {SUPPORTED_BITS}, got {bits}")
        if bits == 8 and not symmetric:
            raise ValueError("sparsegpt_prune: 8-bit asymmetric codes do not fit PackedLinear's int8 codes")
        group = columns if group_size in (None, -1) else group_size
        if group <= 0 or columns % group:
            raise ValueError(f"sparsegpt_prune: group_size {group_size} does not divide the input dimension {columns}")
    if not torch.isfinite(weight).all():
        raise ValueError("sparsegpt_prune: weight holds inf or NaN; fix the checkpoint before pruning")

    with full_float32_matmul(), one_cpu_thread(weight.device):
        original = weight.detach().to(torch.float32)
        H0 = hessian.detach().to(device=original.device, dtype=torch.float32)
        W = original.clone()
        H = H0.clone()
        dead = torch.diag(H) == 0  # GPTQ rule 2
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
        U, used = inverse_cholesky(H, damp)
        diagonal = torch.diag(U)

        removed = torch.zeros(rows, columns, dtype=torch.bool, device=W.device)
        pruned = torch.zeros_like(W)
        if quantize:
            low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
            scales = torch.ones(rows, columns // group, device=W.device)
            zeros = torch.zeros(rows, columns // group, device=W.device)
            codes = torch.zeros_like(W)
        for i1 in range(0, columns, block_size):
            i2 = min(i1 + block_size, columns)
            W1 = W[:, i1:i2].clone()
            errors = torch.zeros_like(W1)
            d = diagonal[i1:i2]
            if mask is not None:  # rule 4
                M1 = mask[:, i1:i2].to(device=W.device, dtype=torch.bool).clone()
            elif n is None:  # rule 2
                M1 = block_ratio_mask(W1.square() / d.square()[None, :], sparsity.ratio)
            else:
                M1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(i2 - i1):
                column = i1 + i
                if n is not None and mask is None and i % m == 0:  # rule 3
                    M1[:, i : i + m] = n_m_mask(W1[:, i : i + m].square() / d[i : i + m].square()[None, :], n, m)
                w = W1[:, i]
                if quantize:  # rule 6
                    g = column // group
                    if column % group == 0:
                        end = column + group
                        current = W1[:, i : min(end, i2) - i1].masked_fill(M1[:, i : min(end, i2) - i1], 0.0)
                        if end > i2:
                            current = torch.cat([current, W[:, i2:end] - errors @ U[i1:i2, i2:end]], dim=1)
                        scales[:, g], zeros[:, g] = fit_grid(current, bits, symmetric)
                    scale, zero = scales[:, g], zeros[:, g]
                    q = torch.where(M1[:, i], zero, (torch.round(w / scale) + zero).clamp(low, high))
                    value = q * scale if symmetric else (q - zero) * scale
                    codes[:, column] = q
                else:
                    value = w.masked_fill(M1[:, i], 0.0)
                pruned[:, column] = value
                # Rule 5.
                error = (w - value) / d[i]
                W1[:, i + 1 :].addr_(error, U[column, column + 1 : i2], alpha=-1)
                errors[:, i] = error
            removed[:, i1:i2] = M1
            W[:, i2:].addmm_(errors, U[i1:i2, i2:], alpha=-1)

        removed |= dead[None, :]
        difference = original - pruned
        loss = float(((difference @ H0) * difference).sum())
        reference = float(((original @ H0) * original).sum())

    packed = None
    if quantize:
        packed = PackedLinear(
            q=codes.to(torch.int8),
            scale=scales,
            zero=None if symmetric else zeros.to(torch.int8),
            bits=bits,
            group_size=group,
            symmetric=symmetric,
        )
    return SparseGptResult(pruned, removed, packed, used, loss, reference, int(dead.sum()))


# --------------------------------------------------------------------------- the pass

from llmc.passes.prune_blocks import Pruned, SequentialPrunePass  # noqa: E402


@dataclass(frozen=True)
class SparseGptPrunePass(SequentialPrunePass):
    """Prune the linears the rules select with SparseGPT (rules 1-6), block by block; jointly
    quantize those whose quantization scheme is GPTQ."""

    name = "prune-sparsegpt"
    method = "sparsegpt"

    def needs_hessian(self, joint: bool) -> bool:
        return True

    def prune(self, name, weight, sparsity, stats, scheme) -> Pruned:
        result = sparsegpt_prune(
            weight, stats.hessian, sparsity, damp=self.damp, block_size=self.block_size,
            **({} if scheme is None else dict(bits=scheme.bits, group_size=scheme.group_size,
                                              symmetric=scheme.symmetric)),
        )
        return Pruned(result.weight, result.mask, result.packed, dict(damp=result.damp, loss=result.loss,
                                                         reference=result.reference,
                                                         dead_columns=result.dead_columns))
