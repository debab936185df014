"""`calibrate`: seeded token windows from a local text file, for data-aware passes.

The windows are drawn at random offsets (seeded by the compile's seed) from the whole
tokenised text, as GPTQ-style calibration expects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from llmc.errors import InputError
from llmc.ir import Program, TextWindows
from llmc.pipeline import Pass, PassContext, PassResult, content_digest


def tokenize_text(tokenizer, text: str):
    """The whole text as one int64 token sequence (no special tokens added)."""
    import torch

    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def sample_windows(tokens, seq_len: int, windows: int, seed: int):
    """``windows`` windows of ``seq_len`` tokens at seeded random offsets: [windows, seq_len]."""
    import torch

    if tokens.numel() < seq_len:
        raise ValueError(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (windows,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read as UTF-8 text ({e})") from None


@dataclass(frozen=True)
class CalibratePass(Pass):
    """Tokenise the calibration text and store seeded windows."""

    name = "calibrate"
    text: Path
    seq_len: int = 256
    windows: int = 32

    def requires(self, program: Program) -> None:
        if program.model is None:
            raise ValueError("calibrate needs the model's tokenizer; run 'ingest' first")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        from safetensors.torch import save_file

        from llmc.checkpoint import load_tokenizer

        tokenizer = load_tokenizer(ctx.path(program.model.checkpoint))
        tokens = tokenize_text(tokenizer, read_text(self.text))
        try:
            windows = sample_windows(tokens, self.seq_len, self.windows, ctx.seed)
        except ValueError as e:
            raise InputError(f"{self.text}: {e}") from None
        save_file({"tokens": windows}, ctx.workdir / "calibration.safetensors")
        info = TextWindows(
            source=self.text.name,
            source_sha256=content_digest(self.text),
            seq_len=self.seq_len,
            windows=self.windows,
            tokens_ref=ctx.ref("calibration.safetensors"),
        )
        return PassResult(
            replace(program, calibration=info),
            f"{self.windows} windows x {self.seq_len} tokens from {self.text.name} "
            f"({tokens.numel()} tokens, seed {ctx.seed})",
        )
