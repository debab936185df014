"""The block-sequential glue shared by ``prune-magnitude``, ``prune-wanda`` and ``prune-sparsegpt``.

It reuses GPTQ's machinery (:mod:`llmc.passes.quantize_gptq`: the hidden states entering block 0,
true-sequential steps, one block forward per calibration batch, Hessians, per-block
checkpoints). The rules, referred to by number:

1. Each transformer block is calibrated on the outputs of the blocks before it, already pruned;
   inside a block, true-sequential steps (q/k/v, o, gate/up, down), each calibrated after the
   steps before it are pruned.
2. A step collects what its linears need: the Hessian of their shared input (SparseGPT, and any
   linear quantized jointly), else only the mean square of each input (Wanda); magnitude pruning
   without joint quantization reads no data at all.
3. Joint quantization: a pruned linear whose quantization scheme (``llmc.schemes``) is GPTQ is
   quantized in the same loop (:func:`~llmc.passes.prune_sparsegpt.sparsegpt_prune`, its rule 6)
   so the pruned weights stay exactly zero; GPTQ's own pass then leaves it alone. Other schemes
   (RTN) round zeros to zero and quantize later as usual.
4. The pruned model becomes the program's checkpoint; the unpruned one stays the quality
   reference (``Program.pruning``). N:M linears are recorded in ``Program.sparsity``, which the
   engine build reads to enable sparse weights.
5. Progress is checkpointed after every block, so an interrupted run resumes at its block.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from llmc.ir import Program, Pruning, QuantDecision, SparsityDecision
from llmc.packed import PackedLinear
from llmc.pipeline import Pass, PassContext, PassResult
from llmc.passes.quantize_gptq import (
    WINDOWS_PER_BATCH,
    BlockCheckpoint,
    block_hessian,
    block_steps,
    first_block_inputs,
    run_block,
)
from llmc.passes.sparsity import MeanSquareAccumulator
from llmc.pruning import PruningRules, describe_sparsity, resolve_sparsity
from llmc.schemes import QuantizationRules, effective_group, resolve_schemes

log = logging.getLogger("llmc.prune")


@dataclass(frozen=True)
class InputStats:
    """What one step's calibration inputs say: mean of x_j² per input, and the Hessian when asked."""

    mean_square: torch.Tensor  # [in]
    hessian: torch.Tensor | None  # [in, in], H = 2 X Xᵀ / N (GPTQ rule 1)


@dataclass(frozen=True)
class Pruned:
    weight: torch.Tensor  # float32 [out, in], zeros where removed
    mask: torch.Tensor  # bool [out, in], True where removed
    packed: PackedLinear | None  # joint quantization
    record: dict  # per-linear figures for prune_layers.json


class _Stop(Exception):
    """Raised by a hook once it has the input it came for; stops the rest of the forward."""


def block_mean_square(block, module, inputs, kwargs) -> torch.Tensor:
    """Mean of x_j² over every token of ``module``'s input, stopping each forward at ``module``."""
    accumulator = MeanSquareAccumulator(module.in_features, device=module.weight.device)

    def capture(_, args):
        accumulator.add(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(capture)
    try:
        for hidden, kw in zip(inputs, kwargs):
            try:
                run_block(block, hidden, kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return accumulator.mean_square()


class PruneCheckpoint(BlockCheckpoint):
    """GPTQ's per-block checkpoint (rule 5) plus each finished block's pruned float weights."""

    def save(self, index, weights: dict, packed: dict, records: dict, hidden: list) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {name: w.contiguous() for name, w in weights.items()}
        if tensors:
            self._atomic(f"pruned-{index:04d}.safetensors", lambda p: save_file(tensors, p))
        super().save(index, packed, records, hidden)  # its state.json is the commit

    def load(self):
        """``(next_block, weights, packed, records, hidden)`` of an interrupted run, or ``None``."""
        from safetensors.torch import load_file

        resumed = super().load()
        if resumed is None:
            return None
        start, packed, records, hidden = resumed
        weights = {}
        for index in range(start):
            path = self.directory / f"pruned-{index:04d}.safetensors"
            if path.is_file():
                weights.update(load_file(path))
        return start, weights, packed, records, hidden


@dataclass(frozen=True)
class SequentialPrunePass(Pass, PruningRules):
    """A prune pass over the linears that :func:`llmc.pruning.resolve_sparsity` selects.

    Subclasses set ``name`` and ``method`` and implement :meth:`prune` (one linear).
    ``quantization`` (the compile's rules) names the linears quantized jointly (rule 3).
    """

    method: ClassVar[str]
    quantization: QuantizationRules | None = None
    damp: float = 0.01  # GPTQ's Hessian damping (SparseGPT and joint quantization)
    block_size: int = 128  # SparseGPT's mask blocks and lazy batches

    def needs_hessian(self, joint: bool) -> bool:
        """Whether a linear's step needs the Hessian (rule 2); otherwise mean squares suffice."""
        return joint

    def needs_inputs(self) -> bool:
        return True

    def prune(self, name: str, weight: torch.Tensor, sparsity, stats: InputStats | None, scheme) -> Pruned:
        """One linear: ``scheme`` (llmc.schemes.Scheme with its effective group) when joint."""
        raise NotImplementedError

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError(f"{self.name} needs a model; run 'ingest' first")
        if program.calibration is None:
            raise ValueError(f"{self.name} needs calibration windows; run 'calibrate' first")
        if program.pruning is not None:
            raise ValueError(f"{self.name}: the model was already pruned by '{program.pruning.method}'")
        if program.quantized_weights is not None:
            raise ValueError(f"{self.name} prunes float weights; run it before the quantize passes")

    def ensures(self, program: Program) -> None:
        if program.pruning is None:
            raise ValueError(f"{self.name} recorded no pruning")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from llmc.checkpoint import load_hf_model, save_pruned, save_quantized

        linears = {lin.name: lin for layer in program.layers for lin in layer.linears}
        plan = {n: s for n, s in resolve_sparsity({n: lin.in_features for n, lin in linears.items()}, self).items()
                if s is not None}
        joint = {}
        if self.quantization is not None:  # rule 3
            schemes = resolve_schemes(list(linears), self.quantization)
            for n in plan:
                if schemes[n] is not None and schemes[n].method == "gptq":
                    joint[n] = replace(schemes[n], group_size=effective_group(schemes[n], linears[n].in_features, n))

        model = load_hf_model(ctx.path(program.model.checkpoint), program.model.dtype)
        modules = dict(model.named_modules())
        checkpoint = PruneCheckpoint(ctx.cache_root / f".resume-{ctx.entry}")
        packed: dict[str, PackedLinear] = {}
        records: dict[str, dict] = {}

        def apply(name, stats):
            start = time.perf_counter()
            module = modules[name]
            result = self.prune(name, module.weight.detach(), plan[name], stats, joint.get(name))
            module.weight.copy_(result.weight.to(module.weight.dtype))
            removed = float(result.mask.float().mean())
            records[name] = dict(result.record, sparsity=plan[name].describe(), removed_fraction=round(removed, 6),
                                 seconds=round(time.perf_counter() - start, 3))
            return result

        with torch.no_grad():
            if not self.needs_inputs() and not joint:  # rule 2: magnitude reads no data
                for name in ctx.progress(list(plan), f"{self.name}", total=len(plan)):
                    apply(name, None)
            else:
                self._sequential(program, ctx, model, plan, joint, apply, checkpoint, packed, records)

        decisions = [SparsityDecision(n, s.n, s.m) for n, s in plan.items() if s.n is not None]
        total = sum(linears[n].in_features * linears[n].out_features for n in plan)
        zeros = sum(r["removed_fraction"] * linears[n].in_features * linears[n].out_features for n, r in records.items())
        unpruned = program.model.checkpoint
        record = Pruning(self.method, unpruned, len(plan), round(zeros / total, 6) if total else 0.0)
        result = save_pruned(program, ctx, model, record, decisions)
        if packed:
            result = save_quantized(result, ctx, packed, [
                QuantDecision(n, "gptq", p.bits, p.group_size, p.symmetric) for n, p in packed.items()
            ])
        (ctx.workdir / "prune_layers.json").write_text(json.dumps(records, indent=1, sort_keys=True))
        checkpoint.clear()
        summary = f"{len(plan)} linears {describe_sparsity(plan.values())}, {record.removed_fraction:.1%} of their weights removed"
        losses = [r for r in records.values() if "loss" in r]
        if losses:
            reference = sum(r["reference"] for r in losses) or 1.0
            summary += f", relative output error {(sum(r['loss'] for r in losses) / reference) ** 0.5:.4f}"
        if packed:
            summary += f"; {len(packed)} quantized jointly (GPTQ)"
        return PassResult(result, summary)

    def _sequential(self, program, ctx, model, plan, joint, apply, checkpoint, packed, records) -> None:
        """Rules 1, 2 and 5: the blocks in order, each on the pruned outputs of those before it."""
        from safetensors.torch import load_file

        tokens = load_file(ctx.path(program.calibration.tokens_ref))["tokens"]
        hidden, kwargs = first_block_inputs(model, list(tokens.split(WINDOWS_PER_BATCH)))
        start = 0
        resumed = checkpoint.load()
        if resumed is not None:
            start, weights, earlier, done, hidden = resumed
            modules = dict(model.named_modules())
            for name, weight in weights.items():
                modules[name].weight.copy_(weight.to(modules[name].weight.dtype))
            packed.update(earlier)
            records.update(done)
            log.info("%s: resuming at block %d of %d", self.name, start, len(program.layers))
        blocks = range(start, len(program.layers))
        for index in ctx.progress(blocks, f"{self.name} blocks", total=len(blocks)):
            block = model.model.layers[index]
            prefix = f"model.layers.{index}."
            names = [lin.name[len(prefix):] for lin in program.layers[index].linears]
            weights, done = {}, {}
            for step in block_steps(names):
                step = [prefix + n for n in step if prefix + n in plan]
                if not step:
                    continue
                first = block.get_submodule(step[0][len(prefix):])
                if any(self.needs_hessian(n in joint) for n in step):
                    hessian = block_hessian(block, first, hidden, kwargs)
                    stats = InputStats(torch.diag(hessian) / 2, hessian)
                else:
                    stats = InputStats(block_mean_square(block, first, hidden, kwargs), None)
                for name in step:
                    result = apply(name, stats)
                    weights[name] = result.weight
                    if result.packed is not None:
                        done[name] = result.packed
            last = index + 1 == len(program.layers)
            hidden = [] if last else [run_block(block, h, kw) for h, kw in zip(hidden, kwargs)]
            packed.update(done)
            checkpoint.save(index, weights, done, records, hidden)
