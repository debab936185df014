"""`evaluate`: perplexity against a by-hand computation, before and after quantization, and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from llmc.checkpoint import load_tokenizer
from llmc.errors import EXIT_USAGE, EXIT_VERIFICATION, PassError, VerificationError
from llmc.passes.calibrate import tokenize_text
from llmc.passes.evaluate import EvaluatePass
from llmc.passes.ingest import IngestPass
from llmc.passes.quantize_rtn import RtnQuantizePass, rtn_quantize
from llmc.pipeline import run_pipeline
from llmc.testing import TINY_TEXT

SEQ_LEN, WINDOWS = 32, 4
EVAL_TEXT = TINY_TEXT[::-1]  # held out: not the calibration text


def run(passes, cache):
    return run_pipeline(passes, cache_root=cache, seed=0, verify=True, show_progress=False).program


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text(EVAL_TEXT)
    return path


def evaluate(text, **options):
    return EvaluatePass(text=text, seq_len=SEQ_LEN, windows=WINDOWS, **options)


def load_float_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()


def by_hand_perplexity(model, windows: torch.Tensor) -> float:
    """exp of the mean of -log p(next token) over every position but the last of every window."""
    with torch.no_grad():
        logits = model(windows).logits[:, :-1].double()
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    picked = log_probs.gather(-1, windows[:, 1:, None]).squeeze(-1)
    return math.exp(-picked.mean().item())


def first_windows(model_dir) -> torch.Tensor:
    tokens = tokenize_text(load_tokenizer(model_dir), EVAL_TEXT)
    return torch.stack([tokens[i * SEQ_LEN : (i + 1) * SEQ_LEN] for i in range(WINDOWS)])


def test_reference_perplexity_matches_a_by_hand_computation(tmp_path, tiny_model_dir, text):
    cache = tmp_path / "cache"
    program = run([IngestPass(source=tiny_model_dir), evaluate(text)], cache)

    windows = first_windows(tiny_model_dir)
    stored = load_file(cache / program.evaluation.tokens_ref)["tokens"]
    assert stored.equal(windows)
    assert (program.evaluation.seq_len, program.evaluation.windows) == (SEQ_LEN, WINDOWS)

    reference = program.measurement("perplexity.reference")
    assert reference.value == pytest.approx(by_hand_perplexity(load_float_model(tiny_model_dir), windows), rel=1e-6)
    assert f"{WINDOWS * (SEQ_LEN - 1)} tokens predicted" in reference.protocol
    assert program.measurement("perplexity.compressed") is None  # nothing was quantized


def test_after_quantization_both_perplexities_are_recorded_and_the_compressed_one_is_exact(
    tmp_path, tiny_model_dir, text
):
    program = run([IngestPass(source=tiny_model_dir), RtnQuantizePass(bits=4, group_size=32), evaluate(text)],
                  tmp_path / "cache")
    names = [m.name for m in program.measurements]
    assert names.count("perplexity.reference") == names.count("perplexity.compressed") == 1

    model = load_float_model(tiny_model_dir)
    windows = first_windows(tiny_model_dir)
    reference = by_hand_perplexity(model, windows)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                module.weight.copy_(rtn_quantize(module.weight, 4, 32, symmetric=True).dequantize())
    compressed = by_hand_perplexity(model, windows)

    assert program.measurement("perplexity.reference").value == pytest.approx(reference, rel=1e-6)
    assert program.measurement("perplexity.compressed").value == pytest.approx(compressed, rel=1e-6)
    assert compressed != pytest.approx(reference, rel=1e-4)
    increase = program.measurement("perplexity.increase")
    assert increase.unit == "%" and increase.value == pytest.approx(100 * (compressed / reference - 1), abs=0.006)
    assert increase.protocol.endswith("target at most 10%")


def test_a_perplexity_rise_past_the_target_fails_verification_with_exit_6(tmp_path, tiny_model_dir, text):
    passes = [IngestPass(source=tiny_model_dir), RtnQuantizePass(bits=2, group_size=64),
              evaluate(text, max_increase_pct=0.0001)]
    with pytest.raises(PassError) as info:
        run(passes, tmp_path / "cache")
    assert info.value.pass_name == "evaluate"
    assert isinstance(info.value.cause, VerificationError)
    assert info.value.exit_code == EXIT_VERIFICATION
    assert "max_perplexity_increase_pct" in str(info.value)


def test_a_text_too_short_for_the_windows_is_refused_with_exit_2(tmp_path, tiny_model_dir):
    short = tmp_path / "short.txt"
    short.write_text(EVAL_TEXT[:100])  # about 90 tokens: fewer than 4 windows of 32
    with pytest.raises(PassError) as info:
        run([IngestPass(source=tiny_model_dir), evaluate(short)], tmp_path / "cache")
    assert info.value.exit_code == EXIT_USAGE
    assert str(short) in str(info.value)
    assert f"{WINDOWS} asked" in str(info.value)
