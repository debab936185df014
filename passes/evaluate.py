"""`evaluate`: held-out perplexity of the unmodified and the compressed model.

Protocol: the first N non-overlapping windows of the evaluation text, each scored
independently (no context carried across windows); perplexity = exp(mean negative
log-likelihood over every predicted token, i.e. seq_len - 1 per window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from llmc.errors import InputError, VerificationError
from llmc.ir import Measurement, Program, TextWindows
from llmc.pipeline import Pass, PassContext, PassResult, content_digest
from llmc.passes.calibrate import read_text, tokenize_text


def consecutive_windows(tokens, seq_len: int, windows: int):
    """The first ``windows`` non-overlapping windows: [windows, seq_len]."""
    available = tokens.numel() // seq_len
    if available < windows:
        raise ValueError(f"text has {tokens.numel()} tokens: room for {available} windows of {seq_len}, {windows} asked")
    return tokens[: windows * seq_len].view(windows, seq_len)


def next_token_nll(model, ids):
    """Summed next-token negative log-likelihood of ``model`` over ``ids`` [batch, seq] (a tensor,
    so a caller may differentiate it); ``batch * (seq - 1)`` tokens are predicted."""
    import torch

    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                             reduction="sum")


def perplexity(model, windows, progress=iter) -> float:
    """exp(mean NLL) of ``model`` over every predicted token of ``windows`` [n, seq_len]."""
    import torch

    total_nll = 0.0
    count = 0
    with torch.no_grad():
        for window in progress(windows):
            total_nll += next_token_nll(model, window.unsqueeze(0)).item()
            count += window.numel() - 1
    return math.exp(total_nll / count)


@dataclass(frozen=True)
class EvaluatePass(Pass):
    """Measure perplexity before and after compression; fail past the quality target."""

    name = "evaluate"
    text: Path
    seq_len: int = 256
    windows: int = 16
    max_increase_pct: float = 10.0

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("evaluate needs a model; run 'ingest' first")

    def ensures(self, program: Program) -> None:
        if program.measurement("perplexity.reference") is None:
            raise ValueError("evaluate recorded no reference perplexity")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from safetensors.torch import save_file

        from llmc.checkpoint import load_model, load_reference_model, load_tokenizer

        tokenizer = load_tokenizer(ctx.path(program.model.checkpoint))
        tokens = tokenize_text(tokenizer, read_text(self.text))
        try:
            windows = consecutive_windows(tokens, self.seq_len, self.windows)
        except ValueError as e:
            raise InputError(f"{self.text}: {e}") from None
        save_file({"tokens": windows.contiguous()}, ctx.workdir / "evaluation.safetensors")
        protocol = (
            f"{self.text.name}: first {self.windows} non-overlapping windows of {self.seq_len} tokens, "
            f"{self.windows * (self.seq_len - 1)} tokens predicted, no context across windows"
        )

        def bar(label):
            return lambda items: ctx.progress(items, f"perplexity ({label})", total=len(items))

        # The reference is the model as ingested, before pruning too.
        reference = perplexity(load_reference_model(program, ctx), windows, bar("reference"))
        measurements = [Measurement("perplexity.reference", round(reference, 4), "", protocol)]
        summary = f"reference ppl {reference:.3f}"
        if program.quantized_weights is not None or program.pruning is not None:
            compressed = perplexity(load_model(program, ctx), windows, bar("compressed"))
            increase = 100 * (compressed / reference - 1)
            measurements.append(Measurement("perplexity.compressed", round(compressed, 4), "", protocol))
            measurements.append(Measurement("perplexity.increase", round(increase, 2), "%",
                                            f"compressed over reference; target at most {self.max_increase_pct:g}%"))
            summary += f", compressed {compressed:.3f} ({increase:+.2f}%)"
            if increase > self.max_increase_pct:
                raise VerificationError(
                    f"perplexity rose {increase:.2f}% ({reference:.3f} -> {compressed:.3f}), past the "
                    f"quality target of {self.max_increase_pct}% (model.yaml quality.max_perplexity_increase_pct); "
                    "use more bits or a smaller group_size" + (", or prune less" if program.pruning else "")
                )
        info = TextWindows(
            source=self.text.name,
            source_sha256=content_digest(self.text),
            seq_len=self.seq_len,
            windows=self.windows,
            tokens_ref=ctx.ref("evaluation.safetensors"),
        )
        kept = tuple(m for m in program.measurements if not m.name.startswith("perplexity."))
        return PassResult(
            replace(program, evaluation=info, measurements=kept + tuple(measurements)), summary
        )
