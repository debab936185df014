"""GPTQ weight quantization (Frantar et al., "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", ICLR 2023), block by block on the calibration windows.

The math is pure functions on tensors: :class:`HessianAccumulator` and :func:`gptq_quantize`,
which returns a :class:`~llmc.packed.PackedLinear` like RTN does, so evaluate and export consume
either unchanged. The rules below are referred to by number in the code.

1. Hessian: ``H = 2 X Xᵀ / N`` over the N input rows a linear saw, summed in float32 with TF32
   off (its 10-bit mantissa loses the small eigenvalues the inverse depends on).
2. Dead columns (``H[i, i] == 0``: an input that is always zero) get ``H[i, i] = 1`` and a zero
   weight column; they then quantize to exactly 0 and cost nothing.
3. Damping: ``damp * mean(diag H)`` is added to the diagonal; while a Cholesky factorisation
   fails the fraction is raised tenfold (up to ``MAX_DAMP``). The fraction used is returned.
4. GPTQ's divisor is the diagonal of the upper Cholesky factor ``U`` of ``H⁻¹``; column ``i``'s
   rounding error, divided by ``U[i, i]``, is propagated to the later columns along row ``i``
   of ``U``.
5. Lazy batches of ``block_size`` columns: inside a batch the update runs column by column;
   the later columns get the batch's accumulated update once, after the batch.
6. Groups (``group_size`` consecutive input columns of one output row, or the whole row for
   per-channel) are fitted when the column loop reaches the group's first column, on the
   error-updated weights: the batch's own copy for columns inside the batch, plus the pending
   update of this batch for columns beyond it.
7. Act-order: columns are quantized in decreasing order of ``diag H``, with *static* groups:
   every group is fitted up front on the original column order, before permuting, so a column
   keeps its group and inference needs no ``g_idx`` (TensorRT's block-quantized
   DequantizeLinear cannot express one).
8. Grid, symmetric: codes in the full signed range ``[-2^(b-1), 2^(b-1) - 1]`` (int4: [-8, 7],
   zero point 0, what TensorRT's weight-only kernels read), ``scale = max(max(w) / (2^(b-1) - 1),
   -min(w) / 2^(b-1))``: the group's extremes map inside the range, so the fit clips nothing,
   and a group whose largest magnitude is negative uses code -8. (RTN keeps the narrower
   [-7, 7]; GPTQ's error feedback makes the extra level worth having.) Asymmetric: RTN's grid
   (range widened to include 0, integer zero point, codes in ``[0, 2^b - 1]``). A zero scale
   becomes 1. Scales are float16 values, raised to the nearest one at or above the fit (RTN's rule 6,
   :func:`~llmc.passes.quantize_rtn.float16_scale`): the kernels read float16 scales.
9. The dequantized value the loop uses for error feedback is computed exactly as
   ``PackedLinear.dequantize()`` computes it, so what export reads is what GPTQ optimised.

The pass runs the model block by block (:class:`GptqQuantizePass`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from llmc.packed import PackedLinear
from llmc.passes.quantize_rtn import float16_scale

SUPPORTED_BITS = (2, 3, 4, 8)
MAX_DAMP = 10.0  # fraction of mean(diag H); past this the Hessian is not a Hessian (inf/NaN inputs)


@contextmanager
def full_float32_matmul():
    """Matrix products in true float32 (TF32 off) inside the block; restores the settings."""
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
        torch.set_float32_matmul_precision(saved[2])


@contextmanager
def one_cpu_thread(device: torch.device):
    """On CPU, one intra-op thread inside the block. The column loop's small operations and the
    LAPACK factorisations lose more to thread synchronisation than they gain: measured 10x
    slower on two threads on a busy 2-core host (Cholesky of a 4864x4864 Hessian: 26 s vs 2.7 s)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class HessianAccumulator:
    """``H = 2 X Xᵀ / N`` over every row added (rule 1)."""

    def __init__(self, columns: int, device=None):
        self.sum = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add the rows of ``inputs`` [..., columns] (any dtype; summed in float32)."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        with full_float32_matmul():
            self.sum.addmm_(rows.T, rows)
        self.samples += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.samples == 0:
            raise ValueError("HessianAccumulator: no inputs were added")
        return self.sum * (2.0 / self.samples)


@dataclass(frozen=True)
class GptqResult:
    packed: PackedLinear
    damp: float  # the damping fraction actually used (rule 3)
    loss: float  # output error tr((W - Q) H (W - Q)ᵀ) with the undamped H
    reference: float  # tr(W H Wᵀ): the loss of quantizing every weight to 0
    dead_columns: int


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` and the damping fraction used (rules 3, 4)."""
    mean = float(torch.diag(hessian).mean())
    identity = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    fraction = damp
    while True:
        lower, info = torch.linalg.cholesky_ex(hessian + fraction * mean * identity)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info == 0 and bool(torch.isfinite(upper).all()):
                return upper, fraction
        if fraction >= MAX_DAMP:
            raise ValueError(
                f"gptq: the Hessian stays singular with damping {fraction:g} x mean(diag H); "
                "the layer's calibration inputs hold inf or NaN"
            )
        fraction = min(max(fraction * 10, 1e-6), MAX_DAMP)


def fit_grid(weights: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of a group ``weights`` [rows, columns] (rule 8); zero is float."""
    if symmetric:
        top, bottom = 2 ** (bits - 1) - 1, 2 ** (bits - 1)
        scale = torch.maximum(weights.amax(dim=1).clamp(min=0) / top, (-weights.amin(dim=1)).clamp(min=0) / bottom)
        scale = float16_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
        return scale, torch.zeros_like(scale)
    qmax = 2**bits - 1
    low = weights.amin(dim=1).clamp(max=0.0)
    high = weights.amax(dim=1).clamp(min=0.0)
    scale = (high - low) / qmax
    scale = float16_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))
    return scale, torch.round(-low / scale).clamp(0, qmax)


def _code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> GptqResult:
    """GPTQ codes for ``weight`` [out, in] given its input Hessian [in, in] (rules 2-9).

    ``group_size`` ``None`` or -1 means one group per output row. Computes in float32 on the
    weight's device. Raises ``ValueError`` like :func:`~llmc.passes.quantize_rtn.rtn_quantize`
    for unsupported bits, 8-bit asymmetric, a group size that does not divide the input, a
    weight that is not 2-D or not finite, and for a Hessian of the wrong shape.
    """
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    rows, columns = weight.shape
    if tuple(hessian.shape) != (columns, columns):
        raise ValueError(f"gptq_quantize: Hessian {tuple(hessian.shape)} does not fit a weight with {columns} inputs")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"gptq_quantize: bits must be one of {SUPPORTED_BITS}, got {bits}")
    if bits == 8 and not symmetric:
        raise ValueError("gptq_quantize: 8-bit asymmetric codes (0..255) do not fit PackedLinear's int8 codes; "
                         "use symmetric=True at 8 bits")
    group = columns if group_size in (None, -1) else group_size
    if group <= 0 or columns % group:
        raise ValueError(f"gptq_quantize: group_size {group_size} does not divide the input dimension {columns}")
    if block_size < 1:
        raise ValueError(f"gptq_quantize: block_size must be positive, got {block_size}")
    if not torch.isfinite(weight).all():
        raise ValueError("gptq_quantize: weight holds inf or NaN; fix the checkpoint before quantizing")

    with full_float32_matmul(), one_cpu_thread(weight.device):
        original = weight.detach().to(torch.float32)
        H0 = hessian.detach().to(device=original.device, dtype=torch.float32)
        W = original.clone()
        H = H0.clone()
        # Rule 2.
        dead = torch.diag(H) == 0
        H[dead, dead] = 1.0
        W[:, dead] = 0.0

        groups = columns // group
        scales = torch.empty(rows, groups, device=W.device)
        zeros = torch.zeros(rows, groups, device=W.device)
        order = torch.arange(columns, device=W.device)
        if act_order:
            # Rule 7: static groups from the original order, then the permutation.
            for g in range(groups):
                scales[:, g], zeros[:, g] = fit_grid(W[:, g * group : (g + 1) * group], bits, symmetric)
            order = torch.argsort(torch.diag(H), descending=True, stable=True)
            W, H = W[:, order], H[order][:, order]
        group_of = (order // group).tolist()
        U, used = inverse_cholesky(H, damp)
        low, high = _code_range(bits, symmetric)

        codes = torch.zeros_like(W)
        quantized = torch.zeros_like(W)
        for i1 in range(0, columns, block_size):
            # Rule 5.
            i2 = min(i1 + block_size, columns)
            W1 = W[:, i1:i2].clone()
            errors = torch.zeros_like(W1)
            for i in range(i2 - i1):
                column = i1 + i
                g = group_of[column]
                if not act_order and column % group == 0:
                    # Rule 6: the group's current values, in-batch part and pending update beyond it.
                    end = column + group
                    current = W1[:, i : min(end, i2) - i1]
                    if end > i2:
                        beyond = W[:, i2:end] - errors @ U[i1:i2, i2:end]
                        current = torch.cat([current, beyond], dim=1)
                    scales[:, g], zeros[:, g] = fit_grid(current, bits, symmetric)
                w = W1[:, i]
                scale, zero = scales[:, g], zeros[:, g]
                q = (torch.round(w / scale) + zero).clamp(low, high)
                # Rule 9: PackedLinear.dequantize's arithmetic.
                value = (q - zero) * scale if not symmetric else q * scale
                codes[:, column] = q
                quantized[:, column] = value
                # Rule 4.
                error = (w - value) / U[i1 + i, i1 + i]
                W1[:, i + 1 :].addr_(error, U[i1 + i, i1 + i + 1 : i2], alpha=-1)
                errors[:, i] = error
            W[:, i2:].addmm_(errors, U[i1:i2, i2:], alpha=-1)

        if act_order:
            inverse = torch.argsort(order)
            codes, quantized = codes[:, inverse], quantized[:, inverse]
        difference = original - quantized
        loss = float(((difference @ H0) * difference).sum())
        reference = float(((original @ H0) * original).sum())

    packed = PackedLinear(
        q=codes.to(torch.int8),
        scale=scales,
        zero=None if symmetric else zeros.to(torch.int8),
        bits=bits,
        group_size=group,
        symmetric=symmetric,
    )
    return GptqResult(packed, used, loss, reference, int(dead.sum()))


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)ᵀ)``: with ``H = 2XXᵀ/N``, twice the mean squared output error per row of X."""
    difference = weight.to(torch.float32) - quantized.to(torch.float32)
    with full_float32_matmul():
        return float(((difference @ hessian.to(torch.float32)) * difference).sum())


# --------------------------------------------------------------------------- the pass

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from llmc.errors import InputError  # noqa: E402
from llmc.ir import Program, QuantDecision  # noqa: E402
from llmc.pipeline import Pass, PassContext, PassResult  # noqa: E402
from llmc.schemes import QuantizationRules, describe, effective_group, resolve_schemes  # noqa: E402

log = logging.getLogger("llmc.gptq")

# True-sequential order inside a Llama/Mistral/Qwen2 block: each step's linears share one
# input, calibrated after the steps before it are quantized. Linears of other names follow,
# one step each, in layer-table order.
TRUE_SEQUENTIAL = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
WINDOWS_PER_BATCH = 8  # calibration windows per block forward: bounds activation memory


class _Captured(Exception):
    """Raised by a forward hook once it has what it came for; stops the rest of the forward."""


def block_steps(block_linears: list[str]) -> list[list[str]]:
    """The block's linears (names relative to the block) grouped into true-sequential steps."""
    steps = [[n for n in step if n in block_linears] for step in TRUE_SEQUENTIAL]
    known = {n for step in TRUE_SEQUENTIAL for n in step}
    return [s for s in steps if s] + [[n] for n in block_linears if n not in known]


def first_block_inputs(model, batches) -> tuple[list, list]:
    """Per batch of token ids, the hidden states entering block 0 and the keyword arguments the
    model passes every block (position embeddings, mask), captured with a hook."""
    inputs, kwargs = [], []

    def capture(module, args, kw):
        hidden = args[0] if args else kw["hidden_states"]
        inputs.append(hidden)
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Captured

    handle = model.model.layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return inputs, kwargs


def run_block(block, hidden, kwargs):
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def block_hessian(block, module, inputs, kwargs) -> torch.Tensor:
    """The Hessian of ``module``'s input over every batch, stopping each forward at ``module``."""
    accumulator = HessianAccumulator(module.in_features, device=module.weight.device)

    def capture(_, args):
        accumulator.add(args[0])
        raise _Captured

    handle = module.register_forward_pre_hook(capture)
    try:
        for hidden, kw in zip(inputs, kwargs):
            try:
                run_block(block, hidden, kw)
            except _Captured:
                pass
    finally:
        handle.remove()
    return accumulator.hessian()


class BlockCheckpoint:
    """Per-block progress of one GPTQ run, kept outside the pass's workdir (which a failure
    discards) so a rerun with the same inputs resumes at the block it was in.

    ``<dir>/block-NNNN.safetensors`` holds block N's packed weights, ``hidden.safetensors`` the
    inputs of the next block, ``state.json`` (written last: the commit) that block's index and
    the per-layer records.
    """

    def __init__(self, directory: Path):
        self.directory = directory

    def load(self):
        """``(next_block, packed, records, hidden)`` of an interrupted run, or ``None``."""
        from safetensors.torch import load_file

        from llmc.checkpoint import load_packed

        state_file = self.directory / "state.json"
        if not state_file.is_file():
            return None
        state = json.loads(state_file.read_text())
        packed = {}
        for index in range(state["next_block"]):
            path = self.directory / f"block-{index:04d}.safetensors"
            if path.is_file():
                packed.update(load_packed(path))
        hidden = load_file(self.directory / "hidden.safetensors")
        batches = [hidden[f"batch.{i}"] for i in range(len(hidden))]
        return state["next_block"], packed, state["records"], batches

    def save(self, index: int, packed: dict, records: dict, hidden: list) -> None:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, linear in packed.items():
            tensors.update(linear.to_tensors(name))
        if tensors:
            self._atomic(f"block-{index:04d}.safetensors", lambda p: save_file(tensors, p))
        batches = {f"batch.{i}": h.contiguous() for i, h in enumerate(hidden)}
        self._atomic("hidden.safetensors", lambda p: save_file(batches, p))
        state = json.dumps({"next_block": index + 1, "records": records}, indent=1, sort_keys=True)
        self._atomic("state.json", lambda p: Path(p).write_text(state))

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _atomic(self, name: str, write) -> None:
        partial = self.directory / f".{name}.part"
        write(str(partial))
        os.replace(partial, self.directory / name)


@dataclass(frozen=True)
class GptqQuantizePass(Pass, QuantizationRules):
    """Quantize the linears whose scheme (:func:`llmc.schemes.resolve_schemes`) is 'gptq'.

    Sequential: each transformer block is calibrated on the outputs of the blocks before it,
    already quantized; inside a block, true-sequential steps (:data:`TRUE_SEQUENTIAL`). Linears
    another pass quantized earlier keep their weights (and act quantized in the forwards).
    Checkpoints after every block (:class:`BlockCheckpoint`).
    """

    name = "quantize-gptq"
    method: str = "gptq"
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("quantize-gptq needs a model; run 'ingest' first")
        if program.calibration is None:
            raise ValueError("quantize-gptq needs calibration windows; run 'calibrate' first")

    def ensures(self, program: Program) -> None:
        if program.quantized_weights is None:
            raise ValueError("quantize-gptq wrote no packed weights")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from safetensors.torch import load_file

        from llmc.checkpoint import load_hf_model, load_packed, save_quantized

        from llmc.passes.mixed_precision import apply_precision, high_rows_by_module

        linears = {lin.name: lin for layer in program.layers for lin in layer.linears}
        # The mixed-precision policy's widths (and MixLLM's 8-bit rows) over the rules' defaults.
        schemes = apply_precision(resolve_schemes(list(linears), self), program.precision)
        high_rows = high_rows_by_module(ctx, program.precision)
        decided = {d.module for d in program.quantization}  # e.g. quantized jointly with pruning
        mine = {n: s for n, s in schemes.items() if s is not None and s.method == "gptq" and n not in decided}
        groups = {n: effective_group(s, linears[n].in_features, n) for n, s in mine.items()}

        model = load_hf_model(ctx.path(program.model.checkpoint), program.model.dtype)
        if len(set(getattr(model.config, "layer_types", None) or ())) > 1:
            # Every block reuses the mask block 0 received (first_block_inputs).
            raise InputError(
                f"quantize-gptq: {program.model.architecture} mixes full and sliding-window attention "
                "blocks, which GPTQ's block-by-block calibration does not support yet; use method: rtn"
            )
        modules = dict(model.named_modules())
        with torch.no_grad():
            if program.quantized_weights is not None:  # an earlier pass's layers act quantized
                for name, earlier in load_packed(ctx.path(program.quantized_weights)).items():
                    modules[name].weight.copy_(earlier.dequantize().to(modules[name].weight.dtype))
        tokens = load_file(ctx.path(program.calibration.tokens_ref))["tokens"]
        batches = list(tokens.split(WINDOWS_PER_BATCH))

        checkpoint = BlockCheckpoint(ctx.cache_root / f".resume-{ctx.entry}")
        packed: dict[str, PackedLinear] = {}
        records: dict[str, dict] = {}
        start = 0
        with torch.no_grad():
            hidden, kwargs = first_block_inputs(model, batches)
            resumed = checkpoint.load()
            if resumed is not None:
                start, packed, records, hidden = resumed
                log.info("quantize-gptq: resuming at block %d of %d", start, len(program.layers))
            blocks = range(start, len(program.layers))
            for index in ctx.progress(blocks, "gptq blocks", total=len(blocks)):
                block = model.model.layers[index]
                prefix = f"model.layers.{index}."
                names = [lin.name[len(prefix):] for lin in program.layers[index].linears]
                done = {}
                for step in block_steps(names):
                    step = [n for n in step if prefix + n in mine]
                    if not step:
                        continue
                    hessian = block_hessian(block, block.get_submodule(step[0]), hidden, kwargs)
                    for relative in step:
                        name = prefix + relative
                        done[name], records[name] = self._quantize(name, modules[name], hessian, mine[name], groups[name],
                                                                   high_rows.get(name))
                last = index + 1 == len(program.layers)
                hidden = [] if last else [run_block(block, h, kw) for h, kw in zip(hidden, kwargs)]
                packed.update(done)
                checkpoint.save(index, done, records, hidden)

        decisions = [QuantDecision(n, "gptq", mine[n].bits, groups[n], mine[n].symmetric, records[n].get("high_rows", 0))
                     for n in packed]
        result = save_quantized(program, ctx, packed, decisions)
        (ctx.workdir / "gptq_layers.json").write_text(json.dumps(records, indent=1, sort_keys=True))
        checkpoint.clear()
        loss = sum(r["loss"] for r in records.values())
        reference = sum(r["reference"] for r in records.values()) or 1.0
        raised = sum(1 for r in records.values() if r["damp"] > self.damp)
        return PassResult(
            result,
            f"{len(decisions)} linears {describe(mine.values())}{', act-order' if self.act_order else ''}, "
            f"relative output error {(loss / reference) ** 0.5:.4f}, damping raised on {raised}",
        )

    def _quantize(self, name, module, hessian, scheme, group, high_rows=None) -> tuple[PackedLinear, dict]:
        from llmc.passes.mixed_precision import quantize_rows

        start = time.perf_counter()
        results = []

        def quantize(weight):
            results.append(gptq_quantize(weight, hessian, scheme.bits, group, scheme.symmetric,
                                         damp=self.damp, act_order=self.act_order, block_size=self.block_size))
            return results[-1].packed

        # MixLLM: GPTQ on the low rows (rows are independent under GPTQ), RTN int8 on the high ones.
        packed = quantize(module.weight) if high_rows is None else quantize_rows(module.weight, high_rows, quantize)
        result = results[0]
        loss, reference = result.loss, result.reference
        if high_rows is not None:
            loss = output_error(module.weight, packed.dequantize(), hessian)
            reference = output_error(module.weight, torch.zeros_like(module.weight), hessian)
        module.weight.copy_(packed.dequantize().to(module.weight.dtype))
        seconds = time.perf_counter() - start
        log.info(
            "gptq %s: int%d g%d, damp %.3g, loss %.4g (%.2e of the weights'), %.2fs",
            name, scheme.bits, group, result.damp, loss, loss / reference if reference else 0.0, seconds,
        )
        record = dict(bits=scheme.bits, group_size=group, damp=result.damp, loss=loss,
                      reference=reference, dead_columns=result.dead_columns, seconds=round(seconds, 3),
                      high_rows=0 if high_rows is None else int(high_rows.numel()))
        return packed, record
